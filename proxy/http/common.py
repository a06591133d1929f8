"""Rendering and auth helpers shared by every route module."""

from __future__ import annotations

import hmac
import itertools
import re
import sys
import uuid
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.cache import CacheUse
from proxy.errors import ApiError
from proxy.upstream.base import RawVector, Vector

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def _json_default(obj: Any) -> Any:
    if isinstance(obj, RawVector):
        return obj.fragment  # the upstream's own JSON, spliced in as is
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dumps(payload: Any) -> bytes:
    """JSON of a response body: numpy rows and :class:`RawVector` without a per-float copy."""
    # With OPT_SERIALIZE_NUMPY, orjson imports numpy the first time it meets a type of ours
    # (RawVector): ~11 MB and a ~0.1 s stall. No numpy loaded, no numpy row to write.
    option = _JSON_OPTIONS if "numpy" in sys.modules else 0
    return orjson.dumps(payload, default=_json_default, option=option)


def vectors_json(vectors: list[Vector]) -> bytes:
    """``[[...], ...]`` for /embed: the upstream's rows joined when that is what they are."""
    rows = [v.json for v in vectors if type(v) is RawVector]
    if len(rows) == len(vectors):
        return b"[" + b",".join(rows) + b"]"
    return dumps(vectors)


def json_response(
    payload: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=dumps(payload),
        status=status,
        content_type="application/json",
        headers=headers,
    )


# The OpenAI door answers errors in OpenAI's body; every other route in TEI's.
OPENAI_PATHS = ("/v1/embeddings", "/embeddings")


def error_response(exc: ApiError) -> web.Response:
    return json_response(exc.tei_body(), status=exc.status, headers=exc.headers or None)


def openai_error_response(exc: ApiError) -> web.Response:
    return json_response(exc.openai_body(), status=exc.status, headers=exc.headers or None)


def error_response_for(request: web.Request, exc: ApiError) -> web.Response:
    """``exc`` in the body the route's clients expect (for errors raised outside a handler)."""
    if request.path in OPENAI_PATHS:
        return openai_error_response(exc)
    return error_response(exc)


def bearer_matches(request: web.Request, expected: str) -> bool:
    """Constant-time comparison of the request's Bearer token with ``expected``."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), expected.encode())


# An incoming X-Request-ID is kept only when it is short and made of safe characters, so it
# can go into logs and headers as is; anything else is replaced by a fresh id.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:=+/@-]{1,128}")
_UNSAFE_IN_LOG = re.compile(r'[\x00-\x1f\x7f"\\]')


# Fresh ids: a random prefix per process and a counter. Unique without a uuid4 per request
# (an os.urandom call each); they are ids, not secrets.
_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count(1)


def request_id(request: web.Request) -> str:
    incoming = request.headers.get("X-Request-ID")
    if incoming is not None and _SAFE_REQUEST_ID.fullmatch(incoming):
        return incoming
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def escape_for_log(text: str) -> str:
    """``text`` with control characters, quotes, backslashes and non-ASCII escaped, so a
    client-chosen string (a path) cannot start a new log line or fake a field."""
    text = _UNSAFE_IN_LOG.sub(lambda m: f"\\x{ord(m[0]):02x}", text)
    return text.encode("ascii", "backslashreplace").decode("ascii")


def cache_use(headers: CIMultiDictProxy[str]) -> CacheUse:
    """A request's ``Cache-Control``: ``no-cache`` skips the lookups (the vector is still
    stored), ``no-store`` skips both; other directives are ignored."""
    if "Cache-Control" not in headers:
        return CacheUse()
    directives = {
        part.split("=", 1)[0].strip().lower()
        for value in headers.getall("Cache-Control", ())
        for part in value.split(",")
    }
    if "no-store" in directives:
        return CacheUse(read=False, write=False)
    if "no-cache" in directives:
        return CacheUse(read=False, write=True)
    return CacheUse()


def add_cache_headers(response: web.StreamResponse, use: CacheUse) -> None:
    """X-Cache-Hits and X-Cache-Misses (item counts) on a successful answer that a cache
    took part in."""
    if use.counted and response.status < 300:
        response.headers["X-Cache-Hits"] = str(use.hits)
        response.headers["X-Cache-Misses"] = str(use.misses)
