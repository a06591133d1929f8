"""Child processes for the benchmarks: the proxy and the emulators, each in its own process.

Every child runs in its own session (process group) and is registered so that it is killed
however the benchmark exits (normal exit, exception, Ctrl-C or SIGTERM). Nothing here waits
without a time limit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"

_live: set[Server] = set()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _clean_env() -> dict[str, str]:
    """The current environment minus anything the proxy would read as a setting, so a stray
    UPSTREAM_URL or MAX_BATCH_SIZE in the caller's shell cannot change a benchmark."""
    try:
        from proxy.settings import Settings

        names = set()
        for name, info in Settings.model_fields.items():
            names.add(name.upper())
            for choice in getattr(info.validation_alias, "choices", ()):
                names.add(str(choice).upper())
    except Exception:  # proxy/ mid-edit: fall back to the settings known today
        names = {"UPSTREAM_URL", "MAX_BATCH_SIZE", "MAX_WAIT_TIME", "DISPATCH", "PORT", "HOST"}
    env = {k: v for k, v in os.environ.items() if k.upper() not in names}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass(eq=False)
class Server:
    """One child HTTP server on loopback."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _ps: psutil.Process | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready_path: str = "/health", timeout_s: float = 60.0) -> Server:
        log = self.log_path.open("wb")
        # cwd is a scratch directory so a .env file in the repo cannot change the settings.
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=tempfile.gettempdir(),
            env=_clean_env(),
            start_new_session=True,
        )
        log.close()
        _live.add(self)
        self._ps = psutil.Process(self.proc.pid)
        try:
            self._wait_ready(ready_path, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, path: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}; log:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + path, timeout=2.0) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready in {timeout_s:g}s; log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text("utf-8", "replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it lingers."""
        _live.discard(self)
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5.0)

    def kill(self) -> None:
        """SIGKILL at once: for a server holding work that will never finish (a graceful
        drain would wait out its whole shutdown timeout)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10.0)
        _live.discard(self)

    # -- measurements -----------------------------------------------------------------

    def cpu_seconds(self) -> float:
        """User + system CPU of the server and its threads so far."""
        assert self._ps is not None
        try:
            t = self._ps.cpu_times()
        except psutil.Error:
            return float("nan")
        return float(t.user + t.system)

    def rss_mb(self) -> float:
        return _status_kb(self.pid, "VmRSS") / 1024.0

    def peak_rss_mb(self) -> float:
        """The kernel's high-water mark of this process's resident memory (VmHWM)."""
        return _status_kb(self.pid, "VmHWM") / 1024.0


def _status_kb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    return float("nan")


def listen_overflows() -> int:
    """The kernel's count of connections dropped because an accept queue was full
    (TcpExt ListenOverflows, machine-wide): each one costs a client a SYN retransmit (1 s+)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return -1
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            row = dict(zip(head.split()[1:], values.split()[1:], strict=False))
            return int(row.get("ListenOverflows", -1))
    return -1


def python_server(name: str, module_argv: Sequence[str], log_dir: Path) -> Server:
    port = free_port()
    argv = [sys.executable, *module_argv]
    argv = [a.replace("{port}", str(port)) for a in argv]
    return Server(name, argv, port, log_dir / f"{name}-{port}.log")


def emulator(kind: str, log_dir: Path, **options: float | int | str | None) -> Server:
    args = ["-m", "benchmarks.emulators", kind, "--port", "{port}"]
    for key, value in options.items():
        if value is not None:
            args += ["--" + key.replace("_", "-"), str(value)]
    return python_server(f"emulator-{kind}", args, log_dir)


def proxy(log_dir: Path, upstream_url: str | None, *flags: str) -> Server:
    args = ["-m", "proxy", "--host", LOOPBACK, "--port", "{port}", "--log-level", "warning"]
    if upstream_url is not None:
        args += ["--upstream-url", upstream_url]
    return python_server("proxy", [*args, *flags], log_dir)


def timer_batcher(
    log_dir: Path,
    upstream_url: str,
    *,
    max_wait_ms: float,
    max_batch_size: int,
    concurrency: int,
) -> Server:
    """The async-batcher baseline (``benchmarks/timer_batcher.py``) in front of ``upstream_url``."""
    args = ["-m", "benchmarks.timer_batcher", "--host", LOOPBACK, "--port", "{port}"]
    args += ["--upstream-url", upstream_url, "--max-wait-ms", f"{max_wait_ms:g}"]
    args += ["--max-batch-size", str(max_batch_size), "--concurrency", str(concurrency)]
    return python_server("timer-batcher", args, log_dir)


@contextlib.contextmanager
def running(*servers: Server, ready_timeout_s: float = 90.0) -> Iterator[tuple[Server, ...]]:
    """Start the servers in order; stop them all (in reverse) however the block exits."""
    started: list[Server] = []
    try:
        for s in servers:
            started.append(s.start(timeout_s=ready_timeout_s))
        yield tuple(started)
    finally:
        for s in reversed(started):
            s.stop()


def stop_all() -> None:
    for s in list(_live):
        s.stop(timeout_s=3.0)


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    stop_all()
    raise SystemExit(128 + signum)


def install_cleanup() -> None:
    """Kill every child on exit, and turn SIGTERM into a clean exit that does the same."""
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, _on_signal)


class CpuMeter:
    """CPU used by the given servers, by this process (the load generator) and by everything
    else on the machine (other people's work), over one measured interval."""

    def __init__(self, servers: Sequence[Server]) -> None:
        self.servers = list(servers)

    def __enter__(self) -> CpuMeter:
        self._t0 = time.perf_counter()
        self._sys0 = psutil.cpu_times()
        self._own0 = psutil.Process().cpu_times()
        self._srv0 = [s.cpu_seconds() for s in self.servers]
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t0
        sys1 = psutil.cpu_times()
        own1 = psutil.Process().cpu_times()
        busy = busy_seconds(sys1) - busy_seconds(self._sys0)
        own = (own1.user + own1.system) - (self._own0.user + self._own0.system)
        srv = [s.cpu_seconds() - c0 for s, c0 in zip(self.servers, self._srv0, strict=True)]
        self.wall_s = wall
        self.cores = {s.name: v / wall for s, v in zip(self.servers, srv, strict=True)}
        self.cores["loadgen"] = own / wall
        self.cores["other"] = max(0.0, (busy - own - sum(srv)) / wall)
        # Time the hypervisor gave to other machines while ours wanted it.
        self.cores["steal"] = (
            getattr(sys1, "steal", 0.0) - getattr(self._sys0, "steal", 0.0)
        ) / wall


def busy_seconds(t: Any) -> float:
    # ``guest`` time is already inside ``user``; idle and iowait are not busy.
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))
