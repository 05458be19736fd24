"""The reads and writes of the FastAPI service (:mod:`.api`): :mod:`.store`'s, on asyncio.

An :class:`AsyncRuntime` is one process's async engine, ``async_sessionmaker``,
:class:`~hybridinval.AsyncHybridCache` and installation, built in the service's lifespan, so in
each uvicorn (or gunicorn ``UvicornWorker``) process after any fork. Reads go through
``cached(session).aget_or_set``; an ``AsyncSession`` commit awaits its invalidation, so no Redis
round trip blocks the event loop. Every read and write reports what :mod:`.store`'s do (the
version, ``started_ns`` / ``committed_ns``, the process), so the demo checks both alike.

The outbox relay of this process runs on a thread and needs a synchronous engine: a second,
small one on the same database.

This module must never share a runtime between processes, never read a value for a write from
the cache, and never report a write before its commit returned.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from hybridinval import AsyncHybridCache
from hybridinval.sqlalchemy import Installation, Outbox, cached, install

from . import store
from .models import Card, User, card_key, user_key
from .settings import Settings, load

__all__ = [
    "ApiSession",
    "AsyncRuntime",
    "async_database_url",
    "close_runtime",
    "open_runtime",
    "read_card",
    "read_user",
    "update_user",
]

log = logging.getLogger("workers.async_store")


class ApiSession(Session):
    """The sync class under the service's AsyncSessions: what ``install()`` listens on."""


@dataclass
class AsyncRuntime:
    """Everything one asyncio process needs to serve reads and writes."""

    settings: Settings
    engine: AsyncEngine
    relay_engine: Engine
    Sessions: async_sessionmaker[AsyncSession]
    cache: AsyncHybridCache
    installation: Installation
    role: str = "api"
    pid: int = field(default_factory=os.getpid)
    counters: Counter[str] = field(default_factory=Counter)

    def stats(self) -> dict[str, Any]:
        return store.process_stats(self.role, self.pid, self.counters, self.cache)

    @property
    def process(self) -> str:
        return f"{self.role}:{self.pid}"


def async_database_url(url: str) -> str:
    """The asyncio driver's URL for the example's database URL: aiosqlite for SQLite; psycopg
    (3) serves both, so a PostgreSQL URL names it."""
    if url.startswith("sqlite:"):
        return "sqlite+aiosqlite:" + url[len("sqlite:") :]
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_async_engine(url: str, **options: Any) -> AsyncEngine:
    """As :func:`store.make_engine`, for asyncio: SQLite gets WAL and a long busy timeout.
    ``options`` go to ``create_async_engine`` (``poolclass=NullPool`` where each event loop is
    short-lived: a pooled connection belongs to the loop that opened it)."""
    async_url = async_database_url(url)
    if async_url.startswith("sqlite"):
        engine = create_async_engine(async_url, connect_args={"timeout": 30}, **options)

        @event.listens_for(engine.sync_engine, "connect")
        def _wal(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_async_engine(async_url, pool_pre_ping=True, **options)


async def open_runtime(role: str = "api") -> AsyncRuntime:
    """This process's runtime, for its event loop. Never blocks the loop on the network: the
    cache subscribes in the background, the engines connect on first use."""
    settings = await asyncio.to_thread(load)  # may start an embedded Redis (no URL given)
    return build_runtime(settings, role)


def build_runtime(
    settings: Settings,
    role: str,
    cache: AsyncHybridCache | None = None,
    **engine_options: Any,
) -> AsyncRuntime:
    """A runtime on ``cache`` (default: a new one this runtime owns and closes)."""
    engine = make_async_engine(settings.database_url, **engine_options)
    relay_engine = store.make_engine(settings.database_url)
    if cache is None:
        cache = AsyncHybridCache.from_url(
            settings.redis_url, **settings.cache_options(), count_hits=True
        )
    cache.start()
    Sessions = async_sessionmaker(engine, sync_session_class=ApiSession, expire_on_commit=False)
    installation = install(Sessions, cache, outbox=Outbox(relay=relay_engine))
    rt = AsyncRuntime(settings, engine, relay_engine, Sessions, cache, installation, role)
    log.info(
        "%s runtime in pid %d: cache instance %s, database %s",
        role,
        rt.pid,
        cache.instance_id,
        engine.url.render_as_string(hide_password=True),
    )
    return rt


async def close_runtime(rt: AsyncRuntime, publish: bool = True) -> None:
    """Leave this process's stats for the demo (:func:`store.publish_stats`), then close."""
    if publish:
        await asyncio.to_thread(store.publish_stats, rt)
    rt.installation.uninstall()
    await rt.cache.aclose()
    await rt.engine.dispose()
    await asyncio.to_thread(rt.relay_engine.dispose)


# -- reads --------------------------------------------------------------------------------------


async def read_user(rt: AsyncRuntime, user_id: int) -> dict[str, Any]:
    """As :func:`store.read_user`."""
    started_ns = time.time_ns()
    async with rt.Sessions() as session:

        async def load() -> dict[str, Any] | None:
            user = await session.get(User, user_id)
            return None if user is None else user.to_dict()

        value = await cached(session, rt.cache).aget_or_set(user_key(user_id), load)
    rt.counters["reads"] += 1
    return {
        "user": value,
        "started_ns": started_ns,
        "pid": rt.pid,
        "process": rt.process,
        "instance_id": rt.cache.instance_id,
    }


async def read_card(rt: AsyncRuntime, user_id: int) -> dict[str, Any] | None:
    async with rt.Sessions() as session:

        async def load() -> dict[str, Any] | None:
            card = await session.get(Card, user_id)
            return None if card is None else card.to_dict()

        value: dict[str, Any] | None = await cached(session, rt.cache).aget_or_set(
            card_key(user_id), load
        )
    rt.counters["reads"] += 1
    return value


# -- writes -------------------------------------------------------------------------------------


async def create_user(rt: AsyncRuntime, user_id: int, name: str, email: str) -> dict[str, Any]:
    async with rt.Sessions.begin() as session:
        user = User(id=user_id, name=name, email=email, bio="")
        session.add(user)
        await session.flush()
        payload = user.to_dict()
    rt.counters["writes"] += 1
    return {"user": payload, "committed_ns": time.time_ns(), "pid": rt.pid, "process": rt.process}


async def update_user(
    rt: AsyncRuntime,
    user_id: int,
    *,
    name: str | None = None,
    bio: str | None = None,
    on_commit: Callable[[Any], None] | None = None,
) -> dict[str, Any] | None:
    """As :func:`store.update_user` (``on_commit(session)`` gets the AsyncSession)."""
    for attempt in range(store.WRITE_ATTEMPTS):
        try:
            async with rt.Sessions.begin() as session:
                user = await session.get(User, user_id)
                if user is None:
                    return None
                if name is not None:
                    user.name = name
                if bio is not None:
                    user.bio = bio
                if on_commit is not None:
                    on_commit(session)
                await session.flush()
                payload = user.to_dict()
            committed_ns = time.time_ns()
        except StaleDataError:
            # Another process committed a newer version since we read the row: read it again.
            rt.counters["write_retries"] += 1
            await asyncio.sleep(0.001 * (attempt + 1))
            continue
        rt.counters["writes"] += 1
        return {
            "user": payload,
            "committed_ns": committed_ns,
            "pid": rt.pid,
            "process": rt.process,
        }
    raise RuntimeError(f"user {user_id}: {store.WRITE_ATTEMPTS} conflicting updates in a row")
