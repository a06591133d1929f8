"""Serving with an explicit lifecycle: bind, start, serve, drain on SIGTERM/SIGINT or
POST /shutdown.

The listening socket is bound first, before anything is loaded or connected, so a taken port
is one clear error at once. On a stop request the listener stays open while the proxy drains,
so `/health` can say "draining" (readiness false) and new requests get a clear 503 instead of
a refused connection; queued items are dispatched and calls in flight awaited for at most
SHUTDOWN_TIMEOUT; whatever is left is answered 503; then the process exits 0.

Slow and idle clients are bounded here too: KEEPALIVE_TIMEOUT (aiohttp's own knob),
HEADER_READ_TIMEOUT and MAX_CONNECTIONS (small additions to aiohttp's connection handler,
below). BODY_READ_TIMEOUT is enforced by the app's front middleware.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import inspect
import logging
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial, update_wrapper
from typing import Any, cast

import orjson
from aiohttp import hdrs, web, web_app, web_protocol
from aiohttp.helpers import ceil_timeout
from aiohttp.http import HttpRequestParser, RawRequestMessage, StreamWriter
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.tcp_helpers import tcp_keepalive
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_urldispatcher import SystemRoute
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.app import close, create_app, drain
from proxy.errors import ApiError
from proxy.http.keys import DRAINING, REGISTRY, SHUTDOWN
from proxy.settings import Settings

log = logging.getLogger("proxy")

_HEARTBEAT_INTERVAL_S = 1.0
# How long a refused connection stays open to read what the client sent, so closing it does
# not reset the connection before the client read our 503.
_REFUSED_LINGER_S = 2.0


class ListenError(Exception):
    """The proxy cannot listen where the settings say; the message is the one line to show."""


def bind_listener(settings: Settings) -> socket.socket:
    """Bind and listen on HOST:PORT, without SO_REUSEPORT: a port already in use is an error
    here, before anything else starts, not a second server sharing the port silently."""
    host, port = settings.host, settings.port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # SO_REUSEADDR only lets a restart bind over connections in TIME_WAIT; it never lets
        # two listeners share the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(settings.backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(f"port {port} on {host} is already in use") from exc
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


@dataclass(frozen=True, slots=True)
class Supervision:
    """How a worker process talks to its supervisor (WORKERS > 1)."""

    beat: Callable[[], None]  # called every second from the event loop: "not hung"
    stop_all: Callable[[], None]  # POST /shutdown reached this worker: stop every worker
    supervisor_alive: Callable[[], bool]


def run(
    settings: Settings,
    *,
    sock: socket.socket | None = None,
    supervision: Supervision | None = None,
) -> None:
    """Serve until stopped, on the event loop the settings ask for."""
    main = serve(settings, sock=sock, supervision=supervision)
    if settings.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            main.close()
            raise RuntimeError(
                "EVENT_LOOP=uvloop, but uvloop is not installed: pip install '.[fast]'"
            ) from None
        uvloop.run(main)
        return
    asyncio.run(main)


# -- connection handling: header read bound and connection cap ------------------------------


class _MessageQueue(list[Any]):
    """The deque operations aiohttp's RequestHandler uses on its parsed-message queue, on a
    list: a connection holds one message at a time but for pipelining."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


class _Chunks(list[bytes]):
    """The deque operations aiohttp's StreamReader uses on its buffer of body chunks, on a
    list: a whole body usually arrives as one chunk, and a deque takes ~600 bytes."""

    __slots__ = ()

    def popleft(self) -> bytes:
        return self.pop(0)

    def appendleft(self, chunk: bytes) -> None:
        self.insert(0, chunk)


# A new parser for a connection, as aiohttp's RequestHandler makes it; None when this aiohttp
# makes its parser in a way we do not copy (then connections keep theirs, as aiohttp does).
ParserFactory = Callable[[RequestHandler], Any]


def _parser_factory(handler_kwargs: dict[str, Any]) -> ParserFactory | None:
    try:
        defaults = {
            name: p.default
            for name, p in inspect.signature(RequestHandler.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
    except (TypeError, ValueError):
        return None
    opts = {**defaults, **handler_kwargs}
    names = ("read_bufsize", "max_line_size", "max_field_size", "max_headers", "auto_decompress")
    if not all(name in opts for name in names):
        return None
    kwargs: dict[str, Any] = {
        "max_line_size": opts["max_line_size"],
        "max_field_size": opts["max_field_size"],
        "max_headers": opts["max_headers"],
        "payload_exception": RequestPayloadError,
        "auto_decompress": opts["auto_decompress"],
    }
    queue_size = getattr(web_protocol, "MAX_MSG_QUEUE_SIZE", None)
    if queue_size is not None:
        kwargs["max_msg_queue_size"] = queue_size
    limit = opts["read_bufsize"]

    def make(handler: RequestHandler) -> Any:
        return HttpRequestParser(handler, handler._loop, limit, **kwargs)

    return make


# Bytes kept while a request's header block is still arriving, to find where it ends; a
# longer one is not followed (its connection keeps its parser, as with aiohttp).
_MAX_TRACKED_HEAD = 32 * 1024


def _head_length(data: bytes) -> int:
    """The length of the header block that ``data`` starts with (up to and including the
    first empty line, CRLF or bare LF), or -1 when it is not all there."""
    if data[:1] in (b"\r", b"\n"):
        return -1  # empty lines before the request line: not worth following
    crlf, lf = data.find(b"\n\r\n"), data.find(b"\n\n")
    if crlf < 0:
        return lf + 2 if lf >= 0 else -1
    return crlf + 3 if lf < 0 or crlf < lf else lf + 2


# aiohttp's private pieces that :meth:`_Handler._serve` uses as its own start() does; with an
# aiohttp that lacks one, connections run aiohttp's start() as they are.
_ERR_INFO = getattr(web_protocol, "_ErrInfo", None)
_ERROR_MESSAGE = getattr(web_protocol, "ERROR", None)
_PAYLOAD_ACCESS_ERROR = getattr(web_protocol, "_PAYLOAD_ACCESS_ERROR", None)
_TASK_PER_REQUEST = (
    _ERR_INFO is not None
    and _ERROR_MESSAGE is not None
    and _PAYLOAD_ACCESS_ERROR is not None
    and all(
        hasattr(RequestHandler, name)
        for name in ("_make_error_handler", "finish_response", "handle_error")
    )
)


# Header values that most requests repeat, kept once for all the requests held instead of
# once each (~400 bytes a request): only of these headers (never credentials or cookies),
# short ones, and at most _MAX_SHARED distinct values (then the table starts over).
_SHARED_HEADERS = frozenset(
    (
        hdrs.ACCEPT,
        hdrs.ACCEPT_ENCODING,
        hdrs.ACCEPT_LANGUAGE,
        hdrs.CONNECTION,
        hdrs.CONTENT_LENGTH,
        hdrs.CONTENT_TYPE,
        hdrs.HOST,
        hdrs.USER_AGENT,
    )
)
_MAX_SHARED = 1024
_shared_values: dict[str, str] = {}


def _share_values(headers: CIMultiDictProxy[str]) -> CIMultiDictProxy[str]:
    shared = _shared_values
    items = []
    for name, value in headers.items():
        if name in _SHARED_HEADERS and len(value) <= 256:
            kept = shared.get(value)
            if kept is None:
                if len(shared) >= _MAX_SHARED:
                    shared.clear()
                kept = shared[value] = value
            value = kept
        items.append((name, value))
    return CIMultiDictProxy(CIMultiDict(items))


class _Handler(RequestHandler):
    """aiohttp's connection handler, plus:

    * a bound on the time a request's headers may take once their first byte arrived
      (aiohttp has none: a client sending a byte a second keeps its connection for the whole
      keep-alive timeout);
    * less memory per request held. Once a request has been parsed whole and nothing after
      it was received, its connection's parser (~1.6 KB with what it keeps of the request)
      is dropped until more bytes arrive; so are the request's raw header bytes (the app
      reads ``request.headers``; ``request.raw_headers`` is empty) and its body's deque,
      and common header values are shared between requests (``_share_values``).
      To know that nothing followed, the bytes of each request are counted: its header
      block and its body must add up to what was read. A connection that pipelines past a
      request keeps its parser, as with aiohttp;
    * one task per request, and none while the connection is idle: aiohttp runs a task per
      connection that waits for requests and starts another for each (so that each sees a
      fresh copy of the context variables); here each request is handled by a task made
      when it is parsed, which gives the same fresh copy. Nor a keep-alive timer per
      connection (~240 bytes): one sweep per server closes the idle ones."""

    # RequestHandler has slots: without these, every connection would also carry a __dict__.
    __slots__ = (
        "_body",
        "_counted",
        "_fed",
        "_head",
        "_head_prefix",
        "_header_timeout_s",
        "_header_timer",
        "_in_request",
        "_limits",
        "_new_parser",
    )

    def __init__(self, manager: _Server, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        if type(self._messages) is deque and not self._messages:
            # Requests parsed and not yet handled: rarely more than one, yet a deque takes
            # ~700 bytes from the start; with 10,000 connections held that is 7 MB.
            self._messages = _MessageQueue()  # type: ignore[assignment]
        self._limits = manager
        self._header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None  # of the last request parsed
        self._counted = True  # released once, in connection_lost
        self._new_parser = manager.new_parser
        # The request the parser is on: bytes read since it began (-1: not followed, the
        # parser stays), its header block's length once known (-1 before) and the bytes of
        # that block read so far, and whether its headers are parsed.
        self._fed = 0 if self._new_parser is not None else -1
        self._head = -1
        self._head_prefix = b""
        self._in_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not _TASK_PER_REQUEST:
            super().connection_made(transport)
            return
        # RequestHandler.connection_made without its task waiting for the first request.
        super(RequestHandler, self).connection_made(transport)
        real_transport = cast(asyncio.Transport, transport)
        if self._tcp_keepalive:
            tcp_keepalive(real_transport)
        assert self._manager is not None
        self._manager.connection_made(self, real_transport)
        # A connection that never sends a request ends too. No timer of its own: the
        # server's sweep (_Server._sweep) closes connections idle past this time.
        self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
        self._limits.sweep_soon()
        self._limits.share_addresses(transport)

    def idle_past(self, now: float) -> None:
        """Close this connection if it has been idle since its keep-alive time ran out."""
        if (
            now >= self._next_keepalive_close_time
            and self._task_handler is None
            and not self._messages
            and not self._force_close
        ):
            self.force_close()

    def _next_request(self) -> None:
        if (
            _TASK_PER_REQUEST
            and self._messages
            and self._task_handler is None
            and not self._force_close
            and not self._close
        ):
            self._task_handler = self._loop.create_task(self._serve())

    async def _serve(self) -> None:
        """One request, as an iteration of aiohttp's RequestHandler.start() (aiohttp 3.14),
        with the request handled in this task instead of one more."""
        # Few locals: this frame is kept by every request held (8 bytes each).
        assert self._manager is not None
        assert self._request_factory is not None
        assert self._request_handler is not None
        parsed, payload = self._messages.popleft()
        if self._parser is not None:
            self._parser.message_consumed()
        if getattr(self, "_buffer_paused", False) and len(self._messages) <= getattr(
            self, "_msg_queue_resume_size", 0
        ):
            self._resume_reading_if_drained()
        # Only needed for the access log.
        start = self._loop.time() if self._logging_enabled else None
        self._manager.requests_count += 1
        if isinstance(parsed, RawRequestMessage):
            request_handler = self._request_handler
        else:  # a request aiohttp could not parse: its 400
            request_handler = self._make_error_handler(parsed)
            parsed = cast(RawRequestMessage, _ERROR_MESSAGE)
        request = self._request_factory(
            parsed,
            payload,
            self,
            StreamWriter(self, self._loop),
            cast("asyncio.Task[None]", asyncio.current_task(self._loop)),
        )
        resp: web.StreamResponse | None = None
        keep = False
        try:
            # RequestHandler._handle_request, inline: one coroutine frame less per request.
            try:
                self._request_in_progress = True
                try:
                    try:
                        self._current_request = request
                        if request_handler is self._limits.app_handler:
                            # Application._handle, inline: one coroutine frame less.
                            request_handler = await self._limits.route(request)
                            if isinstance(request_handler, web.StreamResponse):
                                resp = request_handler
                            else:
                                resp = await request_handler(request)
                        else:
                            resp = await request_handler(request)
                    finally:
                        self._current_request = None
                except web.HTTPException as exc:
                    resp, reset = await self.finish_response(request, exc, start)
                except asyncio.CancelledError:
                    raise
                except TimeoutError as exc:
                    self.log_debug("Request handler timed out.", exc_info=exc)
                    resp = self.handle_error(request, 504)
                    resp, reset = await self.finish_response(request, resp, start)
                except Exception as exc:
                    resp = self.handle_error(request, 500, exc)
                    resp, reset = await self.finish_response(request, resp, start)
                else:
                    resp, reset = await self.finish_response(request, resp, start)
                finally:
                    self._request_in_progress = False
                    if self._handler_waiter is not None:
                        self._handler_waiter.set_result(None)
            except ConnectionError:  # from handle_error or finish_response: given up
                self.log_debug("Ignored premature client disconnection")
                return
            if reset:
                self.log_debug("Ignored premature client disconnection 2")
                return
            self._keepalive = bool(resp.keep_alive)
            if not payload.is_eof():
                await self._linger(payload)
            payload.set_exception(cast(BaseException, _PAYLOAD_ACCESS_ERROR))
            keep = self._keepalive and not self._close and not self._force_close
        except asyncio.CancelledError:
            self.log_debug("Ignored premature client disconnection")
            self.force_close()
            raise
        except Exception as exc:
            self.log_exception("Unhandled exception", exc_info=exc)
            self.force_close()
        except BaseException:
            self.force_close()
            raise
        finally:
            request._task = None  # type: ignore[assignment]  # no reference cycle
            if self.transport is None and resp is not None:
                self.log_debug("Ignored premature client disconnection.")
            if self._task_handler is asyncio.current_task(self._loop):
                self._task_handler = None
            if not keep and not self._force_close and self.transport is not None:
                self.transport.close()
        if not keep:
            return
        self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
        self._next_request()  # pipelined behind this one

    async def _linger(self, payload: StreamReader) -> None:
        """The rest of a body the handler left unread, read and dropped for up to
        lingering_time, so the connection can serve its next request (aiohttp's start())."""
        lingering_time = self._lingering_time
        if not self._force_close and lingering_time:
            self.log_debug("Start lingering close timer for %s sec.", lingering_time)
            now = self._loop.time()
            end_t = now + lingering_time
            try:
                while not payload.is_eof() and now < end_t:
                    async with ceil_timeout(end_t - now):
                        await payload.readany()
                    now = self._loop.time()
            except (TimeoutError, asyncio.CancelledError):
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
        if not payload.is_eof() and not self._force_close:
            self.log_debug("Uncompleted request.")
            self.close()

    def data_received(self, data: bytes) -> None:
        if self._parser is None and self._payload_parser is None and not self._upgraded:
            if not data or self._force_close or self._close or self._new_parser is None:
                return  # nothing to parse (a dropped parser held nothing), or closing
            self._parser = self._new_parser(self)
        in_body = self._body is not None and not self._body.is_eof()
        parsed = self._request_count
        super().data_received(data)
        self._next_request()
        if not data:
            return
        if self._request_count > parsed:  # a request's headers are complete
            if self._messages:
                self._body = self._messages[-1][1]
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
        elif not in_body and self._header_timer is None:
            # Bytes that are neither a body nor a whole request: headers have begun.
            self._header_timer = self._loop.call_later(
                self._header_timeout_s, self._headers_too_slow, self._request_count
            )
        if self._fed >= 0:
            self._follow(data, self._request_count - parsed)

    def _follow(self, data: bytes, new: int) -> None:
        """Count ``data`` into the request the parser is on; drop the parser when that
        request is whole and ended exactly with ``data``."""
        if new > 1 or (new and self._in_request) or self._parser is None:
            self._fed = -1  # a request ended inside these bytes and another began
            return
        self._fed += len(data)
        if self._head < 0:
            head = self._head_prefix + data
            self._head = _head_length(head)
            if self._head < 0:
                self._head_prefix = head
                if new or len(head) > _MAX_TRACKED_HEAD:
                    self._fed = -1
                return
            self._head_prefix = b""
        if new:
            msg, payload = self._messages[-1] if self._messages else (None, None)
            if (
                not isinstance(msg, RawRequestMessage)  # aiohttp's stand-in for a 400
                or msg.should_close
                or msg.upgrade
                or msg.chunked
                or msg.compression is not None
                or (payload is not EMPTY_PAYLOAD and type(payload) is not StreamReader)
            ):
                self._fed = -1
                return
            self._in_request = True
        elif not self._in_request:
            self._fed = -1  # a whole header block that the parser did not take as one
            return
        body = self._body
        if body is None or not body.is_eof():
            return  # the body is still arriving
        if self._fed != self._head + (0 if body is EMPTY_PAYLOAD else body.total_bytes):
            self._fed = -1  # the parser holds bytes past this request
            return
        self._parser = None  # made again when the next bytes arrive
        self._fed, self._head, self._in_request = 0, -1, False
        if type(body) is StreamReader and type(body._buffer) is deque:
            body._buffer = _Chunks(body._buffer)  # type: ignore[assignment]
        if new and self._messages:  # still queued: the request is not made yet
            msg, payload = self._messages[-1]
            if isinstance(msg, RawRequestMessage):
                headers = _share_values(msg.headers)
                self._messages[-1] = (msg._replace(raw_headers=(), headers=headers), payload)

    def _headers_too_slow(self, parsed: int) -> None:
        self._header_timer = None
        if (
            self._request_count == parsed  # still not complete
            and not self._request_in_progress  # pipelined behind a request: not idle
            and not self._messages
            and self.transport is not None
        ):
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            )
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._counted:
            self._counted = False
            self._limits.open_connections -= 1
        super().connection_lost(exc)


class _Refused(asyncio.Protocol):
    """A connection over MAX_CONNECTIONS: answered 503 at once and closed. What the client
    sends meanwhile is read and dropped, so closing does not reset the connection before the
    client has read the answer."""

    def __init__(self, response: bytes) -> None:
        self._response = response
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(self._response)
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(_REFUSED_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the client is done too: close

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _refusal() -> bytes:
    body = orjson.dumps({"error": "too many open connections", "error_type": "Overloaded"})
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class _Server(web.Server):
    """aiohttp's low-level server, making :class:`_Handler` connections up to a cap."""

    def __init__(
        self,
        handler: Any,
        *,
        max_connections: int,
        header_timeout_s: float,
        request_factory: Any,
        handler_cancellation: bool,
        **handler_kwargs: Any,
    ) -> None:
        super().__init__(
            handler,
            request_factory=request_factory,
            handler_cancellation=handler_cancellation,
            **handler_kwargs,
        )
        self._handler_kwargs = handler_kwargs
        self.new_parser = _parser_factory(handler_kwargs)
        self._max_connections = max_connections
        self._header_timeout_s = header_timeout_s
        self._refusal = _refusal()
        self.open_connections = 0
        # Idle connections are looked for this often: they close at most this late.
        keepalive = float(handler_kwargs.get("keepalive_timeout", 75.0))
        self._sweep_s = min(1.0, max(0.05, keepalive / 10))
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._addresses: dict[Any, Any] = {}
        # The app whose routing _Handler._serve does inline (see route), or None.
        self._app: web.Application | None = None
        self.app_handler: Any = None

    def inline_routing(self, app: web.Application) -> None:
        if (
            _TASK_PER_REQUEST
            and all(
                hasattr(app, name)
                for name in ("_router", "_run_middlewares", "_has_legacy_middlewares")
            )
            and all(hasattr(web_app, name) for name in ("_cached_build_middleware", "SystemRoute"))
        ):
            self._app = app
            self.app_handler = self.request_handler

    async def route(self, request: web.BaseRequest) -> Any:
        """What aiohttp's Application._handle does before it calls the handler (aiohttp
        3.14): the handler wrapped in its middlewares, or the answer to ``Expect``."""
        app = self._app
        assert app is not None
        match_info = await app._router.resolve(request)  # type: ignore[arg-type]
        match_info.add_app(app)
        match_info.freeze()
        request._match_info = match_info  # type: ignore[attr-defined]
        if request.headers.get(hdrs.EXPECT):
            resp = await match_info.expect_handler(cast(web.Request, request))
            await request.writer.drain()
            if resp is not None:
                return resp
        handler: Any = match_info.handler
        if app._run_middlewares:
            if not app._has_legacy_middlewares and not isinstance(match_info.route, SystemRoute):
                handler = web_app._cached_build_middleware(handler, match_info.apps)
            else:
                for each in match_info.apps[::-1]:
                    for m, new_style in each._middlewares_handlers or ():
                        if new_style:
                            handler = update_wrapper(partial(m, handler=handler), handler)
                        else:
                            handler = await m(each, handler)  # type: ignore[arg-type]
        return handler

    def share_addresses(self, transport: asyncio.BaseTransport) -> None:
        """One copy of the listening address and of each client host for all the
        connections (asyncio keeps both per connection: ~170 bytes)."""
        extra = getattr(transport, "_extra", None)
        if type(extra) is not dict:
            return
        shared = self._addresses
        if len(shared) >= _MAX_SHARED:
            shared.clear()
        sockname = extra.get("sockname")
        if type(sockname) is tuple:
            extra["sockname"] = shared.setdefault(sockname, sockname)
        peername = extra.get("peername")
        if type(peername) is tuple and peername and type(peername[0]) is str:
            host = shared.setdefault(peername[0], peername[0])
            if host is not peername[0]:
                extra["peername"] = (host, *peername[1:])

    def sweep_soon(self) -> None:
        if self._sweep_handle is None:
            loop = asyncio.get_running_loop()
            self._sweep_handle = loop.call_later(self._sweep_s, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweep_handle = None
        now = loop.time()
        for handler in self.connections:
            if isinstance(handler, _Handler):
                handler.idle_past(now)
        if self._connections:
            self.sweep_soon()

    def __call__(self) -> RequestHandler:
        if self.open_connections >= self._max_connections:
            return _Refused(self._refusal)  # type: ignore[return-value]
        # Counted when made, not when connected: a burst is accepted within one loop turn.
        self.open_connections += 1
        return _Handler(
            self,
            loop=asyncio.get_running_loop(),
            header_timeout_s=self._header_timeout_s,
            **self._handler_kwargs,
        )


def _drop_current_app_wrapper(app: web.Application) -> None:
    """aiohttp wraps every handler in one more middleware, which points
    ``request.match_info.current_app`` at the sub-application being run; with no
    sub-application it is the app already, and the wrapper's coroutine frame (~350 bytes) is
    held by every request waiting for its answer."""
    handlers = getattr(app, "_middlewares_handlers", None)
    if getattr(app, "_subapps", True) or not handlers:
        return
    last = handlers[-1][0]
    if getattr(last, "__qualname__", "").startswith("_fix_request_current_app."):
        app._middlewares_handlers = handlers[:-1]


class _Runner(web.AppRunner):
    """An AppRunner whose server is :class:`_Server`."""

    def __init__(
        self, app: web.Application, *, max_connections: int, header_timeout_s: float, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self._max_connections = max_connections
        self._header_timeout_s = header_timeout_s

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # runs the app's start-up and freezes it
        _drop_current_app_wrapper(self._app)
        kwargs = dict(self._kwargs)  # handler_cancellation, access_log, keepalive_timeout, ...
        server = _Server(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=kwargs.pop("handler_cancellation", False),
            max_connections=self._max_connections,
            header_timeout_s=self._header_timeout_s,
            **kwargs,
        )
        if base.request_handler == self._app._handle:
            server.inline_routing(self._app)
        return server


# -- the lifecycle ---------------------------------------------------------------------------


async def _supervised(supervision: Supervision, stop: asyncio.Event) -> None:
    # A loop that stops turning stops beating: the supervisor restarts the worker. A worker
    # whose supervisor died stops too, rather than serve on unsupervised.
    while True:
        supervision.beat()
        if not supervision.supervisor_alive():
            log.warning("the supervisor is gone: stopping")
            stop.set()
            return
        await asyncio.sleep(_HEARTBEAT_INTERVAL_S)


async def _reload(app: web.Application) -> None:
    registry = app.get(REGISTRY)
    if registry is None or app[DRAINING].is_set():
        log.warning("SIGHUP ignored: the proxy is starting or stopping")
        return
    if registry.config_path is None:
        log.warning("SIGHUP ignored: MODELS_CONFIG is not set")
        return
    log.info("SIGHUP: reloading MODELS_CONFIG %s", registry.config_path)
    try:
        summary = await registry.reload()
    except ApiError as exc:
        log.error("reload refused, nothing changed: %s", exc.message)
    else:
        log.info("reload applied: %s", summary)


# The young generation's threshold (CPython's default is 700). With hundreds of requests in
# flight, each holding a few dozen tracked objects, 700 net allocations went by every few
# requests: collections ran back to back and their survivors fed gen1 and gen2 collections
# of 4-50 ms. At 256 clients that was about 1.9 s of collector time per 40,000 requests
# (benchmarks/README.md). Cycles are still collected, in fewer, larger rounds.
GC_THRESHOLDS = (10_000, 10, 10)


def tune_gc() -> None:
    """Once serving: what start-up made (modules, settings, the registry, a loaded model)
    lives as long as the process, so full collections stop scanning it (``gc.freeze``),
    and the young generation is collected less often (:data:`GC_THRESHOLDS`)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(
    settings: Settings,
    *,
    sock: socket.socket | None = None,
    supervision: Supervision | None = None,
) -> None:
    if sock is None:
        sock = bind_listener(settings)
    app = create_app(settings)
    stop = app[SHUTDOWN]
    by_signal = False

    def on_signal() -> None:
        nonlocal by_signal
        by_signal = True
        stop.set()

    reloads: set[asyncio.Task[None]] = set()

    def on_hangup() -> None:
        # SIGHUP: re-read MODELS_CONFIG, as POST /admin/reload does.
        task = asyncio.ensure_future(_reload(app))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    beating = (
        asyncio.ensure_future(_supervised(supervision, stop)) if supervision is not None else None
    )

    # The drain gets most of SHUTDOWN_TIMEOUT; the rest lets handlers write their answers
    # once the runner stops, so the whole shutdown stays within the setting. The runner waits
    # up to twice its shutdown_timeout (for handlers, then for their cancellation).
    finish_s = min(2.0, settings.shutdown_timeout * 0.2)
    drain_s = settings.shutdown_timeout - finish_s
    runner = _Runner(
        app,
        handler_cancellation=True,  # a caller that disconnects is dropped from the queue
        access_log=None,  # the app's middleware logs requests (ACCESS_LOG)
        shutdown_timeout=finish_s / 2,
        keepalive_timeout=settings.keepalive_timeout,
        max_connections=settings.max_connections,
        header_timeout_s=settings.header_read_timeout,
    )
    try:
        # Start-up may wait a long time for TEI to load its model; a stop request must work.
        setup = asyncio.ensure_future(runner.setup())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({setup, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not setup.done():
            log.info("stop requested during start-up")
            setup.cancel()
            await asyncio.gather(setup, return_exceptions=True)
            await runner.cleanup()
            return
        stopped.cancel()
        setup.result()  # re-raise a start-up failure

        site = web.SockSite(runner, sock, backlog=settings.backlog)
        await site.start()
        tune_gc()
        log.info(
            "listening on http://%s:%d (upstream: %s)",
            settings.host,
            settings.port,
            settings.effective_upstream_kind,
        )
        await stop.wait()
        if supervision is not None and not by_signal and supervision.supervisor_alive():
            # POST /shutdown reached this worker: the whole server drains, not one worker
            # that the supervisor would then restart.
            supervision.stop_all()

        started = time.monotonic()
        log.info("draining: finishing accepted work (up to %.1fs)", settings.shutdown_timeout)
        # Exactly one drain, bounded; the app's own cleanup later finds it done.
        if not await drain(app, drain_s):
            log.warning("SHUTDOWN_TIMEOUT reached: answering what is left with 503")
        # Closing the service fails whatever is still queued or in flight, so every waiting
        # handler has an answer to write while its connection is still open; only then does
        # the runner close the connections.
        await close(app)
        await runner.cleanup()
        log.info("stopped after draining for %.2fs", time.monotonic() - started)
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        for task in reloads:
            task.cancel()
        if beating is not None:
            beating.cancel()
        sock.close()
