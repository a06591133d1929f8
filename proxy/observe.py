"""What the app observes of one request, shared by the front middleware, the handlers, the
hooks, tracing and the JSON logs.

The middleware makes an :class:`Observation` for every request (its id, route and start) and
keeps it in :data:`proxy.logs.REQUEST_CONTEXT` for log lines; the handlers fill in the model
and what was embedded (:mod:`proxy.http.pipeline`); the middleware closes it when the
response is known: per-model metrics and the request's span. The :class:`Observer` is the
app's one object for all of it: hooks, tracing, the status page's counters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.hooks import Hooks
from proxy.metrics import Metrics
from proxy.tracing import RequestSpan, Tracing


@dataclass(slots=True)
class Observation:
    request_id: str
    route: str
    started: float  # time.perf_counter()
    model: str | None = None
    version: str | None = None
    span: RequestSpan | None = None
    # gen_ai.* and other span attributes the handler learnt (model served, dimensions, ...).
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def trace_id(self) -> str | None:
        return self.span.trace_id if self.span is not None else None


OBSERVATION = web.RequestKey("observation", Observation)
_MAX_CHILDREN = 1024


class Observer:
    """The app's hooks and tracing (either may be absent), and the per-model metrics."""

    def __init__(self, metrics: Metrics, hooks: Hooks | None, tracing: Tracing | None) -> None:
        self.metrics = metrics
        self.hooks = hooks
        self.tracing = tracing
        # Labelled children per (model, version, status): labels() takes a lock and builds
        # a tuple on every call, and this runs on every request.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def begin(
        self, request: web.Request, request_id: str, route: str, started: float
    ) -> Observation:
        obs = Observation(request_id, route, started)
        if self.tracing is not None and request.method == "POST":
            obs.span = self.tracing.start_request(
                request.headers, request.method, route, request_id
            )
        return obs

    def end(self, obs: Observation, status: int, elapsed_s: float) -> None:
        if obs.model is not None:
            key = (obs.model, obs.version or "", status)
            children = self._children.get(key)
            if children is None:
                if len(self._children) >= _MAX_CHILDREN:
                    self._children.clear()  # models come and go: keep this bounded
                model, version, _ = key
                children = self._children[key] = (
                    self.metrics.model_requests.labels(model, version, str(status)),
                    self.metrics.model_request_duration.labels(model, version),
                )
            children[0].inc()
            children[1].observe(elapsed_s)
        if obs.span is not None:
            obs.span.finish(status, obs.attributes)
