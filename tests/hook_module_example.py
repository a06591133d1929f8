"""A whole module as a hook (HOOKS=tests:hook_module_example): its functions are the hook."""

from __future__ import annotations

from proxy.hooks import HookContext


def before(ctx: HookContext) -> None:
    ctx.inputs = [f"module:{t}" for t in ctx.inputs]
