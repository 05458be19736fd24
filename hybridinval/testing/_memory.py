"""An L2 store and a backplane in this process's memory, with the guarantees of the Redis ones.

Several caches built on one :class:`MemoryL2` and one :class:`MemoryHub` behave like processes
sharing a Redis: each has its own L1, and each hears the others' invalidations on its own
delivery thread. Faults are one call away: :meth:`MemoryL2.fail` makes every store call raise
``BackendUnavailableError``; :meth:`MemoryTransport.cut` loses a transport's connection (queued
messages are lost, the listener is told it is blind) until :meth:`MemoryTransport.heal`.

For tests (yours and ours) of code that uses a cache, without a Redis server; not for
production: nothing here crosses a process boundary.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from .._l2 import L2Store, Notify
from ..errors import BackendUnavailableError
from ..transports import TICK_INTERVAL, BackplaneListener

__all__ = ["MemoryHub", "MemoryL2", "MemoryTransport"]

log = logging.getLogger("hybridinval.testing")


def _token() -> bytes:
    return secrets.token_hex(8).encode()


class MemoryL2:
    """A versioned L2 in memory: every method is atomic, versions are random tokens, and
    values and versions expire on ``clock`` (``time.monotonic`` unless given)."""

    def __init__(
        self, *, version_ttl: float = 600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if version_ttl <= 0:
            raise ValueError(f"version_ttl must be > 0, got {version_ttl!r}")
        self.version_ttl = version_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._values: dict[str, tuple[bytes, bytes, float]] = {}  # payload, version, expires
        self._versions: dict[str, tuple[bytes, float]] = {}
        self._incarnation = _token().decode()
        self._failure: str | None = None
        self.calls = 0

    # -- faults ---------------------------------------------------------------------------------

    def fail(self, reason: str = "MemoryL2 is down") -> None:
        """Make every call raise ``BackendUnavailableError`` until :meth:`recover`."""
        self._failure = reason

    def recover(self) -> None:
        self._failure = None

    def flush(self) -> None:
        """Lose everything, as a restarted or flushed server would (a new incarnation)."""
        with self._lock:
            self._values.clear()
            self._versions.clear()
            self._incarnation = _token().decode()

    def _enter(self, what: str) -> None:
        self.calls += 1
        if self._failure is not None:
            raise BackendUnavailableError(f"{what} failed: {self._failure}")

    def _version(self, key: str, now: float) -> bytes:
        found = self._versions.get(key)
        if found is None or found[1] <= now:
            self._versions.pop(key, None)
            return b""
        return found[0]

    def _value(self, key: str, now: float) -> tuple[bytes, bytes] | None:
        found = self._values.get(key)
        if found is None or found[2] <= now:
            self._values.pop(key, None)
            return None
        return found[0], found[1]

    # -- the L2Store protocol -----------------------------------------------------------------

    def get(self, key: str) -> tuple[bytes | None, bytes | None]:
        self._enter(f"L2 read of {key!r}")
        with self._lock:
            found = self._value(key, self._clock())
        return (None, None) if found is None else found

    def get_for_fill(self, key: str) -> tuple[bytes | None, bytes]:
        self._enter(f"L2 read of {key!r}")
        with self._lock:
            now = self._clock()
            found = self._value(key, now)
            return (None if found is None else found[0]), self._version(key, now)

    def cas_set(self, key: str, payload: bytes, ttl: float, version: bytes) -> bool:
        self._enter(f"L2 write of {key!r}")
        with self._lock:
            now = self._clock()
            if self._version(key, now) != version:
                return False
            self._values[key] = (payload, version, now + ttl)
            return True

    def set(self, key: str, payload: bytes, ttl: float, notify: Notify = None) -> bytes:
        _no_notify(notify)
        self._enter(f"L2 set of {key!r}")
        version = _token()
        with self._lock:
            now = self._clock()
            self._values[key] = (payload, version, now + ttl)
            self._versions[key] = (version, now + self.version_ttl)
        return version

    def invalidate_many(self, keys: Sequence[str], notify: Notify = None) -> None:
        _no_notify(notify)
        self._enter(f"L2 invalidation of {len(keys)} key(s)")
        version = _token()
        with self._lock:
            expires = self._clock() + self.version_ttl
            for key in keys:
                self._values.pop(key, None)
                self._versions[key] = (version, expires)

    def versions(self, keys: Sequence[str]) -> list[bytes]:
        self._enter("L2 version read")
        with self._lock:
            now = self._clock()
            return [self._version(key, now) for key in keys]

    def incarnation(self) -> str:
        self._enter("L2 incarnation read")
        return self._incarnation

    def reconnect(self) -> None:
        pass

    def reset_after_fork(self) -> None:
        pass

    def close(self) -> None:
        pass


def _no_notify(notify: Notify) -> None:
    if notify is not None:
        raise ValueError(
            "MemoryL2 cannot publish a backplane message; a transport whose script_channel() "
            "names a channel for it is wrong"
        )


class MemoryHub:
    """The in-process backplane that :class:`MemoryTransport` instances share."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connected: set[MemoryTransport] = set()
        self._failure: str | None = None

    def transport(self, channel: str = "memory") -> MemoryTransport:
        return MemoryTransport(self, channel)

    def fail(self, reason: str = "the hub is down") -> None:
        """Make every publish raise ``BackendUnavailableError`` until :meth:`recover`."""
        self._failure = reason

    def recover(self) -> None:
        self._failure = None

    def _publish(self, message: bytes) -> None:
        if self._failure is not None:
            raise BackendUnavailableError(f"publish failed: {self._failure}")
        with self._lock:
            receivers = list(self._connected)
        for transport in receivers:
            transport._enqueue(message)

    def _join(self, transport: MemoryTransport) -> None:
        with self._lock:
            self._connected.add(transport)

    def _leave(self, transport: MemoryTransport) -> None:
        with self._lock:
            self._connected.discard(transport)


class MemoryTransport:
    """A :class:`~hybridinval.Transport` on a :class:`MemoryHub`, with its own delivery thread."""

    tracks_delivery = True

    def __init__(self, hub: MemoryHub, channel: str = "memory") -> None:
        self.hub = hub
        self.channel = channel
        self._cond = threading.Condition()
        self._queue: deque[bytes] = deque()
        self._enqueued = 0
        self._delivered = 0
        self._connected = False
        self._told_blind = True  # until connected, the listener treats itself as blind
        self._cut: str | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.connects = 0

    def script_channel(self, l2: L2Store) -> str | None:
        return None  # no store's script can reach this hub

    def publish(self, message: bytes) -> None:
        self.hub._publish(bytes(message))

    def _enqueue(self, message: bytes) -> None:
        with self._cond:
            if not self._connected:
                return  # published while this transport was cut: lost, as on Pub/Sub
            self._queue.append(message)
            self._enqueued += 1
            self._cond.notify_all()

    # -- faults ---------------------------------------------------------------------------------

    def cut(self, reason: str = "connection cut") -> None:
        """Lose the connection: queued and later messages are lost until :meth:`heal`."""
        with self._cond:
            self._cut = reason
            if self._connected:
                self._told_blind = False  # caught_up() may not vouch until the listener knows
            self._disconnect_locked()
            self._cond.notify_all()

    def heal(self) -> None:
        with self._cond:
            self._cut = None
            self._cond.notify_all()

    def _disconnect_locked(self) -> None:
        self.hub._leave(self)
        self._connected = False
        self._delivered = self._enqueued  # what was queued is gone
        self._queue.clear()

    # -- the Transport protocol -----------------------------------------------------------------

    def start(self, listener: BackplaneListener) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(
                target=self._run, args=(listener,), name=f"hybridinval-mem:{self.channel}"
            )
            self._thread.daemon = True
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._disconnect_locked()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)
        self._thread = None

    def reset_after_fork(self) -> None:
        self._cond = threading.Condition()
        self._queue = deque()
        self._enqueued = self._delivered = 0
        self._connected = False
        self._told_blind = True
        self._thread = None

    def caught_up(self, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                if self._connected and self._delivered == self._enqueued:
                    return now
                if not self._connected and self._told_blind:
                    return now  # the listener knows it is blind: L1 is not in use
                if now >= deadline:
                    return None
                self._cond.wait(deadline - now)

    def _run(self, listener: BackplaneListener) -> None:
        blind_reported = True  # not yet connected: the listener starts out blind
        next_tick = 0.0
        while True:
            with self._cond:
                if self._stopping:
                    return
                if self._cut is not None:
                    reason = self._cut
                    if not blind_reported:
                        blind_reported = True
                        self._cond.release()
                        try:
                            _safe(listener.on_blind, reason)
                        finally:
                            self._cond.acquire()
                        self._told_blind = True
                        self._cond.notify_all()
                    self._cond.wait(TICK_INTERVAL)
                    continue
                join = not self._connected
                if join:
                    self.hub._join(self)
                    self._connected = True
                    self.connects += 1
                message = self._queue.popleft() if self._queue else None
                if message is None and not join:
                    self._cond.wait(max(0.0, min(TICK_INTERVAL, next_tick - time.monotonic())))
            if join:
                blind_reported = False
                _safe(listener.on_connected)
            if message is not None:
                _safe(listener.on_message, message)
                with self._cond:
                    if self._connected:
                        self._delivered += 1
                    self._cond.notify_all()
            now = time.monotonic()
            if now >= next_tick:
                _safe(listener.on_tick)
                next_tick = now + TICK_INTERVAL


def _safe(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("memory transport: listener %s failed", getattr(fn, "__name__", fn))
