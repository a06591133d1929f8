"""Serving with an explicit lifecycle: start, serve, drain on SIGTERM/SIGINT or POST /shutdown.

On a stop request the listener stays open while the proxy drains, so `/health` can say
"draining" (readiness false) and new requests get a clear 503 instead of a refused
connection; queued items are dispatched and calls in flight awaited; then the process exits 0
within SHUTDOWN_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from aiohttp import web

from proxy.app import close, create_app, drain
from proxy.http.keys import SHUTDOWN
from proxy.settings import Settings

log = logging.getLogger("proxy")


def run(settings: Settings, *, reuse_port: bool = False) -> None:
    """Serve until stopped, on the event loop the settings ask for."""
    if settings.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise RuntimeError(
                "EVENT_LOOP=uvloop, but uvloop is not installed: pip install '.[fast]'"
            ) from None
        uvloop.run(serve(settings, reuse_port=reuse_port))
        return
    asyncio.run(serve(settings, reuse_port=reuse_port))


async def serve(settings: Settings, *, reuse_port: bool = False) -> None:
    app = create_app(settings)
    stop = app[SHUTDOWN]
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    # The drain gets most of SHUTDOWN_TIMEOUT; the rest lets handlers write their answers
    # once the runner stops, so the whole shutdown stays within the setting. The runner waits
    # up to twice its shutdown_timeout (for handlers, then for their cancellation).
    finish_s = min(2.0, settings.shutdown_timeout * 0.2)
    drain_s = settings.shutdown_timeout - finish_s
    runner = web.AppRunner(
        app,
        handler_cancellation=True,  # a caller that disconnects is dropped from the queue
        access_log=None,
        shutdown_timeout=finish_s / 2,
    )
    # Start-up may wait a long time for TEI to load its model; a stop request must still work.
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

    site = web.TCPSite(
        runner,
        settings.host,
        settings.port,
        backlog=settings.backlog,
        reuse_port=reuse_port or None,
    )
    await site.start()
    log.info(
        "listening on http://%s:%d (upstream: %s)",
        settings.host,
        settings.port,
        settings.effective_upstream_kind,
    )
    await stop.wait()

    started = time.monotonic()
    log.info("draining: finishing accepted work (up to %.1fs)", settings.shutdown_timeout)
    # Exactly one drain, bounded; the app's own cleanup later finds it done.
    if not await drain(app, drain_s):
        log.warning("SHUTDOWN_TIMEOUT reached: answering what is left with 503")
    # Closing the service fails whatever is still queued or in flight, so every waiting
    # handler has an answer to write while its connection is still open; only then does the
    # runner close the connections.
    await close(app)
    await runner.cleanup()
    log.info("stopped after draining for %.2fs", time.monotonic() - started)
