"""Signals: Ctrl-C (SIGINT), ``kill`` (SIGTERM) and a closed terminal (SIGHUP) all stop the demo
the same way, leaving nothing running and no temporary files.

The first of them raises :class:`Interrupted` in the main thread, which unwinds through the
cleanup that stops everything the demo started. Two stretches are never cut short:

* starting a process and recording it (:meth:`Interrupts.deferred`): the signal is raised when
  the block ends, so no process goes unrecorded;
* the cleanup itself (after :meth:`Interrupts.disarm`): a signal then only sets
  :attr:`Interrupts.hurry`, which cuts the graceful waits short, so a second Ctrl-C, or the
  SIGHUP of a terminal closed after a Ctrl-C, cannot abandon the processes being stopped.

What no handler can see, SIGKILL, is the watchdog's (:mod:`.reaper`), and a process started
just before it waits at :data:`~.processes.GATE` until it is recorded, so none escapes.

An interrupted demo exits with 128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM, 129
for SIGHUP.

This module must never raise from a handler while disarmed or deferring.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["HANDLED", "Interrupted", "Interrupts"]

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by the first of the :data:`HANDLED` signals. A
    ``KeyboardInterrupt``, so that libraries treat it as they treat Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Interrupts:
    """The demo's handler for the :data:`HANDLED` signals (see the module docstring)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        """The first signal received, if any."""
        self.hurry = threading.Event()
        """Set by any signal after the first, or received during the cleanup."""
        self._armed = True
        self._deferring = 0
        self._raised = False

    @property
    def name(self) -> str:
        return "" if self.signum is None else signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int | None:
        return None if self.signum is None else 128 + self.signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handler) for sig in HANDLED}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None or not self._armed:
            self.signum = self.signum or signum
            self.hurry.set()
            return
        self.signum = signum
        self._raise_pending()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A signal received inside the block is raised as it ends (if the block ends without
        an exception of its own; the exit status still reports the signal)."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        self._raise_pending()

    def disarm(self) -> None:
        """The cleanup begins: from now on signals only hurry it."""
        self._armed = False

    def _raise_pending(self) -> None:
        if self.signum is not None and self._armed and not self._deferring and not self._raised:
            self._raised = True
            raise Interrupted(self.signum)
