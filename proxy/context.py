"""What travels with each request through the proxy: who asked, for which model, by when.

The front middleware (:mod:`proxy.app`) makes one :class:`RequestContext` per HTTP request;
handlers fill in what the body says (an OpenAI ``model`` or ``user``) and pass it to the
registry, which records the model and version it chose. The per-version service, the shadow
runner and anything hooked in later (a cache keyed on model and version, tracing, capture)
read it rather than the HTTP request, so none of them needs aiohttp.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web

from proxy.cache import CacheUse


@dataclass(slots=True)
class RequestContext:
    request_id: str
    # time.monotonic() instants: when the request arrived, and when it must be answered. The
    # registry sets ``deadline`` when it routes the request (its body read and parsed) from
    # the chosen version's REQUEST_TIMEOUT, never past ``deadline_limit`` (an outer bound
    # such as an async job's lifetime).
    arrived: float = field(default_factory=time.monotonic)
    deadline: float = math.inf
    deadline_limit: float = math.inf
    # What the caller asked for: `name`, `name@version`, or None (the default model).
    requested_model: str | None = None
    # What the registry chose (None until it did).
    model: str | None = None
    version: str | None = None
    # The A/B stickiness key: OpenAI's `user` or the X-User-Id header.
    user: str | None = None
    # Chosen for capture or tracing by whoever samples (observability); the registry never
    # sets it.
    sampled: bool = False
    # The version this request was mirrored to (shadow traffic), once chosen.
    shadow_version: str | None = None
    route: str = ""
    # What the request asks of the cache (its Cache-Control) and what it got (hits and
    # misses, for X-Cache-*). Shared by the parts of one request (a /batch of several
    # models), so the counts are the request's.
    cache: CacheUse = field(default_factory=CacheUse)

    @property
    def served_as(self) -> str | None:
        """``name@version`` once routed: what the X-Model response header says."""
        if self.model is None or self.version is None:
            return None
        return f"{self.model}@{self.version}"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    @classmethod
    def internal(
        cls,
        *,
        timeout_s: float,
        requested_model: str | None = None,
        deadline_limit: float = math.inf,
        request_id: str | None = None,
    ) -> RequestContext:
        """A context for work the proxy starts itself (async jobs, shadow calls, probes)."""
        now = time.monotonic()
        return cls(
            request_id=request_id or uuid.uuid4().hex,
            arrived=now,
            deadline=min(now + timeout_s, deadline_limit),
            deadline_limit=deadline_limit,
            requested_model=requested_model,
        )


CONTEXT = web.RequestKey("context", RequestContext)


def context_of(request: web.Request) -> RequestContext:
    """The request's context, made by the front middleware."""
    return request[CONTEXT]
