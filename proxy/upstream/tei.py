"""TEI over HTTP: ``POST /embed``, ``GET /info`` and ``GET /health`` on one or more replicas."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import aiohttp
import orjson

from proxy.errors import (
    REFUSAL_STATUSES,
    ApiError,
    ErrorType,
    bad_upstream,
    timeout,
    unavailable,
    upstream_refused,
)
from proxy.tracing import outgoing_headers
from proxy.upstream.base import EmbedInput, EmbedOptions, RawVector, UpstreamInfo, Vector

log = logging.getLogger(__name__)

T = TypeVar("T")

_STARTUP_RETRY_MAX_S = 5.0


def _json_dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


class NotReadyError(Exception):
    """The upstream is not serving yet; start-up waits and asks again."""


class HttpReplica:
    """One server of an HTTP upstream. Calls go through its upstream's pooled session.

    ``base_url`` is read at each call, so it may be changed while running (tests do).
    """

    __slots__ = ("_upstream", "base_url")

    def __init__(self, upstream: HttpUpstreamBase, base_url: str) -> None:
        self.base_url = base_url
        self._upstream = upstream

    @property
    def name(self) -> str:
        return self.base_url

    async def embed(self, inputs: Sequence[EmbedInput], options: EmbedOptions) -> list[Vector]:
        return await self._upstream.embed_at(self.base_url, inputs, options)

    async def health(self) -> bool:
        return await self._upstream.health_at(self.base_url)

    def __repr__(self) -> str:
        return f"HttpReplica({self.base_url!r})"


class HttpUpstreamBase:
    """What the HTTP upstreams share: one pooled session for all their replicas.

    Which replica gets a call is :class:`proxy.resilience.ResilientUpstream`'s choice.
    """

    kind = "http"

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout_s: float = 30.0,
        api_key: str | None = None,
        pool_size: int = 64,
    ) -> None:
        if not urls:
            raise ValueError("at least one upstream URL is needed")
        self._replicas = [HttpReplica(self, u.rstrip("/")) for u in urls]
        self._timeout_s = timeout_s
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self._compute_type: str | None = None
        # Why the last start-up attempt found it not ready (for a refused registration).
        self.last_not_ready: str | None = None

    @property
    def replicas(self) -> Sequence[HttpReplica]:
        return self._replicas

    @property
    def compute_type(self) -> str | None:
        # The last value a replica sent: TEI answers x-compute-type on every success.
        return self._compute_type

    def unsupported(self, options: EmbedOptions) -> str | None:
        return None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._pool_size, keepalive_timeout=30, enable_cleanup_closed=True
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                json_serialize=_json_dumps,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            )
        return self._session

    async def embed_at(
        self, base_url: str, inputs: Sequence[EmbedInput], options: EmbedOptions
    ) -> list[Vector]:
        raise NotImplementedError

    async def health_at(self, base_url: str) -> bool:
        try:
            status, _ = await self._get(base_url, "/health", 2.0)
        except (aiohttp.ClientError, TimeoutError):
            return False
        return status == 200

    async def _post_json(
        self, base_url: str, path: str, payload: dict[str, Any]
    ) -> tuple[int, bytes, str]:
        """POST to one replica; map transport faults to 503/504."""
        try:
            async with self.session.post(
                base_url + path, data=orjson.dumps(payload), headers=outgoing_headers()
            ) as resp:
                body = await resp.read()
                if resp.status == 200 and "x-compute-type" in resp.headers:
                    self._compute_type = resp.headers["x-compute-type"]
                return resp.status, body, resp.headers.get("Content-Type", "")
        except TimeoutError as exc:
            raise timeout(f"upstream did not answer within {self._timeout_s:g}s") from exc
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise unavailable(f"upstream unreachable: {exc.__class__.__name__}") from exc

    async def _get(self, base_url: str, path: str, timeout_s: float) -> tuple[int, bytes]:
        async with self.session.get(
            base_url + path, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            return resp.status, await resp.read()

    async def _until_ready(self, probe: Callable[[], Awaitable[T]], what: str) -> T:
        """Call ``probe`` until it stops raising NotReadyError, backing off and logging.

        Any other exception (e.g. a refused key) ends start-up: retrying cannot fix it.
        """
        delay = 0.2
        attempt = 0
        while True:
            attempt += 1
            try:
                return await probe()
            except NotReadyError as exc:
                self.last_not_ready = str(exc)
                log.warning(
                    "waiting for %s (attempt %d: %s); retrying in %.1fs", what, attempt, exc, delay
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _STARTUP_RETRY_MAX_S)

    async def _from_any_replica(self, read: Callable[[str], Awaitable[T]], what: str) -> T:
        """Start-up: ``read`` from the first replica that answers, asking each in turn until
        one does. A dead replica must not hold the others back."""

        async def probe() -> T:
            reasons = []
            for replica in self._replicas:
                try:
                    return await read(replica.base_url)
                except NotReadyError as exc:
                    reasons.append(f"{replica.base_url}: {exc}")
            raise NotReadyError("; ".join(reasons))

        return await self._until_ready(probe, what)

    async def health(self) -> bool:
        """Healthy when at least one replica is."""
        for replica in self._replicas:
            if await replica.health():
                return True
        return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def tei_error(status: int, body: bytes, content_type: str) -> ApiError:
    """Turn an upstream error answer into ours, keeping TEI's own message and type.

    401, 403, 404 and 405 refuse the proxy's key or route, not the caller's input: they become
    502 ``Upstream`` naming the upstream's answer.
    """
    if status in REFUSAL_STATUSES:
        detail = body.decode("utf-8", "replace").strip()[:200]
        return upstream_refused(status, detail)
    if "json" in content_type:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
            return ApiError(
                status,
                parsed["error"],
                str(parsed.get("error_type") or ErrorType.BACKEND),
                from_upstream=True,
            )
    text = body.decode("utf-8", "replace").strip()[:500] or f"upstream answered {status}"
    error_type = ErrorType.VALIDATION if 400 <= status < 500 else ErrorType.BACKEND
    return ApiError(status, text, error_type, from_upstream=True)


def check_vectors(parsed: Any, expected: int) -> list[Vector]:
    """Accept only a list of ``expected`` equal-length numeric vectors; anything else is a 502.

    Checking each vector's first element and length keeps this cheap; a wrong count or shape
    must never be zipped onto callers.
    """
    if not isinstance(parsed, list):
        raise bad_upstream("upstream answered malformed embeddings: not a list")
    if len(parsed) != expected:
        raise bad_upstream(f"upstream answered {len(parsed)} embeddings for {expected} inputs")
    dim: int | None = None
    for vec in parsed:
        if not isinstance(vec, list) or not vec or not isinstance(vec[0], int | float):
            raise bad_upstream("upstream answered malformed embeddings: not numeric vectors")
        if dim is None:
            dim = len(vec)
        elif len(vec) != dim:
            raise bad_upstream("upstream answered embeddings of different dimensions")
    return parsed


_FIRST_OF_NUMBER = frozenset(b"-0123456789")
_SPACE = frozenset(b" \n\r\t")
_COMMA, _OPEN = ord(","), ord("[")


def split_rows(body: bytes, expected: int) -> list[Vector] | None:
    """TEI's ``[[...],[...]]`` as one :class:`RawVector` per row, by slicing the body at its
    brackets (a number never holds one), or None for anything unexpected, which the caller
    then parses in full. Each row starts with a number and has as many commas as the first;
    that and the count are what :func:`check_vectors` checks of parsed vectors too."""
    if body[:2] != b"[[" or body[-2:] != b"]]":
        return None
    rows: list[RawVector] = []
    find = body.find
    end_of_body = len(body) - 1
    pos = 1
    dim = 0
    while True:
        end = find(b"]", pos)
        if end < 0 or body[pos + 1] not in _FIRST_OF_NUMBER:  # also "[]": not a vector
            return None
        row = body[pos : end + 1]
        commas = row.count(b",")
        if not rows:
            dim = commas + 1
        elif commas + 1 != dim or row.find(b"[", 1) >= 0:
            return None
        rows.append(RawVector(row, dim))
        if end + 1 == end_of_body:
            break
        if body[end + 1] != _COMMA:
            return None
        pos = end + 2
        while body[pos] in _SPACE:  # "], [" (Python's json) as well as "],["
            pos += 1
        if body[pos] != _OPEN:
            return None
    if rows[0].json.find(b"[", 1) >= 0 or len(rows) != expected:
        return None
    return cast(list[Vector], rows)


class TeiUpstream(HttpUpstreamBase):
    kind = "tei"

    def __init__(self, urls: Sequence[str], **kwargs: Any) -> None:
        super().__init__(urls, **kwargs)
        self.info: UpstreamInfo | None = None

    async def start(self) -> UpstreamInfo:
        """Read ``/info`` from any replica, retrying until one answers: TEI binds its port
        only once loaded."""

        async def read_info(base: str) -> UpstreamInfo:
            try:
                status, body = await self._get(base, "/info", min(self._timeout_s, 10.0))
                if status == 200:
                    return UpstreamInfo.from_tei(orjson.loads(body))
            except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
                raise NotReadyError(exc.__class__.__name__) from exc
            if status in (401, 403):
                raise RuntimeError(
                    f"TEI at {base} refused /info with {status}: check UPSTREAM_API_KEY"
                )
            raise NotReadyError(f"HTTP {status}")

        urls = ", ".join(r.base_url for r in self._replicas)
        self.info = await self._from_any_replica(read_info, f"TEI /info at {urls}")
        return self.info

    async def embed_at(
        self, base_url: str, inputs: Sequence[EmbedInput], options: EmbedOptions
    ) -> list[Vector]:
        payload: dict[str, Any] = {"inputs": list(inputs), "normalize": options.normalize}
        if options.truncate is not None:
            payload["truncate"] = options.truncate
        if options.truncation_direction != "Right":
            payload["truncation_direction"] = options.truncation_direction
        if options.prompt_name is not None:
            payload["prompt_name"] = options.prompt_name
        if options.dimensions is not None:
            payload["dimensions"] = options.dimensions
        status, body, content_type = await self._post_json(base_url, "/embed", payload)
        if status != 200:
            raise tei_error(status, body, content_type)
        vectors = split_rows(body, len(inputs))
        if vectors is None:  # not TEI's usual shape: parse it all, and say what is wrong
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise bad_upstream("upstream answered malformed JSON") from exc
            vectors = check_vectors(parsed, len(inputs))
        if options.dimensions is not None and len(vectors[0]) != options.dimensions:
            raise bad_upstream(
                f"upstream answered {len(vectors[0])} dimensions, {options.dimensions} asked"
            )
        return vectors
