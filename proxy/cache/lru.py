"""An in-memory LRU of vectors, bounded in bytes.

Values are bytes, each stored once: a vector's little-endian float32 bytes, or the JSON
array an HTTP upstream wrote (:class:`proxy.cache.front.JsonRow`); either is answered
without a copy of its floats. The bound counts the bytes actually held. Entries have no
TTL: a model version's vectors never change, so an entry is only ever evicted for room, or
because its version left the registry.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

# What one entry costs beyond its key's and value's bytes: the bytes objects' headers, the
# ordered dict's slot and link, and malloc's own overhead, rounded up. Measured with
# tracemalloc (tests/test_cache_lru.py checks the bound holds), so the configured size is
# what the process really spends, not just the sum of the vectors.
ENTRY_OVERHEAD = 256
# Every key starts with its model version's group id (4 bytes), then its SHA-256.
GROUP_BYTES = 4


@dataclass(frozen=True, slots=True)
class LruStats:
    max_bytes: int
    used_bytes: int
    entries: int
    evicted_for_room: int
    evicted_for_version: int


class VectorLRU:
    """A byte-bounded LRU: ``get`` makes an entry the most recent, ``put`` evicts the least
    recent entries until the new one fits. Not thread-safe: one event loop owns it."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._groups: dict[tuple[str, str], bytes] = {}
        self._retired: set[bytes] = set()
        self._next_group = 0
        self._evicted_room = 0
        self._evicted_version = 0

    @property
    def used_bytes(self) -> int:
        return self._bytes

    @property
    def entries(self) -> int:
        return len(self._entries)

    def stats(self) -> LruStats:
        return LruStats(
            self.max_bytes,
            self._bytes,
            len(self._entries),
            self._evicted_room,
            self._evicted_version,
        )

    @staticmethod
    def cost(key: bytes, value: bytes) -> int:
        return len(key) + len(value) + ENTRY_OVERHEAD

    def group(self, model: str, version: str) -> bytes:
        """The key prefix of a model version's entries (a new one after it was evicted, so
        late results of the evicted version cannot come back under it)."""
        prefix = self._groups.get((model, version))
        if prefix is None:
            prefix = self._next_group.to_bytes(GROUP_BYTES, "little")
            self._next_group += 1
            self._groups[(model, version)] = prefix
        return prefix

    def get(self, key: bytes) -> bytes | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def put(self, key: bytes, value: bytes) -> bool:
        """Store ``value`` as the most recent entry; False if it is not kept (larger than the
        whole cache, or of an evicted version)."""
        if key[:GROUP_BYTES] in self._retired:
            return False
        cost = self.cost(key, value)
        if cost > self.max_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= self.cost(key, old)
        entries = self._entries
        while entries and self._bytes + cost > self.max_bytes:
            evicted_key, evicted = entries.popitem(last=False)
            self._bytes -= self.cost(evicted_key, evicted)
            self._evicted_room += 1
        entries[key] = value
        self._bytes += cost
        return True

    def evict_version(self, model: str, version: str) -> int:
        """Drop every entry of a model version that left the registry; return how many."""
        prefix = self._groups.pop((model, version), None)
        if prefix is None:
            return 0
        self._retired.add(prefix)
        doomed = [k for k in self._entries if k[:GROUP_BYTES] == prefix]
        for key in doomed:
            self._bytes -= self.cost(key, self._entries.pop(key))
        self._evicted_version += len(doomed)
        return len(doomed)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
