"""Group sending: invalidations that the threads of one process send while another's round
trip is in flight ride the next round trip together, as one script call and one message.

Adaptive by construction: a lone sender (an idle process) goes out at once, exactly as without
grouping; only senders that would have queued behind a round trip anyway are merged. Each
sender returns once a round trip that carried its keys has succeeded (so its caller's
guarantees hold as if it had sent alone), or raises that round trip's error. No sender waits
for more than the round trip in flight and then its own group's: the first sender waiting takes
the whole queue with it, and the others of that group ride along.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .errors import BackendUnavailableError

__all__ = ["GroupSend"]


class _Sender:
    __slots__ = ("done", "error", "keys", "lead")

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.done = False
        self.lead = False
        self.error: BaseException | None = None


class GroupSend:
    """Calls ``send(keys)`` (one round trip) for every batch given to it, merging batches that
    arrive while a round trip is in flight."""

    def __init__(self, send: Callable[[list[str]], None]) -> None:
        self._send = send
        self._cond = threading.Condition(threading.Lock())
        self._busy = False
        self._queue: list[_Sender] = []
        self.round_trips = 0
        self.merged = 0  # batches that rode another's round trip

    def __call__(self, keys: list[str]) -> None:
        me = _Sender(keys)
        with self._cond:
            if self._busy:
                self._queue.append(me)
                try:
                    while not (me.done or me.lead):
                        self._cond.wait()
                except BaseException:
                    # Interrupted while waiting (a signal, a time limit): leave the queue, or
                    # hand on the lead already given, so that nobody waits for us forever.
                    if me in self._queue:
                        self._queue.remove(me)
                    if me.lead:
                        self._hand_on_locked()
                    raise
                if me.done:
                    if me.error is not None:
                        raise me.error
                    return
                group, self._queue = self._queue, []  # leading now: take every waiter along
            else:
                self._busy = True
                group = [me]
        error: BaseException | None = None
        try:
            merged = (
                keys
                if len(group) == 1
                else list(dict.fromkeys(k for sender in group for k in sender.keys))
            )
            self._send(merged)
        except BaseException as exc:
            error = exc
        finally:
            with self._cond:
                self.round_trips += 1
                self.merged += len(group) - 1
                for sender in group:
                    if sender is not me:
                        sender.done = True
                        sender.error = _for_rider(error)
                self._hand_on_locked()
        if error is not None:
            raise error

    def _hand_on_locked(self) -> None:
        """The round trip in flight is over: the first waiter leads the next, or none is
        busy."""
        if self._queue:
            self._queue[0].lead = True
        else:
            self._busy = False
        self._cond.notify_all()


def _for_rider(error: BaseException | None) -> BaseException | None:
    """What a sender whose keys rode another's round trip raises: the same store failure, or,
    if the leader was interrupted (not a store failure), a store failure all the same (its keys
    may not have gone out; the caller's retry takes over)."""
    if error is None or isinstance(error, BackendUnavailableError):
        return error
    return BackendUnavailableError(f"the round trip this invalidation rode on failed: {error!r}")
