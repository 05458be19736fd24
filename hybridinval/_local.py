"""The per-process state every part of the cache stands on: L1, in-flight fills, the epoch.

:class:`LocalState` is the floor below the read path (:mod:`._cache`), the backplane listener
(:mod:`._coherence`), the after-commit publisher (:mod:`._publish`) and the hit paths
(:mod:`._hitpath`). They share it and nothing else, so none of them calls back up into another.
One instance belongs to one OS process: a forked child builds a new one.

The fill guard lives here. A fill may store in L1 only if, under :attr:`LocalState.lock`, it was
not cancelled (an invalidation of its key arrived while it was in flight), the epoch did not
move (no flush, no blind period began or ended) and the backplane is trusted: a value read
before an invalidation is never stored after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable
from typing import Any

from ._l1 import Entry, L1Store

__all__ = ["COUNTERS", "MISSING", "Fill", "LocalState"]

MISSING: Any = object()
"""No value: a miss (distinct from a cached ``None``)."""

COUNTERS = (
    "l1_misses",
    "l2_hits",
    "l2_misses",
    "l2_errors",
    "l2_corrupt",
    "l2_cas_rejections",
    "loads",
    "single_flight_waits",
    "fill_guard_rejections",
    "invalidations_sent",
    "keys_invalidated",
    "invalidations_received",
    "keys_evicted_remote",
    "echoes_ignored",
    "messages_malformed",
    "flushes",
    "blind_periods",
    "publish_failures",
    "publish_retries_succeeded",
    "l1_restored",
    "l1_quarantine_dropped",
    "lease_waits",
    "lease_flushes",
    "keys_replayed",
)
"""The event counters of ``HybridCache.stats()`` (see :class:`hybridinval.CacheStats`)."""


class Fill:
    """One in-flight load of one key: its guard and, for single flight, its future.

    Waiters may be threads (:meth:`wait`) or coroutines on any event loop (:meth:`wait_async`).
    A coroutine registers, under :attr:`LocalState.lock`, only while the fill is still in
    :attr:`LocalState.fills`; the fill leaves that map (under the lock) before :meth:`finish`,
    so every registered waiter is woken.
    """

    __slots__ = ("_done", "_waiters", "cancelled", "epoch", "error", "loop", "value")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.cancelled = False
        self.value: Any = None
        self.error: BaseException | None = None
        # A held lock is the cheapest "done" flag to wait on (an Event builds a Condition).
        self._done = threading.Lock()
        self._done.acquire()
        self._waiters: list[asyncio.Future[None]] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # of a coroutine that leads it

    def finish(self) -> None:
        self._done.release()
        waiters, self._waiters = self._waiters, None
        if waiters:
            for future in waiters:
                _wake(future)

    def wait(self) -> Any:
        loop = self.loop
        if loop is not None and asyncio._get_running_loop() is loop and self._done.locked():
            # Blocking here would stop the very loop whose coroutine is loading the key.
            raise RuntimeError(
                "a blocking read on the event loop that is loading this key would never "
                "return: use the asyncio cache's await cache.get(...) on the loop"
            )
        with self._done:  # each waiter passes the released lock on to the next
            pass
        return self._outcome()

    def add_waiter_locked(self) -> asyncio.Future[None]:
        """A future of the running loop, woken by :meth:`finish` (call under the lock, while
        the fill is registered)."""
        future = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = [future]
        else:
            self._waiters.append(future)
        return future

    async def wait_async(self, future: asyncio.Future[None]) -> Any:
        """Await the fill through ``future`` (from :meth:`add_waiter_locked`). Cancelling the
        waiter cancels only its own future: the load and the other waiters go on."""
        await future
        return self._outcome()

    def _outcome(self) -> Any:
        error = self.error
        if error is not None:
            if isinstance(error, asyncio.CancelledError):
                # The leader's task was cancelled: its waiters' load is cancelled with it. A
                # fresh exception per waiter (one instance raised in several tasks would chain
                # their tracebacks together).
                raise asyncio.CancelledError(*error.args or ("the load was cancelled",))
            raise error
        return self.value


def _wake(future: asyncio.Future[None]) -> None:
    """Wake a waiter from any thread: directly on its own loop, else through the loop's
    thread-safe queue. A waiter whose loop has closed has nobody left to wake."""
    loop = future.get_loop()
    if asyncio._get_running_loop() is loop:
        if not future.done():
            future.set_result(None)
        return
    with contextlib.suppress(RuntimeError):  # the loop is closed
        loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # a cancelled waiter's future stays cancelled
        future.set_result(None)


class LocalState:
    """This process's L1, its in-flight fills, the epoch and the trust flag, under one lock.

    Methods named ``*_locked`` expect :attr:`lock` held; the others take it.
    """

    __slots__ = (
        "epoch",
        "fills",
        "l1",
        "lock",
        "quarantine",
        "quarantine_unproven",
        "quarantined_at",
        "restoring",
        "stats",
        "trusted",
    )

    def __init__(self, l1: L1Store) -> None:
        self.lock = threading.Lock()
        self.l1 = l1
        self.fills: dict[str, Fill] = {}
        self.epoch = 0
        # True only while the backplane is confirmed subscribed: L1 may be stored and served.
        self.trusted = False
        # L1 entries set aside while the backplane is blind, and the keys of a restore in
        # progress (see hybridinval._coherence).
        self.quarantine: dict[str, Entry] = {}
        # True while the set-aside entries include some from before a gap that L2 has not yet
        # proven unchanged (a restore pending): those may only come back through that proof.
        self.quarantine_unproven = False
        self.quarantined_at = 0.0
        self.restoring: set[str] | None = None
        self.stats: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    # -- fills --------------------------------------------------------------------------------

    def store_if_guarded(
        self, key: str, fill: Fill, value: Any, expires_at: float, version: bytes | None
    ) -> bool:
        """Store a fill's value in L1 if the fill guard allows it (under the lock)."""
        with self.lock:
            if fill.cancelled or fill.epoch != self.epoch or not self.trusted:
                self.stats["fill_guard_rejections"] += 1
                stored = False
            else:
                self.l1.store(key, value, expires_at, version)
                stored = True
            self.end_fill_locked(key, fill)
        return stored

    def end_fill_locked(self, key: str, fill: Fill) -> None:
        if self.fills.get(key) is fill:
            del self.fills[key]

    # -- eviction -----------------------------------------------------------------------------

    def evict(self, keys: Iterable[str]) -> None:
        """Evict ``keys`` from L1 and cancel their in-flight fills."""
        with self.lock:
            self.l1.evict_many(keys)
            self.cancel_locked(keys)

    def cancel_locked(self, keys: Iterable[str]) -> None:
        if self.restoring is not None or self.quarantine:
            keys = list(keys)
            if self.restoring is not None:
                self.restoring.difference_update(keys)
            # Entries set aside while blind: whatever invalidates a key (a message, this
            # process's own write) must keep its old value from ever coming back.
            for key in keys:
                self.quarantine.pop(key, None)
        fills = self.fills
        for key in keys:
            # Popping, not just flagging: a caller arriving after the invalidation must start a
            # fresh load instead of joining one that read the old value.
            fill = fills.pop(key, None)
            if fill is not None:
                fill.cancelled = True

    def flush(self) -> None:
        with self.lock:
            self.flush_locked()

    def flush_locked(self, *, keep_quarantine: bool = False) -> None:
        """Empty L1, cancel every fill and move the epoch (no fill begun before may store)."""
        self.stats["flushes"] += 1
        if not keep_quarantine:
            self.quarantine = {}
            self.quarantine_unproven = False
        self.restoring = None
        self.l1.clear()
        for fill in self.fills.values():
            fill.cancelled = True
        self.fills.clear()
        self.epoch += 1
