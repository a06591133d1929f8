"""Running one job: its attempts, and retries of temporary faults within its lifetime.

Both stores run jobs through :func:`attempt_job`, so they retry alike. A job lives
``JOB_TIMEOUT`` from acceptance: every attempt must end by then (the processor gets that
deadline), and a retry is only started if its backoff wait ends before it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from proxy import errors
from proxy.errors import ApiError, ErrorType
from proxy.jobs.base import Processor

log = logging.getLogger(__name__)

INTERNAL_ERROR_MESSAGE = "Internal error while processing the job"

# Faults of the moment, not of the input: overloaded (429), the upstream unreachable or
# answering garbage (502), the breaker open or the proxy shutting down (503), too slow
# (504). Anything else fails the job at once: 400/413/422 are the input's own fault; a 500
# is TEI's model error (already retried UPSTREAM_RETRIES times by the service) or a bug.
TEMPORARY_STATUSES = frozenset({429, 502, 503, 504})


def error_for(exc: BaseException) -> dict[str, Any]:
    """The ``error`` field of a failed record; details of unexpected faults stay in the log."""
    if isinstance(exc, ApiError):
        return {"error": exc.message, "error_type": exc.error_type, "status": exc.status}
    return {"error": INTERNAL_ERROR_MESSAGE, "error_type": str(ErrorType.BACKEND), "status": 500}


def is_temporary(exc: BaseException) -> bool:
    return isinstance(exc, ApiError) and exc.status in TEMPORARY_STATUSES


def expired_error(job_timeout_s: float) -> dict[str, Any]:
    """The cause of a job that was not even tried before its lifetime ran out."""
    return error_for(
        errors.timeout(
            f"the job did not start within its lifetime (JOB_TIMEOUT={job_timeout_s:g}s)"
        )
    )


class Backoff:
    """Jittered exponential delays: ``first_s``, doubling, capped at ``cap_s``."""

    def __init__(self, first_s: float = 0.1, cap_s: float = 5.0) -> None:
        self._first_s, self._cap_s, self._next_s = first_s, cap_s, first_s

    def reset(self) -> None:
        self._next_s = self._first_s

    def delay(self) -> float:
        delay = self._next_s
        self._next_s = min(self._cap_s, self._next_s * 2)
        # Jitter, so jobs (or replicas) that failed together don't all come back in step.
        return delay * random.uniform(0.5, 1.0)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a job's attempts ended: a result, or the error of the last one.

    ``interrupted``: the store began stopping while the job waited to retry, so it was
    given up early; ``error`` holds the last cause. The store decides what that means (the
    memory store fails the job, the Redis store hands it back to the stream).
    """

    result: list[float] | None = None
    error: dict[str, Any] | None = None
    interrupted: bool = False


async def attempt_job(
    processor: Processor,
    prediction_id: str,
    text: str,
    *,
    model: str | None = None,
    deadline: float,
    job_timeout_s: float,
    stopping: asyncio.Event,
    retry_first_s: float,
    retry_cap_s: float,
) -> Outcome:
    """Run the job until it succeeds, meets a fault that retrying cannot mend, or its
    lifetime (``deadline``, on ``time.monotonic()``) runs out."""
    if time.monotonic() >= deadline:
        return Outcome(error=expired_error(job_timeout_s))
    backoff = Backoff(retry_first_s, retry_cap_s)
    attempts = 0
    while True:
        attempts += 1
        try:
            vector = await processor(text, deadline, model)
            return Outcome(result=[float(x) for x in vector])
        except Exception as exc:
            error = error_for(exc)
            if not isinstance(exc, ApiError):
                log.exception("job %s failed unexpectedly", prediction_id)
            if not is_temporary(exc):
                return Outcome(error=error)
        delay = backoff.delay()
        if time.monotonic() + delay >= deadline:
            log.warning(
                "job %s failed after %d attempts within JOB_TIMEOUT=%gs: %s",
                prediction_id, attempts, job_timeout_s, error["error"],
            )  # fmt: skip
            return Outcome(error=error)
        log.debug(
            "job %s: temporary fault (%s %s); retrying in %.2fs",
            prediction_id, error["status"], error["error"], delay,
        )  # fmt: skip
        try:
            await asyncio.wait_for(stopping.wait(), delay)
        except TimeoutError:
            continue
        return Outcome(error=error, interrupted=True)
