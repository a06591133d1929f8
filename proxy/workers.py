"""``WORKERS=N``: N serving processes on one port, through SO_REUSEPORT.

Why SO_REUSEPORT rather than gunicorn's aiohttp worker: no extra dependency, and each worker
runs exactly the single-process server (same lifecycle, same drain on SIGTERM); the kernel
spreads new connections over the workers. This supervisor only starts them, forwards stop
signals, restarts a worker that crashes, and exits 0 once every worker drained and exited 0.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.process import BaseProcess
from types import FrameType

from proxy.server import run
from proxy.settings import Settings

log = logging.getLogger("proxy.workers")

_CRASH_WINDOW_S = 10.0
_MAX_QUICK_CRASHES = 5


def configure_logging(settings: Settings, prefix: str = "") -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _worker_main(settings: Settings, index: int) -> None:
    configure_logging(settings, prefix=f"[worker {index}] ")
    try:
        run(settings, reuse_port=True)
    except RuntimeError as exc:
        logging.getLogger("proxy").error("%s", exc)
        sys.exit(1)


def run_workers(settings: Settings) -> int:
    ctx = multiprocessing.get_context("spawn")  # no inherited event loop or sockets
    workers: dict[int, BaseProcess] = {}
    started_at: dict[int, float] = {}
    quick_crashes = 0
    stopping = False

    def start(index: int) -> None:
        proc = ctx.Process(target=_worker_main, args=(settings, index), name=f"worker-{index}")
        proc.start()
        workers[index] = proc
        started_at[index] = time.monotonic()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for proc in workers.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    for index in range(settings.workers):
        start(index)
    log.info("started %d workers on port %d (SO_REUSEPORT)", settings.workers, settings.port)

    failed = False
    while workers:
        for index, proc in list(workers.items()):
            proc.join(timeout=0.2)
            if proc.is_alive():
                continue
            del workers[index]
            code = proc.exitcode
            if stopping:
                failed = failed or code != 0
                continue
            log.error("worker %d exited with %s; restarting it", index, code)
            if time.monotonic() - started_at[index] < _CRASH_WINDOW_S:
                quick_crashes += 1
            if quick_crashes >= _MAX_QUICK_CRASHES:
                log.error("workers keep crashing at start-up; stopping")
                request_stop(signal.SIGTERM, None)
                failed = True
                continue
            start(index)
    return 1 if failed else 0
