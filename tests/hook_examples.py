"""Hooks the tests load through HOOKS=tests.hook_examples:<name>."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from proxy.hooks import HookContext


class PrefixA:
    """Sync: prefixes every text with `a:`."""

    def before(self, ctx: HookContext) -> None:
        ctx.state.setdefault("order", []).append("A.before")
        ctx.inputs = [f"a:{t}" for t in ctx.inputs]

    def after(self, ctx: HookContext) -> None:
        ctx.state["order"].append("A.after")


class PrefixB:
    """Async: prefixes every text with `b:`, changing the list in place."""

    async def before(self, ctx: HookContext) -> None:
        ctx.state.setdefault("order", []).append("B.before")
        for i, text in enumerate(ctx.inputs):
            ctx.inputs[i] = f"b:{text}"

    async def after(self, ctx: HookContext) -> None:
        ctx.state["order"].append("B.after")


class Recorder:
    """Keeps what its after() saw, for the test to read."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def after(self, ctx: HookContext) -> None:
        self.seen.append({
            "order": list(ctx.state.get("order", [])),
            "inputs": list(ctx.inputs),
            "vectors": None if ctx.vectors is None else [
                None if v is None else list(v) for v in ctx.vectors
            ],
            "status": ctx.status,
            "latency_s": ctx.latency_s,
            "request_id": ctx.request_id,
            "route": ctx.route,
            "model": ctx.model,
            "user": ctx.user,
        })  # fmt: skip


recorder = Recorder()


class RefuseSecrets:
    def before(self, ctx: HookContext) -> None:
        if any("secret" in str(t) for t in ctx.inputs):
            raise ValueError("inputs must not contain secrets")


class RefuseAfter:
    async def after(self, ctx: HookContext) -> None:
        raise ValueError("vectors refused by policy")


class SlowAsync:
    """Changes the inputs, but only after HOOK_TIMEOUT has passed."""

    async def before(self, ctx: HookContext) -> None:
        await asyncio.sleep(0.5)
        ctx.inputs = [f"slow:{t}" for t in ctx.inputs]


class SlowSync:
    def before(self, ctx: HookContext) -> None:
        time.sleep(0.5)
        ctx.inputs = [f"slow:{t}" for t in ctx.inputs]


class Broken:
    def before(self, ctx: HookContext) -> None:
        ctx.inputs = [f"broken:{t}" for t in ctx.inputs]
        raise RuntimeError("a bug in the hook")


class DropsAnInput:
    def before(self, ctx: HookContext) -> None:
        ctx.inputs = ctx.inputs[:-1]
