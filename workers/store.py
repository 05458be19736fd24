"""Reads and writes shared by the web app and the tasks, and each process's runtime.

A :class:`Runtime` is one process's engine, session factory, cache and installation. It is built
on first use in the process that uses it (:func:`runtime`), because neither a SQLAlchemy pool nor
a cache may cross ``fork``: gunicorn workers and Celery children each build their own.

Reads go through ``cached(session)``: L1, then L2, then the database, never caching
what the session itself has changed. Writes go through a session; the installed unit of work
publishes the changed keys after the commit. Every read reports the version it saw and when it
started; every write reports the version it committed and when ``commit()`` returned: the demo
checks staleness with exactly these numbers.

This module must never share a Runtime between processes, never read a value for a write from
the cache (writes read the database), and never report a write before its commit returned.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from hybridinval import AsyncHybridCache, HybridCache
from hybridinval.keyspace import Keyspace
from hybridinval.sqlalchemy import Installation, cached, install

from .models import Card, User, card_key, user_key
from .settings import Settings, load

__all__ = ["Runtime", "read_card", "read_user", "runtime", "stats_key", "update_user"]

log = logging.getLogger("workers.store")

WRITE_ATTEMPTS = 20
STATS_TTL_S = 24 * 3600
"""How long the stats hash outlives the last process that wrote to it (the demo reads it right
away; a deployment's stopped processes can be looked at for a day)."""


@dataclass
class Runtime:
    """Everything one process needs to serve reads and writes."""

    settings: Settings
    engine: Engine
    Sessions: sessionmaker[Session]
    cache: HybridCache
    installation: Installation
    role: str
    owns_cache: bool
    pid: int = field(default_factory=os.getpid)
    counters: Counter[str] = field(default_factory=Counter)

    def stats(self) -> dict[str, Any]:
        """This process's numbers: its own counters and its cache's."""
        return process_stats(self.role, self.pid, self.counters, self.cache)

    @property
    def process(self) -> str:
        """How the demo names this process: ``<role>:<pid>``."""
        return f"{self.role}:{self.pid}"

    def close(self) -> None:
        self.installation.uninstall()
        if self.owns_cache:
            self.cache.close()
        self.engine.dispose()


def process_stats(
    role: str, pid: int, counters: Counter[str], cache: HybridCache | AsyncHybridCache
) -> dict[str, Any]:
    """A process's numbers, as every process of the example reports them."""
    stats = cache.stats()
    hits, misses = stats["l1_hits"], stats["l1_misses"]
    return {
        "role": role,
        "pid": pid,
        "instance_id": cache.instance_id,
        "reads": counters["reads"],
        "writes": counters["writes"],
        "write_retries": counters["write_retries"],
        "l1_hits": hits,
        "l1_misses": misses,
        # None when the cache was built without count_hits=True.
        "l1_hit_ratio": hits / (hits + misses) if hits is not None and hits + misses else None,
        "invalidations_received": stats["invalidations_received"],
        "lag_p50_us": stats["lag_p50_us"],
        "lag_p99_us": stats["lag_p99_us"],
        "lag_samples": stats["lag_samples"],
        "subscribed": stats["subscribed"],
        "blind_periods": stats["blind_periods"],
    }


class Reporting(Protocol):
    """A process that leaves its stats for the demo (:class:`Runtime`, and the asyncio one)."""

    settings: Settings
    role: str
    pid: int

    def stats(self) -> dict[str, Any]: ...


_lock = threading.Lock()
_runtime: Runtime | None = None


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL and a long busy timeout (several processes write)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _wal(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def runtime(role: str = "web", cache: Callable[[], HybridCache] | None = None) -> Runtime:
    """This process's runtime, built on first call (after any fork).

    ``cache`` supplies the process's cache when someone else owns it (a Celery child's comes
    from :func:`hybridinval.celery.current_cache`); by default the runtime builds and owns one.
    """
    global _runtime
    current = _runtime
    if current is not None and current.pid == os.getpid():
        return current
    with _lock:
        current = _runtime
        if current is not None and current.pid == os.getpid():
            return current
        settings = load()
        engine = make_engine(settings.database_url)
        owns = cache is None
        the_cache = (
            # The example reports its L1 hit ratio, so it asks for hits to be counted.
            HybridCache.from_url(settings.redis_url, **settings.cache_options(), count_hits=True)
            if cache is None
            else cache()
        )
        Sessions = sessionmaker(engine, expire_on_commit=False)
        # outbox=True: each commit's keys also go to the outbox table in its own transaction,
        # and this process runs a relay, so a process killed between a COMMIT and its publish
        # is still invalidated everywhere (README: the outbox).
        installation = install(Sessions, the_cache, outbox=True)
        current = Runtime(settings, engine, Sessions, the_cache, installation, role, owns)
        _runtime = current
    atexit.register(_close_at_exit, current)
    log.info(
        "%s runtime in pid %d: cache instance %s, database %s",
        role,
        current.pid,
        the_cache.instance_id,
        engine.url.render_as_string(hide_password=True),
    )
    return current


def close_runtime(publish: bool = True) -> None:
    """Publish this process's stats (see :func:`publish_stats`) and close its runtime."""
    global _runtime
    with _lock:
        current = _runtime
        if current is None or current.pid != os.getpid():
            return
        _runtime = None
    if publish:
        publish_stats(current)
    current.close()


def _close_at_exit(current: Runtime) -> None:
    if _runtime is current and current.pid == os.getpid():
        close_runtime()


def stats_key(namespace: str) -> str:
    """The Redis hash where each process of ``namespace`` leaves its final stats, a field per
    process (``web:<pid>``, ``task:<pid>``)."""
    return Keyspace(namespace).app("process-stats")


def publish_stats(current: Reporting) -> None:
    """Leave this process's final stats in Redis (a hash field per process), for the demo's
    table: a process that exits cleanly reports even if nobody can reach it any more (a
    replaced Celery child). The hash and its TTL are set in one transaction, so it never lives
    forever. Never raises: a process on its way out has nobody to raise to."""
    import redis

    key = stats_key(current.settings.namespace)
    try:
        with (
            redis.Redis.from_url(
                current.settings.redis_url, socket_timeout=2, socket_connect_timeout=2
            ) as client,
            client.pipeline(transaction=True) as pipe,
        ):
            pipe.hset(key, f"{current.role}:{current.pid}", json.dumps(current.stats()))
            pipe.expire(key, STATS_TTL_S)
            pipe.execute()
    except Exception as exc:
        log.warning("could not publish the stats of pid %d: %s", current.pid, exc)


# -- reads --------------------------------------------------------------------------------------


def read_user(rt: Runtime, user_id: int) -> dict[str, Any]:
    """``{"user": <dict or None>, "started_ns": ..., "pid": ..., "instance_id": ...}``."""
    started_ns = time.time_ns()
    with rt.Sessions() as session:

        def load() -> dict[str, Any] | None:
            user = session.get(User, user_id)
            return None if user is None else user.to_dict()

        value = cached(session, rt.cache).get_or_set(user_key(user_id), load)
    rt.counters["reads"] += 1
    return {
        "user": value,
        "started_ns": started_ns,
        "pid": rt.pid,
        "process": rt.process,
        "instance_id": rt.cache.instance_id,
    }


def read_card(rt: Runtime, user_id: int) -> dict[str, Any] | None:
    with rt.Sessions() as session:

        def load() -> dict[str, Any] | None:
            card = session.get(Card, user_id)
            return None if card is None else card.to_dict()

        value: dict[str, Any] | None = cached(session, rt.cache).get_or_set(card_key(user_id), load)
    rt.counters["reads"] += 1
    return value


# -- writes -------------------------------------------------------------------------------------


def create_user(rt: Runtime, user_id: int, name: str, email: str) -> dict[str, Any]:
    with rt.Sessions.begin() as session:
        user = User(id=user_id, name=name, email=email, bio="")
        session.add(user)
        session.flush()
        payload = user.to_dict()
    rt.counters["writes"] += 1
    return {"user": payload, "committed_ns": time.time_ns(), "pid": rt.pid, "process": rt.process}


def update_user(
    rt: Runtime,
    user_id: int,
    *,
    name: str | None = None,
    bio: str | None = None,
    on_commit: Callable[[Session], None] | None = None,
) -> dict[str, Any] | None:
    """Change a user; returns the committed version and when ``commit()`` returned, or None if
    there is no such user. ``on_commit(session)`` runs inside the transaction (for
    ``enqueue_on_commit``). Concurrent updates of one user are retried (optimistic locking)."""
    for attempt in range(WRITE_ATTEMPTS):
        try:
            with rt.Sessions.begin() as session:
                user = session.get(User, user_id)
                if user is None:
                    return None
                if name is not None:
                    user.name = name
                if bio is not None:
                    user.bio = bio
                if on_commit is not None:
                    on_commit(session)
                session.flush()
                payload = user.to_dict()
            committed_ns = time.time_ns()
        except StaleDataError:
            # Another process committed a newer version since we read the row: read it again.
            rt.counters["write_retries"] += 1
            time.sleep(0.001 * (attempt + 1))
            continue
        rt.counters["writes"] += 1
        return {
            "user": payload,
            "committed_ns": committed_ns,
            "pid": rt.pid,
            "process": rt.process,
        }
    raise RuntimeError(f"user {user_id}: {WRITE_ATTEMPTS} conflicting updates in a row")


def refresh_card(rt: Runtime, user_id: int) -> dict[str, Any] | None:
    """Rebuild a user's card from the user as the cache serves it now.

    Sent with ``enqueue_on_commit`` after a user change, so the cache no longer holds the old
    user here; a card never moves back to an older user version.
    """
    user = read_user(rt, user_id)["user"]
    if user is None:
        return None
    headline = f"{user['name']} <{user['email']}>: {user['bio'][:200]}"
    for attempt in range(WRITE_ATTEMPTS):
        try:
            with rt.Sessions.begin() as session:
                card = session.get(Card, user_id, with_for_update=True)
                if card is not None and card.user_version >= user["version"]:
                    return card.to_dict()  # a newer refresh got here first
                if card is None:
                    card = Card(user_id=user_id)
                    session.add(card)
                card.headline, card.user_version = headline, user["version"]
                session.flush()
                payload = card.to_dict()
        except IntegrityError:  # two first refreshes racing to INSERT: retry as an update
            if attempt == WRITE_ATTEMPTS - 1:
                raise
            time.sleep(0.001 * (attempt + 1))
            continue
        rt.counters["writes"] += 1
        return payload
    return None
