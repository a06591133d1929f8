"""Sampled capture: SAMPLE_RATE of answered requests written as JSON Lines under SAMPLE_PATH.

The request path never waits for the disk: :class:`Sampler` (a built-in ``after`` hook, run
last) only decides and puts the request's inputs and vectors on a bounded queue; one writer
thread hashes, serialises and writes them. When the queue is full the record is dropped and
counted (``proxy_capture_records_total{outcome="dropped"}``); a disk error is counted too
(``outcome="error"``), never raised into a request.

Each serving process writes its own files, ``capture-<pid>-<start>-<n>.jsonl``: a file is
closed at SAMPLE_MAX_BYTES and a new one begun, and past SAMPLE_MAX_FILES the oldest of this
process's files is deleted.

A record follows the shape of SageMaker's data capture (``captureData.endpointInput`` and
``endpointOutput``, ``eventMetadata``, ``eventVersion``), with the payloads as JSON objects
rather than strings::

    {"captureData": {
        "endpointInput": {"observedContentType": "application/json", "mode": "INPUT",
                          "encoding": "JSON",
                          "data": {"inputs": [{"sha256": "...", "length": 11, "tokens": 3}]}},
        "endpointOutput": {"observedContentType": "application/json", "mode": "OUTPUT",
                           "encoding": "JSON",
                           "data": {"status": 200, "dimensions": 384, "vectors": [[...]]}}},
     "eventMetadata": {"eventId": "...", "inferenceTime": "2026-11-30T12:00:00.000Z",
                       "requestId": "...", "model": "default", "version": null,
                       "route": "/embed", "latencyMs": 4.2, "status": 200, "tokens": 3},
     "eventVersion": "0"}

``text`` is added to each input only with SAMPLE_TEXT=true, ``vectors`` only with
SAMPLE_VECTORS=true (the drift report, :mod:`proxy.drift`, needs them).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from proxy.hooks import HookContext
from proxy.token_ids import estimate_tokens
from proxy.upstream.base import EmbedInput, Vector

log = logging.getLogger(__name__)

FILE_PREFIX = "capture-"
FILE_SUFFIX = ".jsonl"
_CLOSE_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class _Pending:
    """What the request path hands the writer: references only, no work done yet."""

    event_time: float
    request_id: str
    model: str
    version: str | None
    route: str
    latency_s: float | None
    status: int | None
    inputs: list[EmbedInput]
    vectors: Sequence[Vector | None] | None


def _input_record(item: EmbedInput, with_text: bool) -> dict[str, Any]:
    raw = item.encode("utf-8") if isinstance(item, str) else orjson.dumps(item)
    record: dict[str, Any] = {
        "sha256": hashlib.sha256(raw).hexdigest(),
        "length": len(item),
        "tokens": estimate_tokens(item),
    }
    if with_text:
        record["text" if isinstance(item, str) else "token_ids"] = item
    return record


def _as_floats(vector: Vector) -> Any:
    tolist = getattr(vector, "tolist", None)  # a numpy row (the embedded model)
    return tolist() if callable(tolist) else list(vector)


def build_record(pending: _Pending, *, with_text: bool, with_vectors: bool) -> dict[str, Any]:
    inputs = [_input_record(item, with_text) for item in pending.inputs]
    output: dict[str, Any] = {"status": pending.status}
    vectors = [v for v in pending.vectors or () if v is not None]
    output["dimensions"] = len(vectors[0]) if vectors else None
    if with_vectors and pending.vectors is not None:
        output["vectors"] = [None if v is None else _as_floats(v) for v in pending.vectors]
    stamp = datetime.fromtimestamp(pending.event_time, UTC)
    return {
        "captureData": {
            "endpointInput": {
                "observedContentType": "application/json",
                "mode": "INPUT",
                "encoding": "JSON",
                "data": {"inputs": inputs},
            },
            "endpointOutput": {
                "observedContentType": "application/json",
                "mode": "OUTPUT",
                "encoding": "JSON",
                "data": output,
            },
        },
        "eventMetadata": {
            "eventId": str(uuid.uuid4()),
            "inferenceTime": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "requestId": pending.request_id,
            "model": pending.model,
            "version": pending.version,
            "route": pending.route,
            "latencyMs": None if pending.latency_s is None else round(pending.latency_s * 1e3, 3),
            "status": pending.status,
            "tokens": sum(i["tokens"] for i in inputs),
        },
        "eventVersion": "0",
    }


class CaptureWriter:
    """A bounded queue and the one thread that drains it to rotating JSON Lines files."""

    def __init__(
        self,
        folder: Path,
        *,
        max_bytes: int,
        max_files: int,
        queue_size: int,
        with_text: bool,
        with_vectors: bool,
        count: Callable[[str], None],
    ) -> None:
        self.folder = folder
        self._max_bytes = max_bytes
        self._max_files = max_files
        self._with_text = with_text
        self._with_vectors = with_vectors
        self._count = count
        self._queue: queue.Queue[_Pending | None] = queue.Queue(maxsize=queue_size)
        self._stem = f"{FILE_PREFIX}{os.getpid()}-{time.strftime('%Y%m%dT%H%M%S')}"
        self._serial = 0
        self._written: deque[Path] = deque()  # this process's files, oldest first
        self._file: IO[bytes] | None = None
        self._size = 0
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._drain, name="capture-writer", daemon=True)
        self._thread.start()

    def offer(self, pending: _Pending) -> bool:
        """Queue ``pending`` without waiting; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(pending)
        except queue.Full:
            self._count("dropped")
            return False
        return True

    def close(self) -> None:
        """Write what is queued (for up to a few seconds), then stop. Blocking: call it off
        the event loop."""
        if self._thread is None:
            return
        self._stopped.set()
        try:
            self._queue.put(None, timeout=_CLOSE_WAIT_S)
        except queue.Full:
            pass
        self._thread.join(_CLOSE_WAIT_S)
        self._thread = None

    @property
    def files(self) -> list[Path]:
        return list(self._written)

    # -- the writer thread --------------------------------------------------------------------

    def _drain(self) -> None:
        try:
            while True:
                item = self._queue.get()
                batch = [item]
                while not self._queue.empty() and len(batch) < 256:
                    batch.append(self._queue.get_nowait())
                for pending in batch:
                    if pending is None:
                        return
                    self._write(pending)
                if self._file is not None:
                    try:
                        self._file.flush()  # readers see whole lines soon, not at close
                    except OSError:
                        log.exception("capture: flushing %s failed", self.folder)
                if self._stopped.is_set() and self._queue.empty():
                    return
        finally:
            self._close_file()

    def _write(self, pending: _Pending) -> None:
        try:
            record = build_record(
                pending, with_text=self._with_text, with_vectors=self._with_vectors
            )
            line = orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
            if self._file is None or (self._size and self._size + len(line) > self._max_bytes):
                self._rotate()
            assert self._file is not None
            self._file.write(line)
            self._size += len(line)
        except Exception:
            # A full or read-only disk (or a vector that does not serialise): count, close the
            # file (it may be broken), go on. The thread must outlive any one record.
            log.exception("capture: writing to %s failed", self.folder)
            self._count("error")
            self._close_file()
            return
        self._count("written")

    def _rotate(self) -> None:
        self._close_file()
        self._serial += 1
        path = self.folder / f"{self._stem}-{self._serial:06d}{FILE_SUFFIX}"
        self._file = path.open("ab")
        self._size = 0
        self._written.append(path)
        while len(self._written) > self._max_files:
            oldest = self._written.popleft()
            oldest.unlink(missing_ok=True)

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                log.exception("capture: closing a file in %s failed", self.folder)
            self._file = None


class Sampler:
    """The built-in ``after`` hook that samples requests into a :class:`CaptureWriter`.

    It runs inline (no thread, no timeout: it only draws a number and puts references on a
    queue) and last, so it records what the other hooks let through, as answered."""

    inline = True

    def __init__(self, writer: CaptureWriter, rate: float, *, seed: int | None = None) -> None:
        self._writer = writer
        self._rate = rate
        self._random = random.Random(seed)

    def after(self, ctx: HookContext) -> None:
        if self._rate <= 0 or self._random.random() >= self._rate:
            return
        self._writer.offer(
            _Pending(
                event_time=time.time(),
                request_id=ctx.request_id,
                model=ctx.model,
                version=ctx.version,
                route=ctx.route,
                latency_s=ctx.latency_s,
                status=ctx.status,
                inputs=ctx.inputs,
                vectors=ctx.vectors,
            )
        )


def read_records(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Every capture record in ``paths`` (files, or folders searched for capture files)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob(f"*{FILE_SUFFIX}") if p.is_file()))
        else:
            files.append(path)
    records: list[dict[str, Any]] = []
    for file in files:
        with file.open("rb") as handle:
            for line in handle:
                if line.strip():
                    records.append(orjson.loads(line))
    return records
