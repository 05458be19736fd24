"""Signals during the demo: SIGINT and SIGTERM stop it cleanly."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["Interrupts"]


class Interrupts:
    """SIGINT/SIGTERM become KeyboardInterrupt in the main thread, except inside
    :meth:`deferred`, which raises it on the way out instead."""

    def __init__(self) -> None:
        self.received = threading.Event()
        self._deferring = 0
        self._pending = False

    def handler(self, signum: int, frame: Any) -> None:
        if self.received.is_set():
            return  # already stopping: a second Ctrl-C must not cut the cleanup short
        self.received.set()
        if self._deferring:
            self._pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
            if not self._deferring and self._pending:
                self._pending = False
                raise KeyboardInterrupt
