"""AsyncSession (guarantee set as for Session): its events run on the sync session underneath,
so the same frames, root-commit rule and bypasses apply. aiosqlite and psycopg 3 async.

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

from hybridinval import HybridCache
from hybridinval.sqlalchemy import cached, install, invalidate_on_commit

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


@pytest.fixture
def factory(db: DbSpec, cache: HybridCache) -> Iterator[async_sessionmaker[AsyncSession]]:
    engine = async_engine(db)
    factory = async_sessionmaker(engine, sync_session_class=AsyncTracked, expire_on_commit=False)
    installation = install(factory, cache)

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
