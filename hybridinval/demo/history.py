"""What happened: every committed write and every read, and which reads were stale."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from dataclasses import dataclass

__all__ = ["History", "Read"]


@dataclass
class Read:
    user_id: int
    version: int
    started_ns: int
    process: str  # "web:<pid>" or "task:<pid>"


class History:
    """Every committed write and every read, from all driver threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.commits: dict[int, list[tuple[int, int]]] = defaultdict(list)  # user -> (ns, v)
        self.reads: list[Read] = []
        self.errors: list[str] = []
        self.writes = 0

    def commit(self, user_id: int, version: int, committed_ns: int) -> None:
        with self._lock:
            self.commits[user_id].append((committed_ns, version))
            self.writes += 1

    def read(self, read: Read) -> None:
        with self._lock:
            self.reads.append(read)

    def error(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)

    def stale(self, delta_ns: int) -> list[tuple[Read, int]]:
        """Every stale read, with the version it should at least have returned."""
        floors: dict[int, tuple[list[int], list[int]]] = {}
        for user_id, commits in self.commits.items():
            ordered = sorted(commits)
            times, best, newest = [], [], 0
            for committed_ns, version in ordered:
                newest = max(newest, version)
                times.append(committed_ns)
                best.append(newest)
            floors[user_id] = (times, best)
        stale = []
        for read in self.reads:
            times, best = floors.get(read.user_id, ([], []))
            i = bisect.bisect_left(times, read.started_ns - delta_ns)  # commits strictly before
            required = best[i - 1] if i else 0
            if read.version < required:
                stale.append((read, required))
        return stale
