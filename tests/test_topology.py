"""The no-Docker topology (scripts/topology.py): Redis, the TEI double and two proxy replicas
as real processes on loopback. Async jobs are shared through Redis: one submitted to replica A
can be read from replica B, and a SIGKILLed replica's jobs are finished by the other."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

from tests.redis_server import find_redis_server

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "topology.py"

pytestmark = pytest.mark.skipif(find_redis_server()[0] is None, reason=find_redis_server()[1])


def _load_topology() -> ModuleType:
    # scripts/ is not a package; load the file as a module (registered first, for dataclasses).
    spec = importlib.util.spec_from_file_location("proxy_topology_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


topo = _load_topology()


def call(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        raw = err.read()
        return err.code, json.loads(raw) if raw else None


def submit(url: str, text: str) -> str:
    status, body = call("POST", url + "/predict", {"input": text}, {"Async-Mode": "true"})
    assert status == 202, body
    assert isinstance(body["prediction_id"], str)
    return str(body["prediction_id"])


def wait_done(url: str, ids: list[str], limit_s: float) -> dict[str, Any]:
    """Poll GET /predict/{id} until every job answered 200; fail on anything but 200/400."""
    done: dict[str, Any] = {}
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and len(done) < len(ids):
        for pid in ids:
            if pid in done:
                continue
            status, body = call("GET", f"{url}/predict/{pid}")
            if status == 200:
                done[pid] = body
            else:
                assert status == 400, (pid, status, body)
        time.sleep(0.1)
    missing = [pid for pid in ids if pid not in done]
    assert not missing, f"{len(missing)} of {len(ids)} jobs not done within {limit_s}s"
    return done


def test_job_submitted_to_one_replica_is_read_from_another(tmp_path: Path) -> None:
    # A 1 s upstream keeps the job pending long enough to see the 400 first.
    config = topo.TopologyConfig(replicas=2, delay_base=1.0, run_dir=tmp_path)
    with topo.Topology(config) as topology:
        a, b = topology.urls
        pid = submit(a, "shared through redis")

        status, body = call("GET", f"{b}/predict/{pid}")
        assert (status, body) == (400, {"error": "Prediction is still being processed."})

        result = wait_done(b, [pid], limit_s=20)[pid]
        assert result["prediction_id"] == pid
        assert result["output"]["input"] == "shared through redis"
        vector = result["output"]["result"]
        assert vector and all(isinstance(x, float) for x in vector)
        # A reads it the same.
        assert call("GET", f"{a}/predict/{pid}") == (200, result)
        assert call("GET", f"{b}/predict/unknown-id")[0] == 404


def test_sigkill_of_a_replica_holding_jobs_loses_none(tmp_path: Path) -> None:
    b_workers = 4
    config = topo.TopologyConfig(
        replicas=2,
        delay_base=1.5,  # every upstream call takes 1.5 s: jobs stay in hand for the kill
        run_dir=tmp_path,
        replica_env=[
            {},
            # B holds at most 4 jobs at once, so A must take the rest; B re-claims a dead
            # replica's jobs after 2 s instead of 120.
            {"JOB_WORKERS": str(b_workers), "JOB_VISIBILITY_TIMEOUT": "2"},
        ],
    )
    with topo.Topology(config) as topology:
        a, b = topology.replicas
        texts = [f"job {i}" for i in range(10)]
        ids = [submit(a.url, t) for t in texts]

        # Stream layout from proxy/jobs/redis_store.py (default key prefix "proxy"): entries
        # read but not acknowledged are the group's pending list. More pending than B can
        # hold means A holds at least one.
        assert topology.redis is not None
        client = redis.Redis.from_url(topology.redis.url, decode_responses=True)
        try:
            deadline = time.monotonic() + 10
            pending = 0
            while time.monotonic() < deadline:
                pending = int(client.xpending("proxy:jobs", "proxy:workers")["pending"])
                if pending > b_workers:
                    break
                time.sleep(0.02)
            assert pending > b_workers, f"replica A never held a job ({pending} pending)"
            a.kill()
            held = client.xpending("proxy:jobs", "proxy:workers")
        finally:
            client.close()
        assert a.process.returncode == -signal.SIGKILL
        assert held["pending"] > 0

        done = wait_done(b.url, ids, limit_s=30)
        for pid, text in zip(ids, texts, strict=True):
            assert done[pid]["output"]["input"] == text
            assert done[pid]["output"]["result"]


def _read_until_ready(proc: subprocess.Popen[str], limit_s: float) -> list[str]:
    """The script's lines up to "ready…"; bounded by a deadline checked per line."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break  # exited
        lines.append(line.rstrip("\n"))
        if line.startswith("ready"):
            return lines
    proc.kill()
    pytest.fail(f"topology did not get ready: {lines}")


def _run_script(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--proxy-port", "0", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _urls(lines: list[str]) -> dict[str, str]:
    return {p[0]: p[1] for p in (line.split() for line in lines) if len(p) >= 2}


def test_script_serves_until_sigterm_then_stops_everything() -> None:
    proc = _run_script()
    try:
        urls = _urls(_read_until_ready(proc, limit_s=60))
        for name in ("proxy-a", "proxy-b"):
            assert call("GET", urls[name] + "/health")[0] == 200
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, out
    assert "stopped" in out
    for name in ("proxy-a", "proxy-b", "upstream"):
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(urls[name] + "/health", timeout=2)


def test_script_stops_by_itself_after_duration() -> None:
    proc = _run_script("--duration", "1", "--replicas", "1")
    try:
        urls = _urls(_read_until_ready(proc, limit_s=60))
        assert "proxy-a" in urls and "proxy-b" not in urls
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, out
