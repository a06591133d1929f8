"""Locust load test: single-text ``POST /embed`` requests, as TEI's clients send them.

Works the same against the proxy or against an upstream directly; only ``--host`` changes.
Two user classes; name one on the command line to use only it (default: both, 1:1):

* ``ShortTextUser``: ~8-word texts (11 tokens)
* ``LongTextUser``: ~117-word texts (120 tokens)

Headless, 64 users for 20 s, CSV into benchmarks/results/ (run from the repository root):

    .venv/bin/locust -f benchmarks/locustfile.py --headless -u 64 -r 64 -t 20s \\
        --host http://127.0.0.1:8080 --csv benchmarks/results/locust-short --only-summary \\
        ShortTextUser

Environment: ``EMBED_WAIT_MS`` (default 0) is each user's pause between requests; with 0 the
test is closed loop at full speed, so throughput is bounded by ``-u`` and latency.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

from locust import FastHttpUser, constant, task

# Locust puts this file's own directory on sys.path, not the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.texts import TextKind, embed_bodies

_WAIT_S = float(os.environ.get("EMBED_WAIT_MS", "0")) / 1000.0
_HEADERS = {"Content-Type": "application/json"}
_BODIES: dict[TextKind, list[bytes]] = {k: embed_bodies(k, 512) for k in ("short", "long")}


class _EmbedUser(FastHttpUser):
    abstract = True
    text: TextKind = "short"
    wait_time = constant(_WAIT_S)
    # One connection per user, like one client thread with keep-alive.
    concurrency = 1

    def on_start(self) -> None:
        # Users start at different points of the text pool so they don't send in lockstep.
        offset = hash(id(self)) % len(_BODIES[self.text])
        self._bodies = itertools.islice(itertools.cycle(_BODIES[self.text]), offset, None)

    @task
    def embed(self) -> None:
        with self.client.post(
            "/embed",
            data=next(self._bodies),
            headers=_HEADERS,
            name=f"/embed [{self.text}]",
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
            elif not resp.content or not resp.content.startswith(b"[["):
                resp.failure("not a TEI embedding answer")
            else:
                resp.success()


class ShortTextUser(_EmbedUser):
    text = "short"


class LongTextUser(_EmbedUser):
    text = "long"
