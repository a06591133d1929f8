"""Finding the items an upstream refused when it refuses a whole batch without naming one.

TEI (and OpenAI-compatible servers) answer 422/413 for a batch that holds one bad input;
the other callers of that batch did nothing wrong. The bisector splits the batch and retries
the halves, so only the offending items fail and their neighbours get their vectors.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from proxy.errors import ApiError
from proxy.resilience import Fault, classify
from proxy.tracing import RequestSpan
from proxy.upstream.base import EmbedInput, EmbedOptions, Vector

# A harmless input for telling a batch-wide refusal from two items refused alike.
PROBE_INPUT = "a"


@dataclass(frozen=True, slots=True)
class Item:
    """One queued input with what its upstream call needs."""

    input: EmbedInput
    options: EmbedOptions
    deadline: float
    # The request's span (tracing on), and when the item was queued, for its queue wait.
    trace: RequestSpan | None = None
    queued_at: float = 0.0


# One upstream call for a batch's items (with retries and replica choice).
Call = Callable[[Sequence[Item]], Awaitable[list[Vector]]]


def _same_error(a: ApiError, b: ApiError) -> bool:
    return (a.status, a.error_type, a.message) == (b.status, b.error_type, b.message)


class Bisector:
    def __init__(self, call: Call, on_split: Callable[[], None]) -> None:
        self._call = call
        self._on_split = on_split

    async def process(self, items: list[Item]) -> list[Vector | BaseException]:
        """One batch. If the upstream refuses it for its inputs without naming one, split it
        and retry the halves, so only the offending items fail and their neighbours succeed."""
        try:
            return list(await self._call(items))
        except ApiError as exc:
            if classify(exc) is not Fault.ITEM:
                raise
            return await self._bisect(items, exc, item_specific=False)

    async def _bisect(
        self, items: list[Item], exc: ApiError, *, item_specific: bool
    ) -> list[Vector | BaseException]:
        """``items`` were refused with ``exc``, an item fault: find which items are at fault.

        If both halves are refused with the very same error, the refusal is probably not
        about any one item (e.g. an unknown ``prompt_name``): one call with a harmless input
        settles it, and if that is refused alike, every item gets the error at once instead
        of ~2n calls. Two bad items that fail alike (same message) keep being split; once the
        harmless input passed (``item_specific``), no further probe is needed.
        """
        if len(items) == 1:
            return [exc]
        self._on_split()
        mid = len(items) // 2
        halves = (items[:mid], items[mid:])
        # Halves go one after the other: splitting must not exceed the upstream's
        # concurrency bound that the batcher keeps.
        outcomes = [await self._try(half) for half in halves]
        left, right = outcomes
        if (
            not item_specific
            and len(items) > 2
            and isinstance(left, ApiError)
            and isinstance(right, ApiError)
            and _same_error(left, right)
        ):
            if await self._refused_for_any_input(items, left):
                return [left] * len(items)
            item_specific = True
        results: list[Vector | BaseException] = []
        for half, outcome in zip(halves, outcomes, strict=True):
            if isinstance(outcome, ApiError):
                results.extend(await self._bisect(half, outcome, item_specific=item_specific))
            else:
                results.extend(outcome)
        return results

    async def _try(self, items: list[Item]) -> list[Vector] | ApiError:
        """A call whose item fault is returned, not raised; other faults still raise."""
        try:
            return await self._call(items)
        except ApiError as exc:
            if classify(exc) is not Fault.ITEM:
                raise
            return exc

    async def _refused_for_any_input(self, items: list[Item], exc: ApiError) -> bool:
        probe = Item(PROBE_INPUT, items[0].options, max(item.deadline for item in items))
        outcome = await self._try([probe])
        return isinstance(outcome, ApiError) and _same_error(outcome, exc)
