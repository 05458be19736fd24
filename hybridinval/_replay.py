"""Failover replay: the keys this process invalidated lately, sent again when the store's
incarnation changes.

Redis replicates asynchronously. A master that dies may have acknowledged a delete (and a new
version) that never reached the replica promoted in its place: the new master then serves the
deleted value under the version it had, and every fill from it is "fresh" by the compare-and-
set's lights. Only the writer knows what it wrote; so each process keeps the keys of its own
invalidations and ``set()`` calls for ``window`` seconds, and when its subscriber finds a new
incarnation after a gap it invalidates them again (idempotent: a key deleted twice is a miss).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable

__all__ = ["RecentKeys"]

log = logging.getLogger("hybridinval")


class RecentKeys:
    """The keys sent in the last ``window`` seconds, at most ``max_keys`` of them."""

    def __init__(self, window: float, max_keys: int) -> None:
        self.window = window
        self.max_keys = max_keys
        self._batches: deque[tuple[float, tuple[str, ...]]] = deque()
        self._count = 0
        self._lock = threading.Lock()
        self._warned = False

    def add(self, keys: Iterable[str]) -> None:
        if self.window <= 0:
            return
        batch = tuple(keys)
        now = time.monotonic()
        with self._lock:
            self._batches.append((now, batch))
            self._count += len(batch)
            self._trim(now)

    def _trim(self, now: float) -> None:
        batches, horizon = self._batches, now - self.window
        while batches and (batches[0][0] < horizon or self._count > self.max_keys):
            at, dropped = batches.popleft()
            self._count -= len(dropped)
            if at >= horizon and not self._warned:
                self._warned = True
                log.warning(
                    "failover replay keeps at most %d keys: invalidations younger than %.0f s "
                    "are being forgotten (raise max_replayed)",
                    self.max_keys,
                    self.window,
                )

    def keys(self) -> list[str]:
        """Every key of the window, once, oldest first."""
        with self._lock:
            self._trim(time.monotonic())
            return list(dict.fromkeys(k for _, batch in self._batches for k in batch))
