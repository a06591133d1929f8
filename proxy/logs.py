"""Logging set-up: LOG_FORMAT=text (one readable line) or json (one JSON object a line).

JSON lines carry the request id, model and trace id of the request being served when the
line was logged. They come from :data:`REQUEST_CONTEXT`, a context variable the front
middleware sets per request: aiohttp runs each request in its own task, so a line logged
anywhere inside that request (a handler, a hook, a validation error) knows which request it
belongs to, with no argument threaded through. Lines logged by a batch task (which serves
many requests) carry none.
"""

from __future__ import annotations

import logging
import traceback
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from proxy.settings import Settings


class RequestLogContext(Protocol):
    """What a log line may tell about its request (see proxy.observe.Observation)."""

    @property
    def request_id(self) -> str: ...

    @property
    def model(self) -> str | None: ...

    @property
    def trace_id(self) -> str | None: ...


REQUEST_CONTEXT: ContextVar[RequestLogContext | None] = ContextVar(
    "proxy_request_log_context", default=None
)

# LogRecord attributes every record has; anything else was passed with `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the request's id, model and
    trace id when logged inside a request, the worker index with WORKERS > 1, fields passed
    with ``extra=`` (the access log's), and the exception's traceback as one string."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._worker is not None:
            entry["worker"] = self._worker
        context = REQUEST_CONTEXT.get()
        if context is not None:
            entry["request_id"] = context.request_id
            if context.model is not None:
                entry["model"] = context.model
            if context.trace_id is not None:
                entry["trace_id"] = context.trace_id
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return orjson.dumps(entry, default=str).decode()


def configure_logging(settings: Settings, prefix: str = "", worker: int | None = None) -> None:
    """Root logging for this process, in the format LOG_FORMAT asks for. ``prefix`` starts
    each text line (a worker's `[worker N] `); JSON lines say ``worker`` instead."""
    if settings.log_format == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter(worker))
        logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    else:
        logging.basicConfig(
            level=settings.log_level.upper(),
            format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s",
            force=True,
        )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if settings.access_log:  # asked for explicitly: shown whatever LOG_LEVEL says
        logging.getLogger("proxy.access").setLevel(logging.INFO)
