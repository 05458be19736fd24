"""AsyncSession (guarantee set as for Session): its events run on the sync session underneath,
so the same frames, root-commit rule and bypasses apply. aiosqlite and psycopg 3 async; each
test with a blocking HybridCache installed and with an AsyncHybridCache (whose publish the
commit awaits, in the greenlet SQLAlchemy runs the sync session's events in).

Plain ``asyncio.run`` in sync tests: no pytest plugin needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, select, update
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from support.inspect import entries
from support.sa_models import DbSpec, TrackedSession, User
from support.sa_spy import Publishes
from support.waiting import wait_until

from hybridinval import AsyncHybridCache, HybridCache
from hybridinval._async import AnyCache
from hybridinval.sqlalchemy import cached, install, invalidate_on_commit, on_commit

pytest_plugins = ["support.sa_fixtures"]  # db, engine, cache, Sessions, publishes


def async_engine(db: DbSpec) -> AsyncEngine:
    if db.kind == "sqlite":
        engine = create_async_engine(db.url.replace("sqlite://", "sqlite+aiosqlite://", 1))

        @event.listens_for(engine.sync_engine, "connect")
        def _fk(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    engine = create_async_engine(db.url)
    return engine.execution_options(schema_translate_map={None: db.schema})


class AsyncTracked(TrackedSession):
    pass


@pytest.fixture(params=["HybridCache", "AsyncHybridCache"])
def installed_cache(request: pytest.FixtureRequest, cache: HybridCache) -> AnyCache:
    """What the factory is installed with: ``cache`` itself, or its asyncio face (same core, so
    the tests look inside either through ``cache``)."""
    return cache if request.param == "HybridCache" else AsyncHybridCache.wrap(cache)


@pytest.fixture
def publishes(installed_cache: AnyCache) -> Publishes:
    return Publishes(installed_cache)


@pytest.fixture
def factory(db: DbSpec, installed_cache: AnyCache) -> Iterator[async_sessionmaker[AsyncSession]]:
    engine = async_engine(db)
    factory = async_sessionmaker(engine, sync_session_class=AsyncTracked, expire_on_commit=False)
    installation = install(factory, installed_cache)

    async def seed() -> None:
        async with factory.begin() as s:
            s.add_all(User(id=i, email=f"u{i}@x", name="committed") for i in (1, 2, 3))

    asyncio.run(seed())
    try:
        yield factory
    finally:
        installation.uninstall()
        asyncio.run(engine.dispose())


def test_async_commit_publishes_once_after_the_root_commit(
    factory: async_sessionmaker[AsyncSession], publishes: Publishes
) -> None:
    publishes.clear()

    async def work() -> None:
        async with factory() as s:
            (await s.get(User, 1)).name = "a"
            async with s.begin_nested():
                (await s.get(User, 2)).name = "released"
            savepoint = await s.begin_nested()
            (await s.get(User, 3)).name = "dropped"
            invalidate_on_commit(s, "report:3")
            await s.flush()
            await savepoint.rollback()
            await s.flush()
            assert publishes.calls == []
            await s.commit()

    asyncio.run(work())
    assert len(publishes.calls) == 1
    assert set(publishes.calls[0]) == {
        "user:1",
        "user_by_email:u1@x",
        "user:2",
        "user_by_email:u2@x",
    }


def test_async_rollback_and_bulk_update(
    factory: async_sessionmaker[AsyncSession], publishes: Publishes
) -> None:
    publishes.clear()

    async def work() -> None:
        async with factory() as s:
            (await s.get(User, 1)).name = "never"
            await s.flush()
            await s.rollback()
        async with factory.begin() as s:
            await s.execute(update(User).where(User.id >= 2).values(email=User.email + "z"))

    asyncio.run(work())
    assert [set(c) for c in publishes.calls] == [
        {
            "user:2",
            "user:3",
            "user_by_email:u2@x",
            "user_by_email:u3@x",
            "user_by_email:u2@xz",
            "user_by_email:u3@xz",
        }
    ]


def test_async_joined_session_publishes_at_the_outer_commit(
    db: DbSpec,
    cache: HybridCache,
    factory: async_sessionmaker[AsyncSession],
    publishes: Publishes,
) -> None:
    publishes.clear()
    engine = async_engine(db)

    async def work() -> None:
        async with engine.connect() as conn:
            await conn.begin()
            s = factory(bind=conn, join_transaction_mode="create_savepoint")
            (await s.get(User, 1)).name = "joined"
            await s.commit()
            await s.close()
            assert publishes.calls == []
            await conn.commit()
        await engine.dispose()

    asyncio.run(work())
    assert publishes.calls == [["user:1", "user_by_email:u1@x"]]


def test_aget_or_set_bypasses_pending_keys_and_caches_the_rest(
    factory: async_sessionmaker[AsyncSession], cache: HybridCache
) -> None:
    async def work() -> tuple[Any, ...]:
        async with factory() as s:
            scoped = cached(s)  # an AsyncSession: its sync session is the one read

            async def load(user_id: int) -> str:
                name: str = (
                    await s.execute(select(User.name).where(User.id == user_id))
                ).scalar_one()
                return name

            (await s.get(User, 1)).name = "mine"
            own = await scoped.aget_or_set("user:1", lambda: load(1))
            other = await scoped.aget_or_set("user:2", lambda: load(2))
            hit = await scoped.aget_or_set("user:2", lambda: load(999))  # L1 hit: no load
            await s.rollback()
            return own, other, hit

    own, other, hit = asyncio.run(work())
    assert (own, other, hit) == ("mine", "committed", "committed")
    assert "user:1" not in entries(cache) and cache.l2.get("user:1")[0] is None
    assert cache.get("user:2") == "committed"


def test_install_resolves_async_factories(db: DbSpec, cache: HybridCache) -> None:
    engine = async_engine(db)
    with pytest.raises(ValueError, match="dedicated"):
        install(async_sessionmaker(engine), cache)

    class MyAsync(AsyncSession):
        sync_session_class = AsyncTracked

    installation = install(MyAsync, cache)
    assert installation.session_class is AsyncTracked
    installation.uninstall()
    asyncio.run(engine.dispose())


# -- with an AsyncHybridCache: the publish is awaited ------------------------------------------


class SlowPublish:
    """Holds the asyncio cache's L2 invalidation until ``release`` is set (on the loop)."""

    def __init__(self, cache: AsyncHybridCache) -> None:
        self.real = cache.l2
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.awaited = 0
        cache.l2 = self

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def invalidate_many(self, *args: Any) -> None:
        self.awaited += 1
        self.started.set()
        await self.release.wait()
        await self.real.invalidate_many(*args)


@pytest.mark.parametrize("installed_cache", ["AsyncHybridCache"], indirect=True)
def test_an_async_commit_awaits_its_publish_and_the_loop_runs_on(
    factory: async_sessionmaker[AsyncSession], installed_cache: AsyncHybridCache, cache: HybridCache
) -> None:
    """While the publish after COMMIT is pending, the other tasks of the loop run (here one of
    them is what lets the publish finish): with a blocking publish this would deadlock."""
    cache.get_or_set("user:1", lambda: "old")

    async def work() -> None:
        slow = SlowPublish(installed_cache)

        async def commit() -> None:
            async with factory.begin() as s:
                (await s.get(User, 1)).name = "new"

        committing = asyncio.create_task(commit())
        await asyncio.wait_for(slow.started.wait(), 10)
        assert not committing.done()
        assert "user:1" in entries(cache)  # not evicted before the publish went out
        slow.release.set()
        await asyncio.wait_for(committing, 10)
        assert slow.awaited == 1
        assert "user:1" not in entries(cache)  # read your writes once commit() returned

    asyncio.run(work())


@pytest.mark.parametrize("installed_cache", ["AsyncHybridCache"], indirect=True)
def test_a_task_cancelled_during_the_publish_still_invalidates_and_runs_callbacks(
    factory: async_sessionmaker[AsyncSession],
    installed_cache: AsyncHybridCache,
    cache: HybridCache,
    make_cache: Any,
) -> None:
    other = make_cache()
    other.get_or_set("user:1", lambda: "old")
    ran: list[str] = []

    async def work() -> None:
        slow = SlowPublish(installed_cache)

        async def commit() -> None:
            async with factory() as s:
                (await s.get(User, 1)).name = "cancelled-but-committed"
                on_commit(s, lambda: ran.append("callback"))
                await s.commit()

        committing = asyncio.create_task(commit())
        await asyncio.wait_for(slow.started.wait(), 10)
        committing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await committing
        async with factory() as s:
            assert (await s.get(User, 1)).name == "cancelled-but-committed"

    asyncio.run(work())
    assert ran == ["callback"]
    # The retry (the blocking store, on its own thread) delivers the invalidation.
    wait_until(lambda: "user:1" not in entries(other), what="the retried invalidation")
    assert cache.stats()["publish_failures"] == 1


@pytest.mark.parametrize("installed_cache", ["AsyncHybridCache"], indirect=True)
def test_aget_reads_through_the_asyncio_cache_and_bypasses_pending_keys(
    factory: async_sessionmaker[AsyncSession], installed_cache: AsyncHybridCache, cache: HybridCache
) -> None:
    async def work() -> tuple[Any, ...]:
        await installed_cache.set("user:1", "cached-1")
        await installed_cache.set("user:2", "cached-2")
        async with factory() as s:
            (await s.get(User, 1)).name = "mine"
            scoped = cached(s)
            result = (await scoped.aget("user:1", "pending"), await scoped.aget("user:2"))
            await s.rollback()
            return result

    assert asyncio.run(work()) == ("pending", "cached-2")


def test_a_blocking_session_may_use_an_asyncio_cache(engine: Any, cache: HybridCache) -> None:
    """A sync Session (a Celery task, a script) installed with the asyncio cache publishes
    through its blocking face, with no event loop anywhere."""
    from sqlalchemy.orm import sessionmaker

    async_cache = AsyncHybridCache.wrap(cache)
    recorded = Publishes(cache)  # the blocking face publishes: no loop to await on
    factory = sessionmaker(engine, class_=AsyncTracked)
    installation = install(factory, async_cache)
    try:
        with factory.begin() as s:
            s.add(User(id=9, email="u9@x", name="sync"))
        with factory() as s:
            assert cached(s, async_cache).get_or_set("user:9", lambda: "loaded") == "loaded"
    finally:
        installation.uninstall()
    assert recorded.calls == [["user:9", "user_by_email:u9@x"]]
    assert "user:9" in entries(cache)
