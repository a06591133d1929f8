"""How the proxy treats a failing upstream: retries with jittered backoff, and a breaker."""

from __future__ import annotations

import enum
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.errors import ApiError

log = logging.getLogger(__name__)


class Fault(enum.Enum):
    """What an upstream error means for the proxy's next step."""

    ITEM = "item"  # the upstream refused the inputs: split the batch, never retry as is
    OVERLOADED = "overloaded"  # TEI's 429: retry with backoff inside the deadline
    TRANSIENT = "transient"  # 5xx, 424, refused or reset connection: a bounded retry
    FINAL = "final"  # timeouts and malformed answers: fail the batch now


def classify(exc: ApiError) -> Fault:
    if exc.status == 429:
        return Fault.OVERLOADED
    if exc.from_upstream and 400 <= exc.status < 500 and exc.status != 424:
        return Fault.ITEM
    if exc.status == 424 or (exc.from_upstream and exc.status >= 500) or exc.status == 503:
        return Fault.TRANSIENT
    return Fault.FINAL


def counts_against_upstream(exc: ApiError) -> bool:
    """Failures that say the upstream itself is unwell (not the caller's input, not load)."""
    return classify(exc) in (Fault.TRANSIENT, Fault.FINAL)


@dataclass(slots=True)
class RetryPolicy:
    max_retries: int = 2  # for TRANSIENT faults; OVERLOADED retries until the deadline
    base_delay_s: float = 0.05
    max_delay_s: float = 1.0

    def delay(self, attempt: int) -> float:
        """Full jitter: spreads retries of many batches so they don't arrive together."""
        ceiling = min(self.max_delay_s, self.base_delay_s * (2**attempt))
        return random.uniform(ceiling / 2, ceiling)


class CircuitBreaker:
    """Opens after ``threshold`` consecutive upstream failures; while open, calls fail fast.

    Closing is the prober's job (it calls :meth:`record_success` once the upstream's health
    check passes) or any call that succeeds. The breaker itself only keeps state.
    """

    def __init__(
        self,
        threshold: int = 5,
        cooldown_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def record_success(self) -> None:
        if self._opened_at is not None:
            log.info("upstream circuit closed: the upstream answers again")
        self._failures = 0
        self._opened_at = None

    def record_failure(self) -> bool:
        """Count a failure; return True if this one opened the breaker."""
        self._failures += 1
        if self._opened_at is None and self._failures >= self.threshold:
            self._opened_at = self._clock()
            log.warning(
                "upstream circuit opened after %d consecutive failures; failing fast and "
                "probing its health every %.1fs",
                self._failures,
                self.cooldown_s,
            )
            return True
        return False
