"""``WORKERS=N``: N serving processes sharing one listening socket, under a supervisor.

The supervisor binds the socket once (a taken port is an error before any worker starts) and
hands it to every worker; the workers accept from its one queue, so a busy or stopped worker
leaves new connections to the others. Each worker runs exactly the single-process server (same
lifecycle, same drain). The supervisor:

* forwards SIGTERM/SIGINT to every worker and exits 0 once all drained and exited 0;
* stops every worker when one was asked to stop through POST /shutdown (a shared flag);
* restarts a worker that crashed, and one whose event loop missed its heartbeat for
  WORKER_HEARTBEAT_TIMEOUT seconds (SIGTERM, then SIGKILL after a grace period);
* gives up when workers keep crashing right after start-up.

Why not gunicorn with aiohttp's worker class: see README, "Several workers per replica".
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any, Protocol

from prometheus_client.multiprocess import mark_process_dead

from proxy.logs import configure_logging
from proxy.metrics import MULTIPROC_ENV
from proxy.server import Supervision, run
from proxy.settings import Settings

log = logging.getLogger("proxy.workers")

_CRASH_WINDOW_S = 10.0
_MAX_QUICK_CRASHES = 5
_HUNG_KILL_GRACE_S = 5.0  # after SIGTERM, before SIGKILL, for a worker that missed beats
_STOP_GRACE_S = 5.0  # past SHUTDOWN_TIMEOUT, before SIGKILL, for a worker that won't exit
_POLL_S = 0.2


class _Shared(Protocol):
    """A number in shared memory (multiprocessing's RawValue)."""

    value: Any


def _worker_main(
    settings: Settings,
    index: int,
    sock: socket.socket,
    beat: _Shared,
    stop_all: _Shared,
    supervisor_pid: int,
) -> None:
    # A SIGHUP forwarded before serve() listens for it must not end this worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    configure_logging(settings, prefix=f"[worker {index}] ", worker=index)

    def touch() -> None:
        beat.value = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process

    def request_stop_all() -> None:
        stop_all.value = 1

    supervision = Supervision(
        beat=touch,
        stop_all=request_stop_all,
        supervisor_alive=lambda: os.getppid() == supervisor_pid,
    )
    try:
        run(settings, sock=sock, supervision=supervision)
    except RuntimeError as exc:
        logging.getLogger("proxy").error("%s", exc)
        sys.exit(1)
    finally:
        # Drained (or failed) already: a stop signal that comes while exiting changes nothing.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_workers(settings: Settings, sock: socket.socket) -> int:
    """Run ``settings.workers`` workers on the bound ``sock`` until stopped; the exit code."""
    # One folder for every worker's metric values, so any worker's /metrics counts them all
    # (proxy/metrics.py). Fresh each run: stale files would add an earlier run's counts.
    metrics_dir = tempfile.mkdtemp(prefix="proxy-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir  # spawned workers inherit the environment
    try:
        return _supervise(settings, sock, metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(settings: Settings, sock: socket.socket, metrics_dir: str) -> int:
    ctx = multiprocessing.get_context("spawn")  # no inherited event loop or state
    stop_all: _Shared = ctx.RawValue("b", 0)
    beats: dict[int, _Shared] = {i: ctx.RawValue("d", 0.0) for i in range(settings.workers)}
    workers: dict[int, BaseProcess] = {}
    started_at: dict[int, float] = {}
    kill_at: dict[int, float] = {}  # index -> when to SIGKILL a worker told to go
    quick_crashes = 0
    stopping = False
    failed = False

    def start(index: int) -> None:
        beats[index].value = 0.0  # not beating yet: imports and start-up come first
        proc = ctx.Process(
            target=_worker_main,
            args=(settings, index, sock, beats[index], stop_all, os.getpid()),
            name=f"worker-{index}",
        )
        proc.start()  # the socket reaches the child as an inherited descriptor
        workers[index] = proc
        started_at[index] = time.monotonic()
        kill_at.pop(index, None)
        log.info("worker %d started (pid %s)", index, proc.pid)

    def signal_all(sig: signal.Signals) -> None:
        for proc in workers.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, sig)

    def stop_workers() -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        deadline = time.monotonic() + settings.shutdown_timeout + _STOP_GRACE_S
        for index in workers:
            kill_at.setdefault(index, deadline)
        signal_all(signal.SIGTERM)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop_workers()

    def on_hangup(signum: int, _frame: FrameType | None) -> None:
        signal_all(signal.SIGHUP)  # every worker reloads MODELS_CONFIG

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    for index in range(settings.workers):
        start(index)
    log.info(
        "started %d workers on port %d (one listening socket)", settings.workers, settings.port
    )

    while workers:
        multiprocessing.connection.wait([p.sentinel for p in workers.values()], timeout=_POLL_S)
        if stop_all.value and not stopping:
            log.info("POST /shutdown reached a worker: stopping every worker")
            stop_workers()
        now = time.monotonic()
        for index, proc in list(workers.items()):
            if proc.is_alive():
                due = kill_at.get(index)
                if due is not None and now >= due and proc.pid is not None:
                    log.error("worker %d (pid %s) did not exit: killing it", index, proc.pid)
                    os.kill(proc.pid, signal.SIGKILL)
                    kill_at[index] = now + _HUNG_KILL_GRACE_S
                    failed = failed or stopping
                elif due is None and not stopping:
                    beat = beats[index].value
                    silent_s = now - beat
                    if beat and silent_s > settings.worker_heartbeat_timeout and proc.pid:
                        log.error(
                            "worker %d (pid %s) missed its heartbeat for %.1fs: restarting it",
                            index,
                            proc.pid,
                            silent_s,
                        )
                        os.kill(proc.pid, signal.SIGTERM)
                        kill_at[index] = now + _HUNG_KILL_GRACE_S
                continue
            proc.join()
            del workers[index]
            if proc.pid is not None:
                # Its counters stay in the sums; its gauges (queue depth...) go.
                mark_process_dead(proc.pid, metrics_dir)  # type: ignore[no-untyped-call]
            code = proc.exitcode
            if not stopping and stop_all.value:
                stop_workers()  # the flag was set just before this worker exited
            if stopping:
                # Killed by our SIGTERM before serve() took the signal over: it had not
                # started listening, so it left no work behind.
                failed = failed or code not in (0, -signal.SIGTERM)
                continue
            log.error("worker %d exited with %s; restarting it", index, code)
            if now - started_at[index] < _CRASH_WINDOW_S:
                quick_crashes += 1
            if quick_crashes >= _MAX_QUICK_CRASHES:
                log.error("workers keep crashing at start-up; stopping")
                stop_workers()
                failed = True
                continue
            start(index)
    sock.close()
    return 1 if failed else 0
