"""The job-store interface. The HTTP layer submits and polls; a store runs the jobs through a
``Processor`` (the proxy's batcher, via the embedding service) and keeps their results."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

JobStatus = Literal["pending", "done", "failed"]

# Embeds one text by a deadline (on time.monotonic(): the end of the job's lifetime) with
# the model it was accepted for (`name@version`, or None for the default); raises
# proxy.errors.ApiError on failure. Stores retry the temporary ones (proxy.jobs.retry).
# Results are plain float lists (stores serialise them).
Processor = Callable[[str, float, str | None], Awaitable[Sequence[float]]]


class JobQueueFullError(Exception):
    """The store holds its maximum of unfinished jobs (in number or in bytes); the caller
    should retry later (429)."""


class JobStoreUnavailableError(Exception):
    """The store cannot be reached (e.g. Redis is down) or is draining; answer 503."""


@dataclass(slots=True)
class JobRecord:
    prediction_id: str
    status: JobStatus
    input: str
    result: list[float] | None = None
    # For failed jobs: {"error": message, "error_type": TEI error type, "status": HTTP status}
    error: dict[str, Any] | None = None
    # The model and version it was accepted for (`name@version`); None: the default.
    model: str | None = None


class JobStore(Protocol):
    kind: str

    async def start(self, processor: Processor) -> None:
        """Connect, and start the workers that take jobs and run them through ``processor``."""
        ...

    async def submit(self, text: str, model: str | None = None) -> str:
        """Accept a job for ``model`` (``name@version``); return its unguessable prediction
        id. Raises JobQueueFullError (and may evict the oldest finished records to make
        room)."""
        ...

    async def get(self, prediction_id: str) -> JobRecord | None:
        """The job's record, or None if unknown or expired."""
        ...

    async def healthy(self) -> bool: ...

    async def drain(self) -> None:
        """Take no new work; finish the jobs this process holds (stores that can hand jobs
        to another replica may leave unclaimed ones for it)."""
        ...

    async def close(self) -> None: ...
