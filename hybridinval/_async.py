"""AsyncHybridCache: the cache for asyncio code, with every guarantee of the blocking one.

It is a :class:`~hybridinval.HybridCache` (:attr:`AsyncHybridCache.sync`) whose Redis I/O is
awaited. The two share everything that makes the cache correct: L1, the in-flight fills
(single flight holds across coroutines, threads and event loops: one load per key per process),
the fill guard, the backplane subscriber and the L1 lease. Only the I/O differs: reads and
writes go through an :class:`~hybridinval._l2_async.AsyncL2Store`, and the fill's decisions are
the blocking cache's own (:meth:`HybridCache._fill_steps`), driven here with ``await``.

Why the subscriber stays a thread: eviction must not wait for the event loop. A loop busy in a
CPU-bound handler runs no callbacks, but the subscriber thread still gets the GIL at every
switch interval and evicts; and the L1 lease makes the next hit check that it did.

What never blocks the loop: an L1 hit; a lease renewal (it polls the subscriber's progress
with ``asyncio.sleep`` instead of waiting on it); every Redis command (a Redis that does not
answer holds the awaiting task for up to ``socket_timeout``, never the loop); closing.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Self, TypeVar, overload

from . import _hitpath
from ._cache import LOAD, HybridCache
from ._config import CacheConfig
from ._l1 import L1Store, MemoryL1
from ._l2 import L2Store, RedisL2
from ._l2_async import AsyncL2Store, AsyncRedisL2, ThreadedL2
from ._local import MISSING
from ._publish import _notify
from ._stats import CacheStats
from .errors import BackendUnavailableError
from .serializers import Serializer
from .transports import Transport

__all__ = ["AnyCache", "AsyncHybridCache"]

T = TypeVar("T")

Loader = Callable[[], Awaitable[T]] | Callable[[], T]

_monotonic = time.monotonic
_LEASE_POLL = 0.0005  # how often a renewal that could not prove the lease looks again


class AsyncHybridCache:
    """An in-process L1 over a shared L2, kept coherent by a backplane, for asyncio code.

    The options are :class:`~hybridinval.CacheConfig`'s, as for :class:`~hybridinval.HybridCache`.
    Build one per process (:meth:`from_url`), use it from any event loop and any thread, and
    ``await cache.aclose()`` at shutdown (or ``async with``). :attr:`sync` is the same cache for
    blocking code (a sync endpoint, a thread pool): same L1, same fills, same subscriber.
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
        async_l2: AsyncL2Store | None = None,
        **options: Any,
    ) -> None:
        """The seams of :class:`~hybridinval.HybridCache`, plus ``async_l2``: what the asyncio
        paths await (default: an :class:`~hybridinval._l2_async.AsyncRedisL2` beside a
        :class:`~hybridinval.RedisL2`, else ``l2``'s calls run in the loop's executor)."""
        sync = HybridCache(
            l2=l2,
            transport=transport,
            l1=l1,
            serializer=serializer,
            config=config,
            on_close=on_close,
            **options,
        )
        self._wrap(sync, async_l2)

    @classmethod
    def from_url(
        cls, url: str | None = None, *, config: CacheConfig | None = None, **options: Any
    ) -> Self:
        """As :meth:`HybridCache.from_url <hybridinval.HybridCache.from_url>`: L2 and the
        backplane on one Redis (an embedded one, shared by this user's processes, when ``url``
        is None)."""
        self = cls.__new__(cls)
        self._wrap(HybridCache.from_url(url, config=config, **options), None)
        return self

    @classmethod
    def wrap(cls, cache: HybridCache) -> Self:
        """The asyncio face of an existing :class:`~hybridinval.HybridCache`: the two share L1,
        in-flight fills and the subscriber (for a process with blocking and asyncio code alike).
        Closing either closes both."""
        self = cls.__new__(cls)
        self._wrap(cache, None)
        return self

    def _wrap(self, sync: HybridCache, async_l2: AsyncL2Store | None) -> None:
        self.sync = sync
        self.config = sync.config
        self.namespace = sync.namespace
        self.max_key_length = sync.max_key_length
        self.l1 = sync.l1
        if async_l2 is None:
            async_l2 = (
                AsyncRedisL2(sync.l2) if isinstance(sync.l2, RedisL2) else ThreadedL2(sync.l2)
            )
        self.l2 = async_l2
        # Hits the C paths count themselves; these are the others (count_hits only).
        self._python_hits = 0
        self._unfinished: set[asyncio.Future[Any]] = set()  # writes a cancelled caller left
        self._bind()
        # After fork, once the blocking cache has made its new process state.
        sync._follow_fork(self._after_fork_in_child)

    def _bind(self) -> None:
        """Take the process state of :attr:`sync` (again after fork: it made new state)."""
        sync = self.sync
        self._local = sync._local
        self._stats = sync._stats
        self._lease = sync._lease
        l1 = self.l1
        # A MemoryL1's map is read inline by the hit paths below; any other L1 through lookup().
        self._entries: dict[str, list[Any]] = l1.entries if type(l1) is MemoryL1 else {}
        self._lookup = l1.lookup
        self._c_paths: list[Any] = []
        # With the C paths, hits that reach Python (a lease to renew) are counted there.
        self._count_fallback_hits = False
        for name in ("get", "get_or_set", "get_local"):
            with contextlib.suppress(AttributeError):
                delattr(self, name)  # after fork: the parent's paths
        speedups = _hitpath._speedups
        if speedups is None or type(l1) is not MemoryL1:
            if self.config.count_hits:
                self._count_python_hits()
            return
        # C answers the hit (lookup, lease, reference bit) and the coroutine around it is all
        # that is left: half the cost of the same checks in Python. A subclass's override of a
        # read method is left alone.
        hit = speedups.HitPath(self._entries, self._lease, _miss)
        self._count_fallback_hits = self.config.count_hits
        self._c_paths.append(hit)
        read = self._read
        cls = type(self)
        if cls.get is AsyncHybridCache.get:

            async def get(key: str, default: Any = None) -> Any:
                value = hit(key)
                if value is MISSING:
                    return await read(key, None, None, None, default)
                return value

            get.__doc__ = AsyncHybridCache.get.__doc__
            self.get = get  # type: ignore[method-assign]
        if cls.get_or_set is AsyncHybridCache.get_or_set:

            async def get_or_set(
                key: str,
                loader: Loader[T],
                ttl: float | None = None,
                *,
                l1_ttl: float | None = None,
            ) -> T:
                value = hit(key)
                if value is MISSING:
                    return await read(key, loader, ttl, l1_ttl, None)  # type: ignore[no-any-return]
                return value  # type: ignore[no-any-return]

            get_or_set.__doc__ = AsyncHybridCache.get_or_set.__doc__
            self.get_or_set = get_or_set  # type: ignore[method-assign]
        if cls.get_local is AsyncHybridCache.get_local:
            local_hit = speedups.HitPath(self._entries, self._lease, self._get_local)
            self._c_paths.append(local_hit)
            self.get_local = local_hit  # type: ignore[method-assign]

    def _count_python_hits(self) -> None:
        """count_hits without the C paths: count a read whose key L1 holds when it begins."""
        lookup = self._lookup

        def present(key: Any) -> bool:
            try:
                return lookup(key) is not None
            except TypeError:
                return False

        cls = type(self)

        async def get(key: str, *args: Any, **kwargs: Any) -> Any:
            self._python_hits += present(key)
            return await cls.get(self, key, *args, **kwargs)

        async def get_or_set(key: str, *args: Any, **kwargs: Any) -> Any:
            self._python_hits += present(key)
            return await cls.get_or_set(self, key, *args, **kwargs)

        def get_local(key: str, *args: Any, **kwargs: Any) -> Any:
            self._python_hits += present(key)
            return cls.get_local(self, key, *args, **kwargs)

        for name, path in (("get", get), ("get_or_set", get_or_set), ("get_local", get_local)):
            path.__doc__ = getattr(cls, name).__doc__
            setattr(self, name, path)

    # -- reads --------------------------------------------------------------------------------

    async def get(self, key: str, default: Any = None) -> Any:
        """The value for ``key`` from L1, else L2 (an L2 hit fills L1), else ``default``."""
        try:
            entry = self._entries[key]
            if _monotonic() >= self._lease.until:
                return await self._read(key, None, None, None, default)
        except (KeyError, TypeError):  # TypeError: unhashable; _read names the key
            return await self._read(key, None, None, None, default)
        entry[2] = 1
        return entry[0]

    @overload
    async def get_or_set(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        ttl: float | None = None,
        *,
        l1_ttl: float | None = None,
    ) -> T: ...

    @overload
    async def get_or_set(
        self,
        key: str,
        loader: Callable[[], T],
        ttl: float | None = None,
        *,
        l1_ttl: float | None = None,
    ) -> T: ...

    async def get_or_set(
        self,
        key: str,
        loader: Loader[Any],
        ttl: float | None = None,
        *,
        l1_ttl: float | None = None,
    ) -> Any:
        """The value for ``key``; on a miss in both levels, ``loader()`` runs once per process
        (coroutines, threads and other event loops that ask meanwhile wait for it) and its value
        is stored in L2 and L1. ``loader`` may be an async callable or a plain one (a plain one
        runs on the loop: keep it quick, or make it async).

        A loader exception reaches every waiter and nothing is cached. A waiter that is
        cancelled stops waiting and nothing else; a load whose task is cancelled is cancelled
        for its waiters too (they get ``CancelledError``) and caches nothing.
        """
        try:
            entry = self._entries[key]
            if _monotonic() >= self._lease.until:
                return await self._read(key, loader, ttl, l1_ttl, None)
        except (KeyError, TypeError):
            return await self._read(key, loader, ttl, l1_ttl, None)
        entry[2] = 1
        return entry[0]

    def get_local(self, key: str, default: Any = None) -> Any:
        """The value for ``key`` if this process's L1 holds it, else ``default``. No I/O and no
        waiting: for hot loops and sync helpers on the event loop. When the L1 lease cannot be
        renewed at once (the subscriber is behind), this is a miss."""
        return self._get_local(key, default)

    def _get_local(self, key: str, default: Any = None) -> Any:
        try:
            entry = self._lookup(key)
        except TypeError:  # unhashable
            entry = None
        if entry is None:
            self.sync._check_key(key)  # a key no read could have stored is an error
            return default
        if _monotonic() >= self._lease.until:
            if not self.sync._coherence.try_renew_lease():
                return default
            entry = self._lookup(key)
            if entry is None:
                return default
        self._python_hits += self._count_fallback_hits
        return entry[0]

    async def _read(
        self,
        key: str,
        loader: Loader[Any] | None,
        ttl: float | None,
        l1_ttl: float | None,
        default: Any,
    ) -> Any:
        """The read path after the inline hit: the lease, any L1, single flight, the fill."""
        sync = self.sync
        sync._check_key(key)
        sync._ensure_started()
        entry = self._lookup(key)
        if entry is not None:
            if _monotonic() >= self._lease.until:
                await self._renew_lease()
                entry = self._lookup(key)
            if entry is not None:
                self._python_hits += self._count_fallback_hits
                return entry[0]
        local = self._local
        while True:
            with local.lock:
                value, fill, leads = sync._claim_locked(key)
                if value is not MISSING:
                    return value
                if leads:
                    fill.loop = asyncio.get_running_loop()
                    break
                waiting = fill.add_waiter_locked()
            self._stats["single_flight_waits"] += 1
            value = await fill.wait_async(waiting)
            # A plain get() that led the fill found nothing; a waiter with a loader loads.
            if value is not MISSING or loader is None:
                return default if value is MISSING else value
        try:
            value, cacheable, version = await self._fill(key, loader, ttl)
        except BaseException as exc:  # CancelledError too: the waiters must not hang
            sync._fill_failed(key, fill, exc)
            raise
        sync._fill_done(key, fill, value, cacheable, version, ttl, l1_ttl)
        return default if value is MISSING else value

    async def _fill(
        self, key: str, loader: Loader[Any] | None, ttl: float | None
    ) -> tuple[Any, bool, bytes | None]:
        """:meth:`HybridCache._fill_steps`, driven with awaited I/O."""
        l2 = self.l2
        steps = self.sync._fill_steps(key, loader is not None, ttl)
        step = next(steps)
        try:
            while True:
                if step is LOAD:
                    value = loader()  # type: ignore[misc]
                    if inspect.isawaitable(value):
                        value = await value
                    step = steps.send(value)
                    continue
                try:
                    result = await getattr(l2, step[0])(*step[1:])
                except BackendUnavailableError as exc:
                    step = steps.throw(exc)
                else:
                    step = steps.send(result)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def _renew_lease(self) -> None:
        """:meth:`Coherence.renew_lease`, waiting on the event loop instead of blocking it."""
        coherence = self.sync._coherence
        if coherence.try_renew_lease():
            return
        self._stats["lease_waits"] += 1
        deadline = _monotonic() + self.config.l1_lease_wait
        while _monotonic() < deadline:
            await asyncio.sleep(_LEASE_POLL)
            if coherence.try_renew_lease():
                return
        coherence.flush_for_lease()

    # -- writes -------------------------------------------------------------------------------

    async def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        """Store ``value`` in L2 under a new version and evict ``key`` from every other L1.

        Raises :class:`BackendUnavailableError` if Redis fails (this process's L1 entry for
        ``key`` is evicted either way). Once begun it finishes, as :meth:`invalidate` does.
        """
        await self._finish(self._set(key, value, ttl))

    async def _set(self, key: str, value: Any, ttl: float | None) -> None:
        sync = self.sync
        sync._check_key(key)
        payload = sync._dumps(key, value)
        sync._ensure_started()
        message = sync._message((key,))
        channel = sync._script_channel
        try:
            version = await self.l2.set(
                key, payload, ttl or sync.l2_ttl, (channel, message) if channel else None
            )
            if channel is None:
                await asyncio.to_thread(sync.transport.publish, message)
        except BaseException:  # a cancelled set may have reached Redis: evict either way
            self._local.evict((key,))
            raise
        sync._was_set(key, value, ttl, version)

    async def invalidate(self, *keys: str) -> None:
        """Delete ``keys`` from L2 and evict them from every process's L1 (one round trip).
        Once begun it finishes: a caller cancelled meanwhile stops waiting, and the writes
        and the message still go out together (half of them would leave others stale)."""
        await self._finish(self._send_invalidation(self.sync._checked_batch(keys)))

    async def invalidate_many(self, keys: Iterable[str]) -> None:
        """Like :meth:`invalidate`, for any iterable of keys; as
        :meth:`HybridCache.invalidate_many <hybridinval.HybridCache.invalidate_many>`."""
        await self._finish(self._send_invalidation(self.sync._checked_batch(keys)))

    async def _finish(self, operation: Awaitable[T]) -> T:
        """Await ``operation`` in a task of its own that a cancelled caller does not cancel."""
        task = asyncio.ensure_future(operation)
        self._unfinished.add(task)
        task.add_done_callback(self._unfinished.discard)
        return await asyncio.shield(task)

    async def invalidate_committed(
        self, keys: Iterable[str], *, on_published: Callable[[], object] | None = None
    ) -> bool:
        """Invalidate keys whose change is already committed; never raises a Redis failure. As
        :meth:`HybridCache.invalidate_committed <hybridinval.HybridCache.invalidate_committed>`:
        on failure the keys are retried in the background until Redis takes them. A task
        cancelled during the publish hands its keys to that retry before it lets the
        cancellation through (the change is committed: its invalidation must still go out)."""
        sync = self.sync
        batch = sync._checked_batch(keys)
        if not batch:
            if on_published is not None:
                on_published()
            return True
        sync._ensure_started()
        try:
            await self._send_invalidation(batch)
        except BackendUnavailableError as exc:
            sync._publisher.retry_later(batch, on_published, exc)
            return False
        except asyncio.CancelledError as exc:
            sync._publisher.retry_later(batch, on_published, exc)
            raise
        if on_published is not None:
            _notify(on_published)
        return True

    async def _send_invalidation(self, batch: list[str]) -> None:
        if not batch:
            return
        sync = self.sync
        sync._ensure_started()
        message = sync._message(batch)
        channel = sync._script_channel
        try:
            await self.l2.invalidate_many(batch, (channel, message) if channel else None)
            if channel is None:
                await asyncio.to_thread(sync.transport.publish, message)
            sync._recent.add(batch)
        finally:
            # After the round trip (see HybridCache._send_invalidation), cancelled or not.
            self._local.evict(batch)
        self._stats["invalidations_sent"] += 1
        self._stats["keys_invalidated"] += len(batch)

    def pending_retries(self) -> int:
        """Keys whose invalidation failed after commit and awaits a background retry."""
        return self.sync.pending_retries()

    def clear_local(self) -> None:
        """Flush this process's L1 and cancel its in-flight fills."""
        self.sync.clear_local()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the subscriber thread now rather than on first use. Never blocks."""
        self.sync.start()

    async def wait_until_subscribed(self, timeout: float = 5.0) -> bool:
        """Start the subscriber if needed and wait (on the loop) until L1 is in use."""
        sync = self.sync
        sync.start()
        deadline = _monotonic() + timeout
        while not sync.subscribed:
            if _monotonic() >= deadline:
                return False
            await asyncio.sleep(0.002)
        return True

    @property
    def subscribed(self) -> bool:
        """True while the backplane is confirmed and L1 may be used."""
        return self.sync.subscribed

    @property
    def instance_id(self) -> str:
        return self.sync.instance_id

    @property
    def accelerated(self) -> bool:
        """True when L1 hits are answered in C (``hybridinval._speedups``)."""
        return bool(self._c_paths)

    async def aclose(self) -> None:
        """Stop the subscriber and release every connection, without blocking the loop."""
        await self.l2.aclose()
        self.l2.close()
        await asyncio.to_thread(self.sync.close)

    def close(self) -> None:
        """:meth:`aclose` for code outside a loop (connections of loops still running elsewhere
        are closed on their own loop)."""
        self.l2.close()
        self.sync.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _after_fork_in_child(self) -> None:
        self.l2.reset_after_fork()
        self._bind()  # HybridCache's own fork handler has made the new process state

    # -- introspection ------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        """As :meth:`HybridCache.stats <hybridinval.HybridCache.stats>` (one set of counters
        for the blocking and the asyncio paths)."""
        stats = self.sync.stats()
        if stats["l1_hits"] is not None:  # count_hits: C counts this cache's hits for free
            stats["l1_hits"] += self._python_hits + sum(int(path.hits) for path in self._c_paths)
        return stats


def _miss(key: Any, *args: Any, **kwargs: Any) -> Any:
    """The C hit path's answer to anything it cannot answer itself."""
    return MISSING


AnyCache = HybridCache | AsyncHybridCache
"""Either cache: what the integrations accept."""
