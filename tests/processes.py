"""Running `python -m proxy` as a real child process for tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.tei_double import TeiDouble, TeiDoubleConfig, expected_vector

ROOT = Path(__file__).resolve().parent.parent


def proxy_env(**extra: str) -> dict[str, str]:
    """The test's environment without any proxy settings a developer may have exported."""
    prefixes = (
        "UPSTREAM_", "MAX_", "API_KEY", "ADMIN_TOKEN", "REQUEST_", "SHUTDOWN_", "WORKER",
        "MODEL_SERVER_", "KEEPALIVE_", "HEADER_", "BODY_", "ACCESS_LOG", "MODELS_CONFIG",
        "MODEL_LOAD_", "SHADOW_",
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


async def start_proxy_process(*args: str, **env: str) -> asyncio.subprocess.Process:
    # Its own session, so stop() can kill the workers a supervisor started too.
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--host", "127.0.0.1", *args,
        cwd=ROOT, env=proxy_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


async def wait_healthy(url: str, proc: asyncio.subprocess.Process, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                out = await proc.stdout.read() if proc.stdout else b""
                raise AssertionError(f"proxy exited early ({proc.returncode}): {out.decode()}")
            try:
                async with session.get(url + "/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("proxy did not become healthy")


async def stop(proc: asyncio.subprocess.Process) -> None:
    """Kill the process and everything it started (workers), whatever state it is in."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.returncode is None:
        await proc.wait()


class LogLines:
    """The lines a proxy process printed so far, read on demand from its stdout pipe."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        self._stdout = proc.stdout
        self.lines: list[str] = []

    async def wait_for(self, predicate: Callable[[list[str]], bool], limit_s: float = 30) -> None:
        """Read lines until ``predicate(lines)`` holds; fail after ``limit_s``."""
        async with asyncio.timeout(limit_s):
            while not predicate(self.lines):
                line = await self._stdout.readline()
                if not line:
                    raise AssertionError("process closed its output:\n" + self.text)
                self.lines.append(line.decode())

    async def count(self, needle: str, n: int, limit_s: float = 30) -> None:
        await self.wait_for(lambda lines: sum(needle in line for line in lines) >= n, limit_s)

    async def read_rest(self) -> None:
        self.lines.extend((await self._stdout.read()).decode().splitlines(keepends=True))

    @property
    def text(self) -> str:
        return "".join(self.lines)


async def start_double(aiohttp_server: Any, **config: Any) -> tuple[TeiDouble, str]:
    """The TEI double on a loopback port, for a proxy process to use; returns its base URL."""
    double = TeiDouble(TeiDoubleConfig(**config))
    server = await aiohttp_server(double.make_app())
    return double, str(server.make_url("")).rstrip("/")


async def embed_each_and_check(session: aiohttp.ClientSession, url: str, texts: list[str]) -> None:
    """POST every text to /embed concurrently; each caller must get its own text's vector."""

    async def call(text: str) -> Any:
        async with session.post(url + "/embed", json={"inputs": text}) as resp:
            assert resp.status == 200
            return await resp.json()

    bodies = await asyncio.gather(*(call(t) for t in texts))
    for text, body in zip(texts, bodies, strict=True):
        assert body == [pytest.approx(expected_vector(text), rel=1e-6)]
