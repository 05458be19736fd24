"""Load through a fault: a writer and a reader thread, and the staleness check of their log."""

from __future__ import annotations

import random
import threading
import time

from hybridinval import HybridCache

__all__ = ["Load"]


class Load:
    """A writer thread that commits to ``truth`` and invalidates as after a commit, and a
    reader thread that reads through the cache, until :meth:`stop`. A read is stale if it began
    more than DELTA after the invalidation of a newer value went out (values only grow)."""

    DELTA = 0.05

    def __init__(self, writer: HybridCache, reader: HybridCache, keys: int = 30) -> None:
        self.writer, self.reader = writer, reader
        self.truth = {f"row:{i}": 0 for i in range(keys)}
        self.published: dict[str, list[tuple[int, float]]] = {k: [] for k in self.truth}
        self.reads: list[tuple[str, int, float]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=f) for f in (self._write, self._read)]
        for thread in self._threads:
            thread.start()

    def _write(self) -> None:
        rng = random.Random(1)
        while not self._stop.is_set():
            key = rng.choice(list(self.truth))
            value = self.truth[key] = self.truth[key] + 1

            def done(key: str = key, value: int = value) -> None:
                self.published[key].append((value, time.time()))

            self.writer.invalidate_committed([key], on_published=done)
            time.sleep(0.002)

    def _read(self) -> None:
        rng = random.Random(2)
        while not self._stop.is_set():
            key = rng.choice(list(self.truth))
            began = time.time()
            value = self.reader.get_or_set(key, lambda key=key: self.truth[key])
            self.reads.append((key, value, began))

    def stop(self) -> list[tuple[str, int, int]]:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        stale = []
        for key, value, began in self.reads:
            floor = max((v for v, at in self.published[key] if at < began - self.DELTA), default=0)
            if value < floor:
                stale.append((key, value, floor))
        return stale
