"""What users would pick instead of hybridinval, each driven through its own documented API.

Every contender answers the same three questions, so the workload harness can drive them alike:

* ``reader(session)``: a function ``(key, loader) -> value`` for reads inside one unit of work
  (one SQLAlchemy session, like one web request);
* ``after_commit(keys)``: what the application does right after ``session.commit()`` returned
  (publish, delete, nothing);
* ``install(sessionmaker, model)``: hooks that make the commit itself invalidate (only
  hybridinval's SQLAlchemy integration has those).

Contenders that cannot run here still get a row: :func:`unsupported_reason` says why (with the
error), so a missing row never hides a failure.

Every contender keeps its Redis keys under a run-unique prefix in its own Redis database and
names its connections ``<prefix>-...`` (``client_name``): the fault injector kills only the Pub/Sub
connections of this run, and cleanup deletes only this run's keys, because the Redis is shared.

This module must never reach into a library's internals to make it look better; where the
harness needs a hook (timing an eviction), it wraps the library's own eviction call and says so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar
from urllib.parse import urlencode, urlsplit, urlunsplit

import redis

log = logging.getLogger("benchmarks.contenders")

Row = dict[str, Any]
Loader = Callable[[], Row]
ReadFn = Callable[[str, Loader], Row]
AReadFn = Callable[[str, Loader], Awaitable[Row]]

L2_TTL = 3600  # seconds: L2 entries outlive every run; correctness never rests on expiry


def redis_url_for(base_url: str, db: int, client_name: str, **query: str) -> str:
    """``base_url`` pointed at database ``db``, with a client name (and extra query options)."""
    parts = urlsplit(base_url)
    params = {"client_name": client_name, **query}
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", urlencode(params), ""))


class Env:
    """Where one contender instance lives: its Redis URL, key prefix and L1 lifetime, and any
    extra ``HybridCache.from_url`` options (diagnostic runs)."""

    def __init__(
        self, redis_url: str, prefix: str, l1_ttl: float, hybridinval: dict[str, Any] | None = None
    ) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.l1_ttl = l1_ttl
        self.hybridinval = hybridinval or {}


class Contender:
    """Base of the synchronous contenders. Subclasses set the class attributes."""

    name: ClassVar[str]
    label: ClassVar[str]
    is_async: ClassVar[bool] = False
    has_l1: ClassVar[bool] = False
    has_l2: ClassVar[bool] = True
    # "yes": other processes' L1s are told; "no": they serve old values until their TTL;
    # "n/a": no L1 to tell.
    cross_process_l1: ClassVar[str] = "n/a"
    uses_pubsub: ClassVar[bool] = False

    def __init__(self, env: Env) -> None:
        self.env = env

    def ready(self, timeout: float) -> bool:
        """Block until the contender is fully set up (subscribed); False on timeout."""
        return True

    def install(self, session_factory: Any, model: type) -> None:
        """Called once in every workload process before its first session."""

    def reader(self, session: Any) -> ReadFn:
        raise NotImplementedError

    def after_commit(self, keys: Sequence[str]) -> None:
        raise NotImplementedError

    def notes(self) -> list[str]:
        return []

    def close(self) -> None:
        pass


# -- database only ---------------------------------------------------------------------------


class DatabaseOnly(Contender):
    """No cache: every read is a query. The floor for staleness, the ceiling for DB load."""

    name = "db_only"
    label = "database only"
    has_l2 = False

    def reader(self, session: Any) -> ReadFn:
        return _call_loader

    def after_commit(self, keys: Sequence[str]) -> None:
        pass


def _call_loader(key: str, loader: Loader) -> Row:
    return loader()


# -- redis only --------------------------------------------------------------------------------


class RedisOnly(Contender):
    """No L1: every read is a Redis GET, filled on a miss; the writer deletes after commit.

    Correct across processes by construction except for the stale-set race: a fill that read
    the database before a commit can SET its old value after the writer's DEL.
    """

    name = "redis_only"
    label = "redis only (GET, fill on miss)"

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        self.client = redis.Redis.from_url(env.redis_url, protocol=2)
        self.key_prefix = env.prefix + ":"

    def get_or_set(self, key: str, loader: Loader) -> Row:
        rkey = self.key_prefix + key
        raw = self.client.get(rkey)
        if raw is not None:
            value: Row = json.loads(raw)  # type: ignore[arg-type,unused-ignore]
            return value
        value = loader()
        self.client.set(rkey, json.dumps(value), ex=L2_TTL)
        return value

    def reader(self, session: Any) -> ReadFn:
        return self.get_or_set

    def after_commit(self, keys: Sequence[str]) -> None:
        self.client.delete(*[self.key_prefix + k for k in keys])

    def close(self) -> None:
        self.client.close()


# -- hand-rolled L1 + L2 + Pub/Sub --------------------------------------------------------------


class HandRolled(Contender):
    """The pattern most teams write: a TTL dict in front of Redis, one PUBLISH per invalidated
    key after commit, and a subscriber thread that deletes the key from the local dict.

    Deliberately without what hybridinval adds: no fill guard (a fill that read the old row can
    store it after the invalidation), no versioned L2 writes (same race in Redis), no flush when
    the subscriber reconnects (messages published while it was disconnected are simply lost).
    The subscriber is redis-py's documented ``PubSub.run_in_thread`` with an exception handler
    that keeps it alive, which is the robust version of the pattern; redis-py reconnects and
    resubscribes by itself.
    """

    name = "hand_rolled"
    label = "hand-rolled (TTL dict + Redis + PUBLISH)"
    has_l1 = True
    cross_process_l1 = "yes"
    uses_pubsub = True

    def __init__(self, env: Env, *, on_evict: Callable[[str], None] | None = None) -> None:
        import cachetools

        super().__init__(env)
        self.client = redis.Redis.from_url(env.redis_url, protocol=2)
        self.key_prefix = env.prefix + ":"
        self.channel = env.prefix + ":invalidate"
        self.local: cachetools.TTLCache[str, Row] = cachetools.TTLCache(
            maxsize=10_000, ttl=env.l1_ttl
        )
        self.lock = threading.Lock()  # cachetools caches are not thread-safe
        self.on_evict = on_evict
        self.reconnects = 0
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call,unused-ignore]
        self.pubsub.subscribe(**{self.channel: self._on_message})
        self.thread = self.pubsub.run_in_thread(
            sleep_time=1.0, daemon=True, exception_handler=self._on_error
        )

    def _on_message(self, message: dict[str, Any]) -> None:
        key = message["data"].decode()
        with self.lock:
            self.local.pop(key, None)
        if self.on_evict is not None:
            self.on_evict(key)

    def _on_error(self, exc: BaseException, pubsub: Any, thread: Any) -> None:
        # What most services do: log and keep listening; redis-py resubscribes on the next read.
        self.reconnects += 1
        log.debug("hand-rolled subscriber: %r; resubscribing", exc)
        time.sleep(0.001)

    def ready(self, timeout: float) -> bool:
        return bool(self.pubsub.subscribed_event.wait(timeout))

    def get_or_set(self, key: str, loader: Loader) -> Row:
        with self.lock:
            value = self.local.get(key)
        if value is not None:
            return value
        rkey = self.key_prefix + key
        raw: Any = self.client.get(rkey)
        if raw is not None:
            value = json.loads(raw)
        else:
            value = loader()
            self.client.set(rkey, json.dumps(value), ex=L2_TTL)
        with self.lock:
            self.local[key] = value
        return value

    def reader(self, session: Any) -> ReadFn:
        return self.get_or_set

    def after_commit(self, keys: Sequence[str]) -> None:
        self.client.delete(*[self.key_prefix + k for k in keys])
        for key in keys:
            self.client.publish(self.channel, key)
        with self.lock:
            for key in keys:
                self.local.pop(key, None)

    def notes(self) -> list[str]:
        return [f"subscriber reconnects: {self.reconnects}"]

    def close(self) -> None:
        self.thread.stop()
        self.thread.join(2)
        self.pubsub.close()
        self.client.close()


# -- hybridinval --------------------------------------------------------------------------------


def sqlalchemy_integration_available() -> bool:
    """True when ``hybridinval.sqlalchemy`` exists with the API this harness drives."""
    try:
        from hybridinval import sqlalchemy as hsa
    except ImportError:
        return False
    return all(hasattr(hsa, name) for name in ("install", "track"))


class Hybridinval(Contender):
    """hybridinval, as its README says to use it: ``HybridCache.from_url`` in every process.

    With ``hybridinval.sqlalchemy`` present, the writer's session factory is ``install()``-ed and
    the model ``track()``-ed, so ``commit()`` itself publishes; readers go through
    ``cached(session, cache).get_or_set``. Without it, the writer calls
    ``cache.invalidate_committed(keys)`` right after ``commit()`` and readers call
    ``cache.get_or_set``.
    """

    name = "hybridinval"
    label = "hybridinval"
    has_l1 = True
    cross_process_l1 = "yes"
    uses_pubsub = True

    def __init__(self, env: Env, *, use_sqlalchemy: bool | None = None) -> None:
        from hybridinval import HybridCache

        super().__init__(env)
        self.cache = HybridCache.from_url(
            env.redis_url, namespace=env.prefix, l1_ttl=env.l1_ttl, **env.hybridinval
        )
        self.use_sqlalchemy = (
            sqlalchemy_integration_available() if use_sqlalchemy is None else use_sqlalchemy
        )
        self._installed = False

    def ready(self, timeout: float) -> bool:
        return self.cache.wait_until_subscribed(timeout)

    def install(self, session_factory: Any, model: type) -> None:
        # Readers install too: cached() needs the session class installed (it must see
        # the session's own pending changes); readers commit nothing, so they publish nothing.
        if not self.use_sqlalchemy:
            return
        from hybridinval.sqlalchemy import install, track

        track(model, keys=["item:{id}"])
        install(session_factory, self.cache)
        self._installed = True

    def reader(self, session: Any) -> ReadFn:
        if self._installed:
            from hybridinval.sqlalchemy import cached

            scoped = cached(session, self.cache)
            return scoped.get_or_set
        return self.cache.get_or_set

    def after_commit(self, keys: Sequence[str]) -> None:
        if not self._installed:
            self.cache.invalidate_committed(keys)

    def notes(self) -> list[str]:
        stats = self.cache.stats()
        if stats["lag_samples"] == 0:  # the writer hears only its own echoes
            return []
        if self.use_sqlalchemy:
            via = "hybridinval.sqlalchemy install()/track()/cached()"
        elif sqlalchemy_integration_available():
            via = "invalidate_committed() after commit, get_or_set() (core API only)"
        else:
            via = "invalidate_committed() after commit (hybridinval.sqlalchemy not present)"
        return [
            f"invalidation via {via}",
            f"blind periods: {stats['blind_periods']}, fill-guard rejections: "
            f"{stats['fill_guard_rejections']}, L2 CAS rejections: {stats['l2_cas_rejections']}",
            f"L1 lease {_ms(self.cache.l1_lease)}: reader waits for the subscriber: "
            f"{stats['lease_waits']}, L1 flushed for a lagging subscriber: "
            f"{stats['lease_flushes']}",
            f"backplane lag under load (send -> evicted here): p50 {stats['lag_p50_us']} us, "
            f"p99 {stats['lag_p99_us']} us, max {stats['lag_max_us']} us",
        ]

    def close(self) -> None:
        self.cache.close()


class HybridinvalAsync(Hybridinval):
    """hybridinval for asyncio code: ``AsyncHybridCache.from_url``, awaited reads
    (``await cached(session).aget_or_set`` with the integration, ``await cache.get_or_set``
    without), the same commit hooks."""

    name = "hybridinval_async"
    label = "hybridinval (AsyncHybridCache)"
    is_async = True

    def __init__(self, env: Env, *, use_sqlalchemy: bool | None = None) -> None:
        from hybridinval import AsyncHybridCache

        Contender.__init__(self, env)
        self.acache = AsyncHybridCache.from_url(
            env.redis_url, namespace=env.prefix, l1_ttl=env.l1_ttl, **env.hybridinval
        )
        self.cache = self.acache.sync  # notes() reads the shared counters
        self.use_sqlalchemy = (
            sqlalchemy_integration_available() if use_sqlalchemy is None else use_sqlalchemy
        )
        self._installed = False

    def install(self, session_factory: Any, model: type) -> None:
        if not self.use_sqlalchemy:
            return
        from hybridinval.sqlalchemy import install, track

        track(model, keys=["item:{id}"])
        install(session_factory, self.acache)
        self._installed = True

    async def ainit(self) -> None:
        pass

    def ready(self, timeout: float) -> bool:
        raise RuntimeError("use aready()")

    async def aready(self, timeout: float) -> bool:
        return await self.acache.wait_until_subscribed(timeout)

    def areader(self, session: Any) -> AReadFn:
        if self._installed:
            from hybridinval.sqlalchemy import cached

            return cached(session, self.acache).aget_or_set
        return self.acache.get_or_set

    async def aafter_commit(self, keys: Sequence[str]) -> None:
        if not self._installed:
            await self.acache.invalidate_committed(keys)

    async def aclose(self) -> None:
        await self.acache.aclose()


def _ms(seconds: float | None) -> str:
    return "off" if seconds is None else f"{seconds * 1000:g} ms"


class HybridinvalCore(Hybridinval):
    """hybridinval's core API alone: ``cache.get_or_set`` in readers and
    ``cache.invalidate_committed(keys)`` after ``commit()`` in the writer, no SQLAlchemy
    integration. Shows what the core costs apart from the session layer."""

    name = "hybridinval_core"
    label = "hybridinval (core API: get_or_set + invalidate_committed)"

    def __init__(self, env: Env) -> None:
        super().__init__(env, use_sqlalchemy=False)


# -- dogpile.cache ------------------------------------------------------------------------------


def _dogpile_redis_region(env: Env) -> Any:
    from dogpile.cache import make_region

    prefix = env.prefix + ":"
    return make_region(key_mangler=lambda key: prefix + key).configure(
        "dogpile.cache.redis",
        expiration_time=L2_TTL,
        arguments={
            "url": env.redis_url,
            "redis_expiration_time": L2_TTL + 60,
            "distributed_lock": False,
        },
    )


class DogpileRedis(Contender):
    """dogpile.cache with its Redis backend only: ``region.get_or_create`` / ``region.delete``."""

    name = "dogpile_redis"
    label = "dogpile.cache (redis backend)"

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        self.region = _dogpile_redis_region(env)

    def reader(self, session: Any) -> ReadFn:
        return self.region.get_or_create  # type: ignore[no-any-return]

    def after_commit(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.region.delete(key)


class DogpileMemoryRedis(Contender):
    """dogpile.cache as users build L1 + L2 with it: a memory region in front of a Redis region.

    ``region.delete()`` (like ``region.invalidate()``) acts on the memory backend of the calling
    process only: other processes keep serving their L1 copy until its ``expiration_time``.
    """

    name = "dogpile_memory_redis"
    label = "dogpile.cache (memory -> redis)"
    has_l1 = True
    cross_process_l1 = "no"

    def __init__(self, env: Env) -> None:
        from dogpile.cache import make_region

        super().__init__(env)
        self.l2 = _dogpile_redis_region(env)
        self.l1 = make_region().configure("dogpile.cache.memory", expiration_time=env.l1_ttl)

    def get_or_set(self, key: str, loader: Loader) -> Row:
        value: Row = self.l1.get_or_create(key, lambda: self.l2.get_or_create(key, loader))
        return value

    def reader(self, session: Any) -> ReadFn:
        return self.get_or_set

    def after_commit(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.l2.delete(key)
            self.l1.delete(key)  # this process only

    def notes(self) -> list[str]:
        return [f"other processes' L1 is bounded only by expiration_time={self.env.l1_ttl:g}s"]


# -- cashews ------------------------------------------------------------------------------------


class Cashews(Contender):
    """cashews with ``client_side=True``: an in-memory copy invalidated by Redis server-assisted
    tracking (BCAST on a prefix). Async-only, so readers and the writer run an event loop each.

    ``preflight`` checks, before the run, whether invalidations reach another instance at all:
    with redis-py 8 (RESP3 by default) they do not, and the run then uses ``protocol=2``, which
    the row says.
    """

    name = "cashews"
    label = "cashews (client_side=True)"
    is_async = True
    has_l1 = True
    cross_process_l1 = "yes"
    uses_pubsub = True

    def __init__(self, env: Env) -> None:
        from cashews import Cache

        super().__init__(env)
        self.cache = Cache()
        self.cache.setup(env.redis_url, client_side=True, client_side_prefix=env.prefix + ":")
        self.backend: Any = None

    async def ainit(self) -> None:
        await self.cache.init()
        self.backend = next(iter(self.cache._backends.values()))

    def ready(self, timeout: float) -> bool:
        raise RuntimeError("use aready()")

    async def aready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.backend._listen_started.is_set():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def areader(self, session: Any) -> AReadFn:
        get_or_set = self.cache.get_or_set

        async def read(key: str, loader: Loader) -> Row:
            value: Row = await get_or_set(key, loader, expire=L2_TTL)
            return value

        return read

    async def aafter_commit(self, keys: Sequence[str]) -> None:
        for key in keys:
            await self.cache.delete(key)

    async def aclose(self) -> None:
        await self.cache.close()


async def cashews_invalidation_reaches_peers(redis_url: str, prefix: str) -> bool:
    """Two cashews client-side instances: does a delete in one evict the other's local copy?"""
    from cashews import Cache

    reader, writer = Cache(), Cache()
    for cache in (reader, writer):
        cache.setup(redis_url, client_side=True, client_side_prefix=prefix + ":")
        await cache.init()
    try:
        await writer.set("probe", 1)
        await asyncio.sleep(0.05)
        assert await reader.get("probe") == 1
        backend: Any = next(iter(reader._backends.values()))
        local = backend._local_cache
        await writer.delete("probe")
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            if await local.get("probe", default=None) is None:
                return True
            await asyncio.sleep(0.01)
        return False
    finally:
        await reader.close()
        await writer.close()


# -- redis-py client-side caching --------------------------------------------------------------


def redis_py_csc_unsupported(redis_url: str) -> str | None:
    """Why redis-py's client-side cache (``cache_config``, RESP3) cannot run here, or None."""
    probe = redis.Redis.from_url(redis_url, protocol=2)
    try:
        version = str(probe.info("server")["redis_version"])
    finally:
        probe.close()
    try:
        from redis.cache import CacheConfig
    except ImportError as exc:
        return f"redis-py {redis.__version__} has no client-side cache ({exc})"
    client = redis.Redis.from_url(redis_url, protocol=3, cache_config=CacheConfig())
    try:
        client.get("hibench-csc-probe")
    except redis.RedisError as exc:
        return f"Redis {version}: {type(exc).__name__}: {exc}"
    finally:
        client.close()
    major, minor = (int(x) for x in version.split(".")[:2])
    if (major, minor) < (7, 4):
        return f"Redis {version} < 7.4 (server-assisted caching with RESP3 needs 7.4+)"
    return None


# -- registry -----------------------------------------------------------------------------------

CONTENDERS: dict[str, type[Contender]] = {
    c.name: c
    for c in (
        Hybridinval,
        HybridinvalCore,
        HybridinvalAsync,
        HandRolled,
        RedisOnly,
        DatabaseOnly,
        DogpileRedis,
        DogpileMemoryRedis,
        Cashews,
    )
}
"""Runnable contenders, in table order. redis-py CSC is probed, not run (see above)."""

REDIS_PY_CSC = "redis_py_csc"
REDIS_PY_CSC_LABEL = "redis-py client-side cache (cache_config, RESP3)"

# Each contender's Redis database: separate keyspaces, so a mistake in one cannot touch another.
REDIS_DBS = {name: i + 1 for i, name in enumerate([*CONTENDERS, REDIS_PY_CSC])}


def pinned_versions() -> dict[str, str]:
    """The installed versions of every contender library (what ``pyproject``'s bench extra pins)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for dist in (
        "hybridinval",
        "redis",
        "cachetools",
        "dogpile.cache",
        "cashews",
        "SQLAlchemy",
        "psycopg",
        "numpy",
        "matplotlib",
    ):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out
