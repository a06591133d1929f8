"""MODELS_CONFIG with `python -m proxy` as a real process: a bad file stops start-up with one
line, and SIGHUP applies a changed file (or refuses a broken one, changing nothing)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.models import source_of, start_upstream
from tests.processes import LogLines, start_proxy_process, stop, wait_healthy


async def test_a_config_error_stops_start_up_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "models": {
                    "minilm": {
                        "versions": {"1": {"upstream": "http://127.0.0.1:9"}},
                        "traffic": {"1": 90, "3": 10},
                    }
                }
            }
        )
    )
    proc = await start_proxy_process("--port", "1", MODELS_CONFIG=str(path))
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await stop(proc)
    assert proc.returncode == 2
    assert out.decode().strip() == (
        f'error: MODELS_CONFIG {path}: models.minilm.traffic: version "3" is not defined'
    )


async def answer(session: aiohttp.ClientSession, url: str, model: str | None) -> tuple[str, Any]:
    headers = {"X-Model": model} if model else {}
    async with session.post(url + "/embed", json={"inputs": "hup"}, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["X-Model"], (await resp.json())[0]


async def test_sighup_applies_a_changed_file(
    aiohttp_server: Any, tmp_path: Path, unused_tcp_port: int
) -> None:
    up = {seed: await start_upstream(aiohttp_server, seed) for seed in "abc"}
    path = tmp_path / "models.yaml"
    path.write_text(
        yaml.safe_dump({"models": {"minilm": {"versions": {"1": {"upstream": up["a"].url}}}}})
    )
    proc = await start_proxy_process(
        "--port", str(unused_tcp_port), MODELS_CONFIG=str(path), LOG_LEVEL="info"
    )
    url = f"http://127.0.0.1:{unused_tcp_port}"
    logs = LogLines(proc)
    try:
        await wait_healthy(url, proc)
        async with aiohttp.ClientSession() as session:
            served, vector = await answer(session, url, None)
            assert served == "minilm@1" and source_of(up, "hup", vector) == "a"

            changed = {
                "models": {
                    "minilm": {
                        "versions": {
                            "1": {"upstream": up["a"].url},
                            "2": {"upstream": up["b"].url},
                        },
                        "traffic": {"2": 100},
                    },
                    "bge": {"versions": {"1": {"upstream": up["c"].url}}},
                },
                "default": "minilm",
            }
            path.write_text(yaml.safe_dump(changed))
            proc.send_signal(signal.SIGHUP)
            await logs.count("reload applied", 1)
            served, vector = await answer(session, url, None)
            assert served == "minilm@2" and source_of(up, "hup", vector) == "b"
            served, vector = await answer(session, url, "bge")
            assert served == "bge@1" and source_of(up, "hup", vector) == "c"

            # A broken file: refused with its reason in the log, nothing changes.
            path.write_text("models: [")
            proc.send_signal(signal.SIGHUP)
            await logs.count("reload refused, nothing changed", 1)
            assert "not valid YAML" in logs.text
            served, _ = await answer(session, url, None)
            assert served == "minilm@2"
            async with session.get(url + "/v1/models") as resp:
                assert [m["id"] for m in (await resp.json())["data"]] == ["bge", "minilm"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        await stop(proc)
