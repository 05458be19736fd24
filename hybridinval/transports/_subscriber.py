"""The subscriber thread of the Redis transports: subscribe, listen, and on any failure report
blindness first, then reconnect with jittered backoff.

A subclass implements :meth:`SubscriberThread._subscribe_and_listen` (connect, subscribe, report
``on_connected``, deliver until something fails, then raise) and
:meth:`SubscriberThread._close_conns`.
"""

from __future__ import annotations

import logging
import random
import threading
from typing import Any

from ._base import BackplaneListener
from ._progress import DeliveryProgress

__all__ = ["SubscriberThread"]

log = logging.getLogger("hybridinval.backplane")


class SubscriberThread:
    channel: str
    _backoff_min: float
    _backoff_max: float

    def _init_thread(self) -> None:
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.connects = 0
        # What caught_up() reads: the subscribed sockets, and whether bytes may have been read
        # from them but not yet handed to the listener (see DeliveryProgress).
        self.progress = self._new_progress()

    def _new_progress(self) -> DeliveryProgress:
        return DeliveryProgress()

    def _subscribe_and_listen(self, listener: BackplaneListener) -> None:
        raise NotImplementedError

    def _close_conns(self) -> None:
        raise NotImplementedError

    def start(self, listener: BackplaneListener) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(listener,), name=f"hybridinval-sub:{self.channel}", daemon=True
        )
        self._thread.start()

    def _stop_thread(self) -> None:
        """Stop delivering: the sockets are shut so that the thread's wait ends now."""
        self._stop.set()
        self.progress.unsubscribed()
        self._close_conns()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)
        self._thread = None

    def _forget_thread(self) -> None:
        """After fork: the parent's thread does not exist here and its sockets are the parent's
        (shutting them down would cut the parent's connection): drop the references only."""
        self._thread = None
        self._stop = threading.Event()
        self.progress = self._new_progress()

    def caught_up(self, timeout: float) -> float | None:
        return self.progress.caught_up(timeout)

    def _run(self, listener: BackplaneListener) -> None:
        backoff = self._backoff_min
        while not self._stop.is_set():
            connects_before = self.connects
            try:
                self._subscribe_and_listen(listener)
            except Exception as exc:  # the loop must survive anything
                if self._stop.is_set():
                    break
                # A connection that got subscribed counts as a success: the next loss starts
                # the backoff afresh, so a flapping network never pushes a healthy process to
                # the maximum wait (the blind period is what the backoff must keep short).
                if self.connects > connects_before:
                    backoff = self._backoff_min
                    log.warning("backplane %s: %s; resubscribing", self.channel, exc)
                else:
                    log.debug("backplane %s: %s", self.channel, exc)
                self._safe_call(listener.on_blind, str(exc) or type(exc).__name__)
                self.progress.unsubscribed()
                self._close_conns()
                # Full jitter keeps a fleet of processes from reconnecting in lockstep.
                self._stop.wait(random.uniform(0, backoff))
                backoff = min(self._backoff_max, backoff * 2)
        self.progress.unsubscribed()
        self._close_conns()

    def _safe_call(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("backplane %s: listener %s failed", self.channel, fn.__name__)
