"""Delivery progress of a subscriber thread that reads its sockets (one per server it
subscribes on): what ``Transport.caught_up`` reads.

The subscriber sets :attr:`DeliveryProgress.busy` before it may read from a socket and calls
:meth:`DeliveryProgress.idle` only once everything it read has been handed to the listener
(a reply read in part keeps it busy). A reader checks in that order's reverse: first that the
sockets hold nothing, *then* that the subscriber is not busy. A byte that was in a socket
before the first check has then either been read, by a subscriber that went busy before
reading and stays busy until it is applied, or is still there; so the two together prove that
every byte that reached the sockets before the check has been applied. (The other order has a
hole: not busy, then the subscriber wakes and reads, then the sockets look empty.) Readers
(the L1 lease) check that without ever blocking the subscriber.
"""

from __future__ import annotations

import select
import threading
import time
from typing import Any

__all__ = ["DeliveryProgress"]


class DeliveryProgress:
    def __init__(self) -> None:
        self.socks: tuple[Any, ...] | None = None  # the subscribed sockets; None while not
        self.busy = False
        self._cond = threading.Condition(threading.Lock())
        self._waiters = 0

    def subscribed(self, *socks: Any) -> None:
        """Subscribed on ``socks`` (the subscriber is busy until its first :meth:`idle`)."""
        self.busy = True
        self.socks = socks

    def unsubscribed(self) -> None:
        self.socks = None
        self.idle()

    def idle(self) -> None:
        """The subscriber has applied everything it read: wake readers waiting in caught_up."""
        self.busy = False
        if self._waiters:
            with self._cond:
                self._cond.notify_all()

    def caught_up(self, timeout: float) -> float | None:
        """As :meth:`Transport.caught_up <hybridinval.Transport.caught_up>`."""
        now = time.monotonic()
        if self.settled():
            return now
        deadline = now + timeout
        with self._cond:
            self._waiters += 1
            try:
                while True:
                    now = time.monotonic()
                    if self.settled():
                        return now
                    if now >= deadline:
                        return None
                    # Woken when the subscriber goes idle; the cap only guards a lost wake-up.
                    self._cond.wait(min(deadline - now, 0.005))
            finally:
                self._waiters -= 1

    def settled(self) -> bool:
        socks = self.socks
        if socks is None:
            return True  # not subscribed: the listener is blind and keeps no L1
        try:
            readable, _, _ = select.select(socks, (), (), 0)
        except (OSError, ValueError):  # closed under us: the subscriber is about to go blind
            return False
        return not readable and not self.busy  # sockets first, then busy (see above)
