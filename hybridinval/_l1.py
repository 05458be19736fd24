"""L1: the per-process memory store.

An L1 store only keeps entries; it never decides whether an entry may be stored (fill guards,
trust and epochs live in :mod:`hybridinval._cache`, which calls the mutators under its lock).

Reads are lock-free and never look at an entry's deadline: the cache's hot path reads
:attr:`L1Store.entries` directly, and an entry present in the map is live. Expired entries are
removed by :meth:`L1Store.expire`, which the cache calls from its background thread at least
every 100 ms, so an L1 TTL is honoured to within that tick. (L1 TTL is a memory policy:
correctness comes from invalidation, never from expiry. The one clock read on the hit path is
the cache's lease check, which is about invalidations.)

An entry is a small list ``[value, expires_at, referenced, version]``: ``referenced`` is the
CLOCK reference bit, which a hit sets to 1 (a constant store: counting hits there would cost a
hit about 50 ns, as much as the rest of it, so hits are counted only on request, by the cache),
and ``version`` is the L2 version token the value was read or written under (``None`` if unknown):
it lets the cache keep entries across a backplane gap once L2 confirms they are unchanged.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from typing import Any, Protocol

__all__ = ["L1Store", "MemoryL1", "NullL1"]

Entry = list[Any]


class L1Store(Protocol):
    """The L1 seam. ``entries`` is read without a lock; mutators are called under the cache lock.

    ``entries`` must stay the same dict object for the store's lifetime (the cache binds it once),
    and every entry in it must be live: readers do not look at ``expires_at``.
    """

    entries: dict[str, Entry]

    def store(self, key: str, value: Any, expires_at: float, version: bytes | None = None) -> None:
        """Insert or replace ``key``. Idempotent. May evict other entries to stay bounded."""
        ...

    def evict_many(self, keys: Iterable[str]) -> int:
        """Remove ``keys`` if present; return how many were present. Idempotent."""
        ...

    def clear(self) -> int:
        """Remove every entry; return how many there were. Idempotent."""
        ...

    def expire(self, now: float) -> int:
        """Remove entries whose ``expires_at`` is at or before ``now``; return how many."""
        ...


class MemoryL1:
    """A bounded map with per-entry expiry and CLOCK (second-chance) eviction.

    CLOCK approximates LRU without reordering the map on a hit: a hit only sets the entry's
    reference bit, and eviction walks from the oldest insertion, giving an entry referenced since
    the hand last passed a second chance (and clearing its bit). Expiry uses a heap of
    deadlines, so a tick costs O(expired · log n).
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self.entries: dict[str, Entry] = {}
        self.evictions = 0
        self._deadlines: list[tuple[float, int, str, Entry]] = []
        self._tiebreak = itertools.count()

    def __len__(self) -> int:
        return len(self.entries)

    def store(self, key: str, value: Any, expires_at: float, version: bytes | None = None) -> None:
        entries = self.entries
        old = entries.pop(key, None)  # re-insert at the young end
        if old is None and len(entries) >= self.max_entries:
            self._evict_one()
        entry = [value, expires_at, 0, version]
        entries[key] = entry
        heapq.heappush(self._deadlines, (expires_at, next(self._tiebreak), key, entry))
        if len(self._deadlines) > 2 * len(entries) + 1024:
            self._compact()

    def _evict_one(self) -> None:
        entries = self.entries
        # At most one full revolution: every entry referenced since the last pass loses its bit.
        for _ in range(len(entries) + 1):
            key = next(iter(entries))
            entry = entries.pop(key)
            if entry[2]:
                entry[2] = 0
                entries[key] = entry
                continue
            self.evictions += 1
            return

    def evict_many(self, keys: Iterable[str]) -> int:
        pop = self.entries.pop
        count = 0
        for key in keys:
            if pop(key, None) is not None:
                count += 1
        return count

    def clear(self) -> int:
        entries = self.entries
        count = len(entries)
        entries.clear()  # in place: the cache's hot path holds a reference to this dict
        self._deadlines.clear()
        return count

    def expire(self, now: float) -> int:
        deadlines, entries = self._deadlines, self.entries
        count = 0
        while deadlines and deadlines[0][0] <= now:
            _, _, key, entry = heapq.heappop(deadlines)
            # The heap keeps items for replaced or evicted entries; only remove the live one.
            if entries.get(key) is entry:
                del entries[key]
                count += 1
        return count

    def _compact(self) -> None:
        entries = self.entries
        self._deadlines = [item for item in self._deadlines if entries.get(item[2]) is item[3]]
        heapq.heapify(self._deadlines)


class NullL1:
    """L1 disabled: every read goes to L2. For measuring, or for values that must not linger."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def __len__(self) -> int:
        return 0

    def store(self, key: str, value: Any, expires_at: float, version: bytes | None = None) -> None:
        return None

    def evict_many(self, keys: Iterable[str]) -> int:
        return 0

    def clear(self) -> int:
        return 0

    def expire(self, now: float) -> int:
        return 0
