"""HybridCache: the read path (L1 -> L2 -> loader), writes and invalidation.

Read path, top to bottom:

1. ``get``/``get_or_set`` look the key up in L1 without a lock. A live entry is returned,
   provided the L1 lease holds: the backplane was proven caught up within ``l1_lease`` (see
   :meth:`hybridinval._coherence.Coherence.renew_lease`). Which code answers a hit is chosen once
   per process (:mod:`hybridinval._hitpath`: C where built); every other call reaches the
   Python methods below.
2. Otherwise a *fill* is registered for the key (single flight: one per key per process; later
   callers wait on it). The fill records the epoch.
3. L2 is read: one GET; the value carries the version it was written under. A hit is decoded
   and stored in L1.
4. A miss that has a loader rereads value and version atomically (another process may have
   filled the key meanwhile), calls the loader, writes L2 by compare-and-set against that
   version, and stores in L1.

A fill stores in L1 only through the fill guard (:meth:`LocalState.store_if_guarded`): a value
read before an invalidation is never stored after it.

Invalidation: L2 deletes, version bumps and the backplane message leave in one round trip
(two when the transport cannot ride the L2 script; the message always follows the writes); then
the local L1 entries are evicted and in-flight fills for those keys cancelled, so that when
``invalidate()`` returns this process no longer serves the old value (read your writes).

The parts, each standing on :class:`~hybridinval._local.LocalState` and none calling back up:
:mod:`._coherence` (the backplane listener, blind periods, the lease), :mod:`._publish` (after
commit), :mod:`._hitpath` (which code answers a hit), :mod:`._config` (options and wiring).
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
import uuid
import weakref
from collections.abc import Callable, Generator, Iterable
from typing import Any, Self, TypeVar

from . import _hitpath
from ._coherence import Coherence
from ._config import CacheConfig, build_redis_seams
from ._group import GroupSend
from ._l1 import L1Store, MemoryL1, NullL1
from ._l2 import L2Store
from ._local import MISSING, Fill, LocalState
from ._message import encode_message
from ._publish import Publisher, RetryingPublisher
from ._replay import RecentKeys
from ._stats import CacheStats
from .errors import BackendUnavailableError, CacheClosedError, SerializationError
from .keyspace import check_key
from .serializers import Serializer
from .transports import Transport

__all__ = ["CacheStats", "HybridCache"]

log = logging.getLogger("hybridinval")

T = TypeVar("T")

_monotonic = time.monotonic

_NO_FILL = Fill(0)  # what _claim_locked returns beside a value: never waited on

LOAD: Any = ("load",)
"""What :meth:`HybridCache._fill_steps` yields when the loader must run."""

FillSteps = Generator[tuple[Any, ...], Any, tuple[Any, bool, bytes | None]]


class HybridCache:
    """An in-process L1 over a shared L2, kept coherent across processes by a backplane.

    Build one per process with :meth:`from_url` (or pass your own seams to the constructor),
    share it between threads, and :meth:`close` it at shutdown (it is also a context manager).
    Options are the fields of :class:`~hybridinval.CacheConfig`, given as ``config=`` or as
    keyword arguments. Cached values are returned as stored, not copied: treat them as
    immutable.
    """

    def __init__(
        self,
        *,
        l2: L2Store,
        transport: Transport,
        l1: L1Store | None = None,
        serializer: Serializer | None = None,
        config: CacheConfig | None = None,
        on_close: Callable[[], None] | None = None,
        **options: Any,
    ) -> None:
        self.config = config = CacheConfig.of(config, options)
        self.namespace = config.namespace
        self.l1 = l1 if l1 is not None else config.build_l1()
        self.l2 = l2
        self.transport = transport
        self.serializer = serializer if serializer is not None else config.build_serializer()
        self.l1_ttl = config.l1_ttl
        self.l2_ttl = config.l2_ttl
        self.max_key_length = config.max_key_length
        # The transport decides whether its messages can ride the L2 write scripts.
        channel = transport.script_channel(l2)
        self._script_channel = channel
        l1_lease = config.l1_lease
        if isinstance(self.l1, NullL1):
            l1_lease = None  # nothing is ever served from L1: no lease to hold
        elif l1_lease is not None and not transport.tracks_delivery:
            log.warning(
                "transport %s cannot report delivery progress: L1 runs without a lease "
                "(staleness is then bounded by delivery lag alone)",
                type(transport).__name__,
            )
            l1_lease = None
        self.l1_lease = l1_lease
        self._on_close = on_close
        self._closed = False
        self._fork_followers: list[Callable[[], Callable[[], object] | None]] = []
        self._reset_process_state()
        _live_caches.add(self)

    def _reset_process_state(self) -> None:
        """State that belongs to one OS process (fresh at construction and after fork)."""
        config = self.config
        self.instance_id = uuid.uuid4().hex[:16]
        self._local = local = LocalState(self.l1)
        # The map the Python read methods above consult without a lock: MemoryL1's own. Any
        # other L1 is read through the lookup paths _hitpath installs instead (an empty map
        # here only sends a subclass's super() call down the miss path, which looks it up).
        self._entries: dict[str, list[Any]] = self.l1.entries if type(self.l1) is MemoryL1 else {}
        self._stats = local.stats
        self._started = False
        self._seq = itertools.count(1)
        # Reads may use L1 without a check while monotonic() < _lease.until.
        self._lease = _hitpath.new_lease(0.0 if self.l1_lease is not None else _hitpath.NEVER)
        self._coherence = Coherence(
            local,
            self.l2,
            self.transport,
            instance_id=self.instance_id,
            lease=self._lease,
            l1_lease=self.l1_lease,
            l1_lease_wait=config.l1_lease_wait,
            lag_samples=config.lag_samples,
            is_closed=self._is_closed,
            on_new_incarnation=self._replay_recent,
        )
        self._recent = RecentKeys(config.failover_replay, config.max_replayed)
        self._group_send = GroupSend(self._round_trip)
        self._publisher: Publisher = RetryingPublisher(
            self._send_invalidation, local, self._is_closed
        )
        self._hit_paths = _hitpath.HitPaths(
            self,
            HybridCache,
            self.l1,
            self._lease,
            count_hits=config.count_hits,
            renew=lambda: self._renew_lease(),  # looked up per call: tests wrap it
            read_through=self._read_through,
            check_key=self._check_key,
        )

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_url(
        cls, url: str | None = None, *, config: CacheConfig | None = None, **options: Any
    ) -> Self:
        """Build a cache on one Redis URL (``redis://``, ``rediss://`` or ``unix://``): L2 and
        the backplane (Pub/Sub, published by L2's own scripts) on that server.

        With ``url=None``, every process of this user on this machine shares one embedded Redis
        (the ``embedded`` extra), started by the first and stopped a few seconds after the last
        has gone: fine for development and tests, never for processes on several machines.
        """
        config = CacheConfig.of(config, options)
        on_close: Callable[[], None] | None = None
        if url is None:
            from ._embedded import SharedEmbeddedRedis

            server = SharedEmbeddedRedis.attach()
            url, on_close = server.url, server.detach
        l2, transport = build_redis_seams(url, config)
        return cls(l2=l2, transport=transport, config=config, on_close=on_close)

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
            return default if value is MISSING else value
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

    def _renew_lease(self) -> None:
        self._coherence.renew_lease()

    def _read_through(
        self,
        key: str,
        loader: Callable[[], Any] | None,
        ttl: float | None,
        l1_ttl: float | None,
    ) -> Any:
        self._check_key(key)
        self._ensure_started()
        local = self._local
        while True:
            with local.lock:
                value, fill, leads = self._claim_locked(key)
                if value is not MISSING:
                    return value
                if leads:
                    break
            self._stats["single_flight_waits"] += 1
            value = fill.wait()
            # A plain get() that led the fill found nothing; a waiter with a loader loads.
            if value is not MISSING or loader is None:
                return value
        try:
            value, cacheable, version = self._fill(key, loader, ttl)
        except BaseException as exc:
            self._fill_failed(key, fill, exc)
            raise
        self._fill_done(key, fill, value, cacheable, version, ttl, l1_ttl)
        return value

    def _claim_locked(self, key: str) -> tuple[Any, Fill, bool]:
        """Under the lock, after an L1 miss: ``(value, _, _)`` if a live entry appeared
        meanwhile; else ``(MISSING, fill, leads)``: a new fill this caller leads, or the fill in
        flight to wait for (single flight)."""
        local = self._local
        entry = self.l1.lookup(key)
        if entry is not None:
            if _monotonic() < entry[1]:
                return entry[0], _NO_FILL, False
            self.l1.evict_many((key,))
        fill = local.fills.get(key)
        if fill is not None:
            return MISSING, fill, False
        self._stats["l1_misses"] += 1
        fill = local.fills[key] = Fill(local.epoch)
        return MISSING, fill, True

    def _fill_done(
        self,
        key: str,
        fill: Fill,
        value: Any,
        cacheable: bool,
        version: bytes | None,
        ttl: float | None,
        l1_ttl: float | None,
    ) -> None:
        """The end of a fill this caller led: store through the guard, wake the waiters."""
        local = self._local
        fill.value = value
        if cacheable:
            lifetime = min(l1_ttl or self.l1_ttl, ttl or self.l1_ttl)
            local.store_if_guarded(key, fill, value, _monotonic() + lifetime, version)
        else:
            with local.lock:
                local.end_fill_locked(key, fill)
        fill.finish()

    def _fill_failed(self, key: str, fill: Fill, error: BaseException) -> None:
        """A fill this caller led raised (or was cancelled): every waiter gets the error."""
        fill.error = error
        local = self._local
        with local.lock:
            local.end_fill_locked(key, fill)
        fill.finish()

    def _fill(
        self, key: str, loader: Callable[[], Any] | None, ttl: float | None
    ) -> tuple[Any, bool, bytes | None]:
        """Read L2, else load and write L2: :meth:`_fill_steps`, driven with blocking I/O."""
        l2 = self.l2
        steps = self._fill_steps(key, loader is not None, ttl)
        step = next(steps)
        try:
            while True:
                if step is LOAD:
                    step = steps.send(loader())  # type: ignore[misc]
                    continue
                try:
                    result = getattr(l2, step[0])(*step[1:])
                except BackendUnavailableError as exc:
                    step = steps.throw(exc)
                else:
                    step = steps.send(result)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def _fill_steps(self, key: str, loads: bool, ttl: float | None) -> FillSteps:
        """The decisions of a fill, free of I/O, so that the blocking and the asyncio read paths
        share them: yields an L2 call as ``(method name, *args)`` (the driver sends back its
        result or throws its ``BackendUnavailableError`` in) or :data:`LOAD` (the driver sends
        back the loader's value; a loader's exception is the driver's to raise). Returns the
        value, whether L1 may keep it, and the L2 version it is known to belong to (None when
        unknown)."""
        stats = self._stats
        value = MISSING
        version: bytes | None = None
        try:
            payload, version = yield ("get", key)
            if payload is not None:
                value = self._decoded(key, payload)
            if value is MISSING and loads:
                # About to load: read the version the load must be written under, atomically
                # with the value (another process may have filled the key since).
                first = payload
                payload, version = yield ("get_for_fill", key)
                if payload is not None:
                    value = self._decoded(key, payload, counted=first is None)
        except BackendUnavailableError as exc:
            stats["l2_errors"] += 1
            log.debug("L2 read of %r failed, falling back to the loader: %s", key, exc)
            version = None
        if value is not MISSING:
            stats["l2_hits"] += 1
            return value, True, version
        stats["l2_misses"] += 1
        if not loads:
            return MISSING, False, None
        started = _monotonic()
        stats["loads"] += 1
        value = yield LOAD
        payload = self._dumps(key, value)
        if version is None:  # L2 unreachable: L1 only (and only if the backplane is trusted)
            return value, True, None
        if _monotonic() - started > self.l2.version_ttl / 2:
            # The version key may have expired and come back meanwhile; a CAS against it
            # would prove nothing. Skip L2 rather than risk a stale write.
            stats["l2_cas_rejections"] += 1
            return value, True, None
        try:
            stored = yield ("cas_set", key, payload, ttl or self.l2_ttl, version)
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
        """The value in an L2 payload, or MISSING if it is corrupt (logged and counted once:
        a fill rereads the same payload with the version it will write under)."""
        try:
            return self.serializer.loads(payload)
        except (ValueError, TypeError, EOFError) as exc:  # CorruptPayloadError is a ValueError
            if counted:
                self._stats["l2_corrupt"] += 1
                log.warning("corrupt L2 payload for %r (%s); treating as a miss", key, exc)
            return MISSING

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
        channel = self._script_channel
        try:
            version = self.l2.set(
                key, payload, ttl or self.l2_ttl, (channel, message) if channel else None
            )
            if channel is None:
                self.transport.publish(message)
        except BackendUnavailableError:
            self._local.evict((key,))
            raise
        self._was_set(key, value, ttl, version)

    def _was_set(self, key: str, value: Any, ttl: float | None, version: bytes) -> None:
        """After L2 took a ``set()``: cancel older fills of the key and keep the value in L1."""
        self._recent.add((key,))
        self._stats["invalidations_sent"] += 1
        self._stats["keys_invalidated"] += 1
        local = self._local
        with local.lock:
            local.cancel_locked((key,))
            if local.trusted:
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

    def invalidate_committed(
        self, keys: Iterable[str], *, on_published: Callable[[], object] | None = None
    ) -> bool:
        """Invalidate keys whose change is already committed; never raises a Redis failure.

        This is the publish after a database commit: the data *is* committed, so a Redis failure
        must not surface as if it were not. On failure the error is logged and counted
        (``publish_failures``), this process's L1 is flushed (it cannot tell which of its entries
        other writers' lost messages would have evicted either), and the keys are retried in the
        background until Redis takes them. Returns whether the publish succeeded now.

        ``on_published()`` is called once Redis has taken the keys, now or after a retry (a
        durable record of them, such as an outbox row, may then be deleted); never for keys
        that a ``close()`` dropped.
        """
        batch = self._checked_batch(keys)
        if not batch:
            if on_published is not None:
                on_published()
            return True
        self._ensure_started()
        return self._publisher.publish_committed(batch, on_published)

    def pending_retries(self) -> int:
        """Keys whose invalidation failed after commit and awaits a background retry (including
        a retry in flight)."""
        return self._publisher.pending()

    def clear_local(self) -> None:
        """Flush this process's L1 and cancel its in-flight fills (other processes keep theirs)."""
        self._local.flush()

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
        try:
            # Threads sending while another's round trip is in flight share the next one.
            self._group_send(batch)
        finally:
            # After the round trip, not before: a fill that read L2 before the delete is still
            # registered and gets cancelled here.
            self._local.evict(batch)
        self._stats["invalidations_sent"] += 1
        self._stats["keys_invalidated"] += len(batch)

    def _round_trip(self, batch: list[str]) -> None:
        """Delete ``batch`` from L2 and publish its message (in the script, or after it)."""
        message = self._message(batch)
        channel = self._script_channel
        self.l2.invalidate_many(batch, (channel, message) if channel else None)
        if channel is None:
            self.transport.publish(message)
        self._recent.add(batch)

    def _replay_recent(self) -> None:
        """The store's incarnation changed: invalidate again what this process wrote lately
        (see :mod:`hybridinval._replay`). On the subscriber's restore thread; never raises a
        store failure (the publisher retries)."""
        keys = self._recent.keys()
        if not keys or self._closed:
            return
        self._stats["keys_replayed"] += len(keys)
        log.warning(
            "the store has a new incarnation (failover or restart): invalidating again the %d "
            "key(s) this process wrote in the last %.0f s, which it may have lost",
            len(keys),
            self._recent.window,
        )
        self._publisher.publish_committed(keys)

    def _message(self, keys: Iterable[str]) -> bytes:
        return encode_message(self.instance_id, next(self._seq), list(keys))

    # -- lifecycle ----------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._closed:
            raise CacheClosedError("this HybridCache is closed")
        if self._started:
            return
        with self._local.lock:
            if self._started:
                return
            self._started = True
        self._lower_switch_interval()
        self.transport.start(self._coherence)

    def _lower_switch_interval(self) -> None:
        wanted = self.config.switch_interval
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
        while not self._local.trusted:
            if _monotonic() >= deadline:
                return False
            time.sleep(0.002)
        return True

    @property
    def accelerated(self) -> bool:
        """True when L1 hits are answered in C (``hybridinval._speedups``)."""
        return self._hit_paths.accelerated

    @property
    def subscribed(self) -> bool:
        """True while the backplane is confirmed and L1 may be used."""
        return self._local.trusted

    def _is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the subscriber and release connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.transport.stop()
        self._publisher.close()
        local = self._local
        with local.lock:
            local.trusted = False
            local.flush_locked()
        self.l2.close()
        _live_caches.discard(self)
        if self._on_close is not None:
            self._on_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _follow_fork(self, reset: Callable[[], object]) -> None:
        """Call ``reset()`` in a forked child once this cache has made its new process state
        (for a layer over it, such as :class:`~hybridinval.AsyncHybridCache`). A bound method is
        held weakly: its object may go away first."""
        self._fork_followers.append(
            weakref.WeakMethod(reset) if hasattr(reset, "__self__") else lambda: reset
        )

    def _after_fork_in_child(self) -> None:
        self.l1.clear()
        self.transport.reset_after_fork()
        self.l2.reset_after_fork()
        self._reset_process_state()
        for follower in self._fork_followers:
            reset = follower()
            if reset is not None:
                reset()

    # -- introspection ------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        """Counters since start, L1's size and backplane lag (see :class:`CacheStats`)."""
        counters = self._stats
        lags = sorted(self._coherence.lags_us)
        n = len(lags)
        return CacheStats(  # type: ignore[no-any-return]
            l1_hits=self._hit_paths.hits() if self.config.count_hits else None,
            l1_size=len(self.l1),
            pending_publishes=self._publisher.pending(),
            subscribed=self._local.trusted,
            instance_id=self.instance_id,
            lag_samples=n,
            lag_p50_us=lags[n // 2] if lags else None,
            lag_p99_us=lags[min(n - 1, (n * 99) // 100)] if lags else None,
            lag_max_us=lags[-1] if lags else None,
            **counters,  # type: ignore[typeddict-item]
        )

    # -- helpers ------------------------------------------------------------------------------

    def _check_key(self, key: object) -> None:
        check_key(key, self.max_key_length)

    def _dumps(self, key: str, value: Any) -> bytes:
        try:
            return self.serializer.dumps(value)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise SerializationError(
                f"cannot serialize the value for key {key!r} with the {self.serializer.name!r} "
                f"serializer: {exc}",
                key=key,
            ) from exc


# Every cache of this process, so a forked child can reset them all (threads and sockets do not
# survive fork; locks held by other threads at fork time would never be released).
_live_caches: weakref.WeakSet[HybridCache] = weakref.WeakSet()


def _reset_caches_after_fork() -> None:
    for cache in list(_live_caches):
        cache._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_caches_after_fork)
