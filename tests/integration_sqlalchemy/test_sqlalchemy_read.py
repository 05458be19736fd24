"""Reading through a session (no uncommitted data in shared caches) and the stale-set
race across real processes (no stale sets), including sessions that hold an older snapshot.
Every test runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session, sessionmaker
from support.inspect import entries
from support.sa_models import DbSpec, TrackedSession, User
from support.sa_procs import slow_loader_reader
from support.sa_spy import Publishes
from support.waiting import wait_until

import hybridinval.sqlalchemy
from hybridinval import HybridCache
from hybridinval.errors import (
    AmbiguousCacheError,
    SessionNotInstalledError,
    SQLAlchemyIntegrationError,
)
from hybridinval.sqlalchemy import cached, install, invalidate_on_commit

pytest_plugins = ["support.sa_fixtures"]  # db, engine, cache, Sessions, publishes


def name_of(session: Session, user_id: int = 1) -> str:
    name: str = session.execute(select(User.name).where(User.id == user_id)).scalar_one()
    return name


@pytest.fixture
def seeded(Sessions: sessionmaker[Any], publishes: Publishes) -> None:
    with Sessions.begin() as s:
        s.add_all(User(email=f"u{i}@x", name="committed") for i in (1, 2))  # ids 1, 2
    publishes.clear()


@pytest.fixture
def other_process(redis_url: str, namespace: str) -> Any:
    """A second cache instance: another process as far as L1 and the backplane go."""
    other = HybridCache.from_url(redis_url, namespace=namespace)
    assert other.wait_until_subscribed(10)
    yield other
    other.close()


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("stage", ["unflushed", "flushed"])
def test_a_key_with_pending_changes_is_loaded_and_never_stored(
    Sessions: sessionmaker[Any],
    cache: HybridCache,
    other_process: HybridCache,
    stage: str,
) -> None:
    with Sessions() as s:
        s.get(User, 1).name = "uncommitted"
        if stage == "flushed":
            s.flush()
        scoped = cached(s)
        loads: list[str] = []

        def loader() -> str:
            loads.append(name_of(s))
            return loads[-1]

        assert scoped.get_or_set("user:1", loader) == "uncommitted"  # the session's own write
        assert scoped.get_or_set("user:1", loader) == "uncommitted"
        assert loads == ["uncommitted", "uncommitted"]  # loaded each time, never cached
        assert scoped.get("user:1", "miss") == "miss"
        assert "user:1" not in entries(cache) and cache.l2.get("user:1")[0] is None
        s.rollback()
    # Another process reads the committed row.
    with Sessions() as s2:
        assert other_process.get_or_set("user:1", lambda: name_of(s2)) == "committed"


@pytest.mark.usefixtures("seeded")
def test_a_cached_key_is_not_served_to_a_session_that_changed_it(
    Sessions: sessionmaker[Any], cache: HybridCache
) -> None:
    cache.get_or_set("user:1", lambda: "committed")
    with Sessions() as s:
        s.get(User, 1).name = "mine"
        assert cached(s).get_or_set("user:1", lambda: name_of(s)) == "mine"
        assert cache.get("user:1") == "committed"  # others still get the committed value


@pytest.mark.usefixtures("seeded")
def test_which_keys_are_pending(Sessions: sessionmaker[Any], cache: HybridCache) -> None:
    with Sessions() as s:
        scoped = cached(s)
        assert not scoped.is_pending("user:1")
        s.add(User(email="new@x"))  # id unknown until the INSERT: any user:* may be it
        assert scoped.is_pending("user:12345") and scoped.is_pending("user_by_email:new@x")
        assert not scoped.is_pending("user_by_email:u1@x")
        s.flush()
        new_id = s.scalars(select(User.id).where(User.email == "new@x")).one()
        assert scoped.is_pending(f"user:{new_id}") and not scoped.is_pending("user:12345")
        sp = s.begin_nested()
        invalidate_on_commit(s, "report:1")
        s.get(User, 2).email = "changed@x"
        assert scoped.is_pending("report:1")
        assert scoped.is_pending("user_by_email:u2@x")
        assert scoped.is_pending("user_by_email:changed@x")
        s.flush()
        sp.rollback()  # that data is back to committed: nothing pending for it any more
        assert not scoped.is_pending("report:1") and not scoped.is_pending("user_by_email:u2@x")
        assert scoped.is_pending(f"user:{new_id}")
        s.commit()
        assert not scoped.is_pending(f"user:{new_id}")


@pytest.mark.usefixtures("seeded")
@pytest.mark.parametrize("stage", ["unflushed", "flushed"])
def test_keys_without_pending_changes_are_still_cached(
    Sessions: sessionmaker[Any], cache: HybridCache, stage: str
) -> None:
    """Other keys stay cacheable: PostgreSQL READ COMMITTED reads each statement fresh, and a
    SQLite write transaction holds the write lock, so nobody else can commit under it."""
    with Sessions() as s:
        s.get(User, 1).name = "pending"
        if stage == "flushed":
            s.flush()
        value = cached(s).get_or_set("user:2", lambda: name_of(s, 2))
    assert value == "committed" and cache.get("user:2") == "committed"


def test_cached_needs_an_installed_session(engine: Engine, cache: HybridCache) -> None:
    with Session(engine) as s:
        with pytest.raises(SessionNotInstalledError, match=r"cached\(\): .* not installed"):
            cached(s)
        with pytest.raises(SessionNotInstalledError, match="not installed"):
            cached(s, cache)  # naming a cache does not make the session's changes known


@pytest.mark.usefixtures("seeded")
def test_cached_reads_through_the_cache_the_session_was_installed_with(
    Sessions: sessionmaker[Any], cache: HybridCache
) -> None:
    with Sessions() as s:
        assert cached(s).cache is cache
        assert cached(s).get_or_set("user:1", lambda: name_of(s)) == "committed"
    assert cache.get("user:1") == "committed"
    again = install(TrackedSession, cache)  # a second installation, the same cache: no doubt
    try:
        with Sessions() as s:
            assert cached(s).cache is cache
    finally:
        again.uninstall()


@pytest.mark.usefixtures("seeded")
def test_cached_must_be_told_which_of_several_caches(
    Sessions: sessionmaker[Any], cache: HybridCache, redis_url: str, namespace: str
) -> None:
    second = HybridCache.from_url(redis_url, namespace=f"{namespace}-second")
    installation = install(TrackedSession, second)
    try:
        with Sessions() as s:
            with pytest.raises(AmbiguousCacheError, match="2 caches") as raised:
                cached(s)
            assert repr(namespace) in str(raised.value) and f"{namespace}-second" in str(
                raised.value
            )
            assert "cached(session, cache)" in str(raised.value)
            assert cached(s, second).cache is second
            assert cached(s, second).get_or_set("user:1", lambda: name_of(s)) == "committed"
        assert second.get("user:1") == "committed" and cache.get("user:1") is None
    finally:
        installation.uninstall()
        second.close()
    with Sessions() as s:
        assert cached(s).cache is cache  # one cache again
    assert issubclass(AmbiguousCacheError, SQLAlchemyIntegrationError)
    assert hybridinval.sqlalchemy.AmbiguousCacheError is AmbiguousCacheError


# -- snapshots older than the L2 version ---------------------------------------------------


def snapshot_engine(db: DbSpec) -> Engine:
    """An engine whose transactions keep one snapshot from their first read."""
    if db.kind == "postgresql":
        return db.engine(isolation_level="REPEATABLE READ")
    engine = db.engine()

    # SQLAlchemy's recipe for real SQLite transactions: the driver stays out of it and BEGIN
    # is emitted when the connection begins (pysqlite alone defers BEGIN until a write).
    @event.listens_for(engine, "connect")
    def _driver_autocommit(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")

    return engine


@pytest.mark.usefixtures("seeded")
def test_a_session_holding_an_older_snapshot_loads_but_does_not_fill(
    db: DbSpec,
    Sessions: sessionmaker[Any],
    cache: HybridCache,
) -> None:
    """The session's snapshot predates a commit whose invalidation already happened: the L2
    version it would compare against is new, the row it reads is old. It must not store."""
    snap = snapshot_engine(db)
    factory = sessionmaker(snap, class_=TrackedSession)
    installation = install(factory, cache)
    try:
        with factory() as s:
            scoped = cached(s)
            assert scoped.can_cache("user:1")  # nothing read yet: no snapshot
            assert name_of(s, 2) == "committed"  # the snapshot starts here
            with Sessions.begin() as w:
                w.get(User, 1).name = "new"
            assert not scoped.can_cache("user:1")
            assert scoped.get_or_set("user:1", lambda: name_of(s)) == "committed"
        assert cache.l2.get("user:1")[0] is None and "user:1" not in entries(cache)
        with Sessions() as fresh:
            assert cached(fresh).get_or_set("user:1", lambda: name_of(fresh)) == "new"
    finally:
        installation.uninstall()
        snap.dispose()


@pytest.mark.usefixtures("seeded")
def test_per_statement_snapshots_keep_filling(
    Sessions: sessionmaker[Any], cache: HybridCache
) -> None:
    """PostgreSQL READ COMMITTED, and SQLite reads outside a write transaction, see every
    commit made before each statement: caching stays on after the session has read."""
    with Sessions() as s:
        assert name_of(s, 2) == "committed"
        assert cached(s, cache).can_cache("user:1")  # the cache named, as it may be
        assert cached(s, cache).get_or_set("user:1", lambda: name_of(s)) == "committed"
    assert cache.get("user:1") == "committed"


# -- the stale-set race across real processes --------------------------------------------


@pytest.mark.usefixtures("seeded")
def test_a_load_that_read_before_a_commit_is_not_stored_after_it(
    db: DbSpec,
    Sessions: sessionmaker[Any],
    cache: HybridCache,
    redis_url: str,
    namespace: str,
) -> None:
    """B reads user 1 (old row); A commits a change and publishes; only then does B's load
    return. B must serve what it read to its caller, but store it nowhere."""
    ctx = multiprocessing.get_context("spawn")
    loaded, go = ctx.Event(), ctx.Event()
    out: Any = ctx.Queue()
    child = ctx.Process(target=slow_loader_reader, args=(redis_url, namespace, db, loaded, go, out))
    child.start()
    try:
        assert loaded.wait(60), "child never loaded"
        with Sessions.begin() as s:  # A
            s.get(User, 1).name = "new"
        assert cache.l2.get("user:1")[0] is None
        go.set()
        result = out.get(timeout=60)
    finally:
        go.set()
        child.join(30)
    assert result[0] == "ok", result
    _, first, in_l1, in_l2, again, cas_rejections = result
    assert first == "committed"  # the caller gets what was read, consistent with its query
    assert in_l1 is None and in_l2 is None  # stored nowhere
    assert cas_rejections >= 1
    assert again == "new"
    wait_until(lambda: cache.get("user:1") == "new", what="L2 holding the new row")
    assert child.exitcode == 0
