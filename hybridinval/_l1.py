"""L1: the per-process memory store.

An L1 store only keeps entries; it never decides whether an entry may be stored (fill guards,
trust and epochs live in :mod:`hybridinval._local`, which calls the mutators under its lock).

L1 TTL is a memory policy: correctness comes from invalidation, never from expiry. Expired
entries are removed by :meth:`L1Store.expire`, which the cache calls from the backplane's
thread at least every 100 ms, so an L1 TTL is honoured to within that tick, and a lookup never
reads a clock.

:class:`MemoryL1` is the default and the fast one: its :attr:`MemoryL1.entries` map is read by the
cache's hit path directly (in C where ``hybridinval._speedups`` is built). An entry there is a
small list ``[value, expires_at, referenced, version]``: ``referenced`` is the CLOCK reference
bit, which a hit sets to 1 (a constant store: counting hits there would cost a hit about as much
as the rest of it, so hits are counted only on request, by the cache), and ``version`` is the L2
version token the value was read or written under (``None`` if unknown): it lets the cache keep
entries across a backplane gap once L2 confirms they are unchanged. Any other :class:`L1Store`
is read through :meth:`L1Store.lookup` instead.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from typing import Any, Protocol

__all__ = ["Entry", "L1Store", "MemoryL1", "NullL1"]

Entry = tuple[Any, float, bytes | None]
"""What :meth:`L1Store.lookup` returns: ``(value, expires_at, version)``."""


class L1Store(Protocol):
    """The L1 seam. :mod:`hybridinval.testing` has the behaviour suite every store must pass
    (``L1StoreContract``).

    Concurrency: the mutators are called under the cache's lock, one at a time; :meth:`lookup`
    and ``len()`` are called without it, from any thread, concurrently with a mutator, and must
    never raise or return a torn entry (under the GIL a dict read is enough).
    """

    def lookup(self, key: str) -> Entry | None:
        """The entry for ``key``, or None. Marks it recently used. An entry past its
        ``expires_at`` may still be returned until :meth:`expire` removed it."""
        ...

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

    def snapshot(self) -> dict[str, Entry]:
        """Every entry, for setting L1 aside during a backplane gap."""
        ...

    def __len__(self) -> int: ...


class MemoryL1:
    """A bounded map with per-entry expiry and CLOCK (second-chance) eviction.

    ``entries`` is the map itself, read by the cache's hit path without a lock: it stays the
    same dict object for the store's lifetime, and ``clear()`` empties it in place.

    CLOCK approximates LRU without reordering the map on a hit: a hit only sets the entry's
    reference bit, and eviction walks from the oldest insertion, giving an entry referenced since
    the hand last passed a second chance (and clearing its bit). Expiry uses a heap of
    deadlines, so a tick costs O(expired · log n).
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self.entries: dict[str, list[Any]] = {}
        self.evictions = 0
        self._deadlines: list[tuple[float, int, str, list[Any]]] = []
        self._tiebreak = itertools.count()

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, key: str) -> Entry | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        entry[2] = 1
        return entry[0], entry[1], entry[3]

    def snapshot(self) -> dict[str, Entry]:
        return {key: (e[0], e[1], e[3]) for key, e in list(self.entries.items())}

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

    def __len__(self) -> int:
        return 0

    def lookup(self, key: str) -> Entry | None:
        return None

    def snapshot(self) -> dict[str, Entry]:
        return {}

    def store(self, key: str, value: Any, expires_at: float, version: bytes | None = None) -> None:
        return None

    def evict_many(self, keys: Iterable[str]) -> int:
        return 0

    def clear(self) -> int:
        return 0

    def expire(self, now: float) -> int:
        return 0
