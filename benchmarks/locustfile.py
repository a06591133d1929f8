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

from benchmarks.texts import TextKind, UniqueBodies

_WAIT_S = float(os.environ.get("EMBED_WAIT_MS", "0")) / 1000.0
_HEADERS = {"Content-Type": "application/json"}


class _EmbedUser(FastHttpUser):
    abstract = True
    text: TextKind = "short"
    wait_time = constant(_WAIT_S)
    # One connection per user, like one client thread with keep-alive.
    concurrency = 1

    def on_start(self) -> None:
        # A new text for every request (each user its own salt): a repeat would be answered
        # from the proxy's cache, and the test would measure the cache instead of batching.
        bodies = UniqueBodies(self.text)
        self._bodies = (bodies[i] for i in itertools.count())

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
