"""Request hooks: code of the operator's that sees (and may change or refuse) each request.

``HOOKS=package.module:attr[,...]`` names objects (a module, a class, or an instance; a class
is instantiated with no arguments) with either or both of these methods, sync or async:

* ``before(ctx)``: before the proxy's own input limits. ``ctx.inputs`` is the request's list
  of inputs; the hook may replace it (``ctx.inputs = [...]``) or change it in place, keeping
  its length (an instruction prefix, redaction). ``raise ValueError("why")`` refuses the
  request with 422 ``Validation`` and that message.
* ``after(ctx)``: once the vectors are known, before the response is written. It sees
  ``ctx.inputs``, ``ctx.vectors``, ``ctx.latency_s``, ``ctx.model``, ``ctx.status``;
  ``raise ValueError`` fails the request the same way (a NaN, a threshold).

``ctx`` also carries ``request_id``, ``route``, ``user``, ``version`` and ``state``, a dict
the hooks of one request share. Hooks run in the order listed, before and after alike.

A hook call that raises anything else, or takes longer than HOOK_TIMEOUT, is logged and
counted (``proxy_hook_failures_total``); then HOOK_FAILURE=open lets the request go on as if
that call had not happened (its changes are dropped), and HOOK_FAILURE=closed fails the
request with 500. Each call is timed (``proxy_hook_duration_seconds``).

Sync hooks run on a small thread pool, so a slow one is cut off at its timeout without
stalling the event loop; a call that timed out may still be running there, which is why each
call works on its own copy of ``ctx`` and only a call that returned in time has its changes
kept. A sync hook whose object says ``inline = True`` is called on the event loop directly,
without a thread hop or a timeout: only for hooks that never block (the built-in sampler,
:class:`proxy.capture.Sampler`, which only puts a record on a queue).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from proxy import errors
from proxy.errors import ApiError, ErrorType
from proxy.metrics import Metrics
from proxy.upstream.base import EmbedInput, Vector

log = logging.getLogger(__name__)

Phase = Literal["before", "after"]
PHASES: tuple[Phase, ...] = ("before", "after")

# Sync hook calls that may wait for or run on the pool at once. Past it a call fails at once
# (as a timeout) instead of queueing behind hung ones without bound.
_SYNC_THREADS = 4
_MAX_SYNC_PENDING = 64


@dataclass(slots=True)
class HookContext:
    """What a hook sees of one request. ``inputs`` (before) may be replaced; ``state`` is
    shared by every hook of the request."""

    request_id: str
    route: str
    model: str
    inputs: list[EmbedInput]
    user: str | None = None
    version: str | None = None
    vectors: Sequence[Vector | None] | None = None
    latency_s: float | None = None
    status: int | None = None
    state: dict[str, Any] = field(default_factory=dict)


class HookError(Exception):
    """A hook call raised (not ValueError), timed out, or left ``inputs`` unusable."""


@dataclass(frozen=True, slots=True)
class _Hook:
    name: str
    before: Callable[[HookContext], Any] | None
    after: Callable[[HookContext], Any] | None
    inline: bool = False


def as_hook(name: str, target: Any) -> _Hook:
    """``target``'s ``before``/``after`` as a hook named ``name``."""
    before = getattr(target, "before", None)
    after = getattr(target, "after", None)
    if not callable(before) and not callable(after):
        raise RuntimeError(f"HOOKS: {name!r} has neither a before(ctx) nor an after(ctx) method")
    return _Hook(
        name,
        before if callable(before) else None,
        after if callable(after) else None,
        inline=getattr(target, "inline", False) is True,
    )


def load_hook(spec: str) -> _Hook:
    """``package.module:attr`` as a hook; a class is instantiated with no arguments."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        if hasattr(module, attr):
            target: Any = getattr(module, attr)
        else:  # `package:module`, a submodule not imported yet
            target = importlib.import_module(f"{module_name}.{attr}")
    except ImportError as exc:
        raise RuntimeError(f"HOOKS: cannot load {spec!r}: {exc}") from exc
    if inspect.isclass(target):
        target = target()
    return as_hook(spec, target)


def _usable_inputs(inputs: Any, count: int) -> bool:
    if not isinstance(inputs, list) or len(inputs) != count:
        return False
    for item in inputs:
        if isinstance(item, str):
            continue
        if not isinstance(item, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in item
        ):
            return False
    return True


class Hooks:
    """The hooks of one app, with their timeout, failure mode and metrics."""

    def __init__(
        self,
        hooks: Sequence[_Hook],
        *,
        timeout_s: float,
        failure: Literal["open", "closed"],
        metrics: Metrics,
    ) -> None:
        self._hooks = list(hooks)
        self._timeout_s = timeout_s
        self._fail_closed = failure == "closed"
        self._metrics = metrics
        self._executor: ThreadPoolExecutor | None = None
        self._sync_pending = 0
        self.has_before = any(h.before is not None for h in self._hooks)
        self.has_after = any(h.after is not None for h in self._hooks)

    @property
    def names(self) -> list[str]:
        return [h.name for h in self._hooks]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def before(self, ctx: HookContext) -> None:
        """Run every ``before`` in order; ``ctx.inputs`` ends as the last good call left it."""
        await self._run("before", ctx)

    async def after(self, ctx: HookContext) -> None:
        await self._run("after", ctx)

    async def _run(self, phase: Phase, ctx: HookContext) -> None:
        for hook in self._hooks:
            fn = hook.before if phase == "before" else hook.after
            if fn is None:
                continue
            # Each call gets its own ctx (a copy of the list too), so a call that fails or is
            # still running after its timeout leaves the request's inputs as they were.
            call_ctx = replace(ctx, inputs=list(ctx.inputs))
            started = time.perf_counter()
            try:
                await self._call(fn, call_ctx, hook.inline)
                if phase == "before" and not _usable_inputs(call_ctx.inputs, len(ctx.inputs)):
                    raise HookError(
                        "before() left ctx.inputs unusable: it must stay a list of the same "
                        "length, of texts or token-id lists"
                    )
            except ValueError as exc:
                self._observe(hook, phase, started)
                self._metrics.hook_rejections.labels(hook.name, phase).inc()
                raise errors.validation(str(exc) or f"refused by hook {hook.name}") from exc
            except TimeoutError:
                self._observe(hook, phase, started)
                self._failed(hook, phase, ctx, "timeout", None)
                continue
            except Exception as exc:
                self._observe(hook, phase, started)
                self._failed(hook, phase, ctx, "error", exc)
                continue
            self._observe(hook, phase, started)
            ctx.inputs = call_ctx.inputs

    def _observe(self, hook: _Hook, phase: Phase, started: float) -> None:
        self._metrics.hook_duration.labels(hook.name, phase).observe(time.perf_counter() - started)

    def _failed(
        self,
        hook: _Hook,
        phase: Phase,
        ctx: HookContext,
        reason: Literal["error", "timeout"],
        exc: BaseException | None,
    ) -> None:
        self._metrics.hook_failures.labels(hook.name, phase, reason).inc()
        what = (
            f"took longer than HOOK_TIMEOUT={self._timeout_s * 1000:g}ms"
            if reason == "timeout"
            else f"failed: {exc!r}"
        )
        log.error(
            "hook %s %s() %s (request %s); HOOK_FAILURE=%s",
            hook.name,
            phase,
            what,
            ctx.request_id,
            "closed" if self._fail_closed else "open",
            exc_info=exc if reason == "error" else None,
        )
        if self._fail_closed:
            raise ApiError(500, f"hook {hook.name} {phase}() {reason}", ErrorType.BACKEND)

    async def _call(self, fn: Callable[[HookContext], Any], ctx: HookContext, inline: bool) -> None:
        if inspect.iscoroutinefunction(fn):
            await asyncio.wait_for(fn(ctx), self._timeout_s)
            return
        if inline:
            fn(ctx)
            return
        if self._sync_pending >= _MAX_SYNC_PENDING:
            raise TimeoutError  # the pool is held by calls that overran: never queue more
        if self._executor is None:
            self._executor = ThreadPoolExecutor(_SYNC_THREADS, thread_name_prefix="hook")
        self._sync_pending += 1
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, ctx)
        future.add_done_callback(self._sync_done)
        result = await asyncio.wait_for(asyncio.shield(future), self._timeout_s)
        if inspect.isawaitable(result):  # a sync-looking callable that returned a coroutine
            await asyncio.wait_for(_awaited(result), self._timeout_s)

    def _sync_done(self, _future: asyncio.Future[Any]) -> None:
        self._sync_pending -= 1


async def _awaited(value: Awaitable[Any]) -> None:
    await value


# -- built-in hooks, also examples of the interface -------------------------------------------


class LatencyGuard:
    """An ``after`` hook that fails requests whose vectors are unusable, and flags slow ones.

    * Every vector must be finite (no NaN or infinity), else 422.
    * Each vector's L2 norm must lie within ``[min_norm, max_norm]`` (a zero vector, or one
      that exploded), else 422.
    * A request slower than ``max_latency_s`` is logged and marked in ``ctx.state["slow"]``;
      with ``fail_slow=True`` it fails with 422 instead (an SLO enforced, not only watched).

    ``HOOKS=proxy.hooks:LatencyGuard`` uses the defaults; for others, make an instance in
    your own module (``guard = LatencyGuard(max_latency_s=0.2)``) and name that.
    """

    def __init__(
        self,
        *,
        max_latency_s: float = 1.0,
        min_norm: float = 1e-6,
        max_norm: float = 1e6,
        fail_slow: bool = False,
    ) -> None:
        self.max_latency_s = max_latency_s
        self.min_norm = min_norm
        self.max_norm = max_norm
        self.fail_slow = fail_slow

    def after(self, ctx: HookContext) -> None:
        for index, vector in enumerate(ctx.vectors or ()):
            if vector is None:  # an item /batch already answered with its own error
                continue
            total = 0.0
            for value in vector:
                total += float(value) * float(value)
            norm = math.sqrt(total)
            if not math.isfinite(norm):
                raise ValueError(f"embedding {index} is not finite (NaN or infinity)")
            if not self.min_norm <= norm <= self.max_norm:
                raise ValueError(
                    f"embedding {index} has norm {norm:.3g}, outside "
                    f"[{self.min_norm:g}, {self.max_norm:g}]"
                )
        latency = ctx.latency_s or 0.0
        if latency > self.max_latency_s:
            ctx.state["slow"] = True
            if self.fail_slow:
                raise ValueError(
                    f"took {latency:.3f}s, over the {self.max_latency_s:g}s latency budget"
                )
            log.warning(
                "request %s took %.3fs, over the %gs latency budget",
                ctx.request_id,
                latency,
                self.max_latency_s,
            )
