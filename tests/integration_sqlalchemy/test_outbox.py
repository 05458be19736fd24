"""The transactional outbox and its relay (guarantee: *durable invalidation*).

A committed change's keys are written to the outbox table in the change's own transaction, so a
writer that dies between its COMMIT and its publish, or whose Redis was unreachable at the
commit, still has its invalidation delivered by a relay in another process. Writers are killed
by SIGKILL at forced points (inside the publish; after a publish that failed), never after a
sleep.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, delete, event, select
from sqlalchemy.orm import Session, sessionmaker
from support.proxy import TcpProxy
from support.sa_models import OUTBOX, DbSpec, TrackedSession, User, create_database
from support.sa_procs import outbox_relay, outbox_writer
from support.sa_spy import record_invalidations
from support.servers import RedisServer

from hybridinval import HybridCache, OutboxError
from hybridinval.sqlalchemy import (
    Installation,
    Outbox,
    OutboxRelay,
    cached,
    install,
    invalidate_on_commit,
)
from hybridinval.sqlalchemy._outbox import write_rows

pytest_plugins = ["support.sa_fixtures"]  # db, engine, cache, Sessions

ctx = multiprocessing.get_context("spawn")

# Slow enough that a test reads a row before this process deletes it; the tests that need the
# relay to act pass their own.
KEEP_ROWS = Outbox(relay=False, interval=60.0)


def rows(engine: Engine) -> list[tuple[int, str, list[str]]]:
    with engine.connect() as conn:
        found = conn.execute(select(OUTBOX.c.id, OUTBOX.c.namespace, OUTBOX.c["keys"])).all()
    return [(row_id, ns, json.loads(keys)) for row_id, ns, keys in found]


@pytest.fixture
def with_outbox(
    engine: Engine, cache: HybridCache
) -> Iterator[Callable[..., tuple[sessionmaker[Any], Installation]]]:
    made: list[Installation] = []

    def make(outbox: Outbox = KEEP_ROWS) -> tuple[sessionmaker[Any], Installation]:
        factory: sessionmaker[Any] = sessionmaker(engine, class_=TrackedSession)
        installation = install(factory, cache, outbox=outbox)
        made.append(installation)
        return factory, installation

    yield make
    for installation in made:
        installation.uninstall()


def seed_user(factory: sessionmaker[Any], engine: Engine, user_id: int = 1) -> None:
    with factory.begin() as s:
        s.add(User(id=user_id, email=f"u{user_id}@x", name="old"))
    with engine.begin() as conn:
        conn.execute(delete(OUTBOX))


def test_the_row_commits_with_the_data_and_rolls_back_with_it(
    engine: Engine, cache: HybridCache, with_outbox: Callable[..., Any]
) -> None:
    factory, installation = with_outbox()
    seed_user(factory, engine)
    with factory.begin() as s:
        s.get(User, 1).name = "new"
        invalidate_on_commit(s, "report:1")
    assert [(ns, set(keys)) for _, ns, keys in rows(engine)] == [
        (cache.namespace, {"user:1", "user_by_email:u1@x", "report:1"})
    ]
    with engine.begin() as conn:
        conn.execute(delete(OUTBOX))

    s = factory()
    s.begin()
    s.get(User, 1).name = "rolled back"
    s.flush()
    invalidate_on_commit(s, "report:2")
    s.rollback()
    s.close()
    assert rows(engine) == []
    assert installation.stats()["outbox_rows_written"] == 2  # the seed and the update


def test_a_rolled_back_savepoint_leaves_no_keys_and_a_released_one_does(
    engine: Engine, with_outbox: Callable[..., Any]
) -> None:
    factory, _ = with_outbox()
    seed_user(factory, engine)
    with factory.begin() as s:
        sp = s.begin_nested()
        invalidate_on_commit(s, "dropped:1")
        sp.rollback()
        sp = s.begin_nested()
        invalidate_on_commit(s, "kept:1")
        sp.commit()
    assert [set(keys) for _, _, keys in rows(engine)] == [{"kept:1"}]

    with engine.begin() as conn:
        conn.execute(delete(OUTBOX))
    with factory.begin() as s:  # only a rolled-back savepoint: nothing to publish, no row
        sp = s.begin_nested()
        s.get(User, 1).name = "x"
        s.flush()
        sp.rollback()
    assert rows(engine) == []


def test_keys_found_by_the_flush_inside_commit_are_in_the_row(
    engine: Engine, with_outbox: Callable[..., Any]
) -> None:
    """Session.commit() flushes *after* before_commit: a change made by a before_commit
    listener that runs after ours is flushed then, and its keys must be in the row."""
    factory, _ = with_outbox()
    seed_user(factory, engine)
    seed_user(factory, engine, 2)

    def late_change(session: Session) -> None:
        if session.get_nested_transaction() is None:
            user = session.get(User, 2)
            if user is not None and user.name != "late":
                user.name = "late"

    event.listen(TrackedSession, "before_commit", late_change)
    try:
        with factory.begin() as s:
            s.get(User, 1).name = "first"
    finally:
        event.remove(TrackedSession, "before_commit", late_change)
    assert [set(keys) for _, _, keys in rows(engine)] == [
        {"user:1", "user_by_email:u1@x", "user:2", "user_by_email:u2@x"}
    ]


def test_a_transaction_with_keys_but_no_statement_still_writes_its_row(
    engine: Engine, with_outbox: Callable[..., Any]
) -> None:
    factory, _ = with_outbox()
    with factory.begin() as s:
        invalidate_on_commit(s, "report:9")
    assert [keys for _, _, keys in rows(engine)] == [["report:9"]]


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_a_joined_session_writes_its_row_in_the_outer_transaction(
    engine: Engine, with_outbox: Callable[..., Any], outcome: str
) -> None:
    factory, _ = with_outbox()
    seed_user(factory, engine)
    with engine.connect() as conn:
        outer = conn.begin()
        s = factory(bind=conn, join_transaction_mode="create_savepoint")
        s.get(User, 1).name = "joined"
        s.commit()
        s.close()
        assert rows(engine) == []  # nothing is committed yet, the row neither
        getattr(outer, outcome)()
    found = [set(keys) for _, _, keys in rows(engine)]
    assert found == ([{"user:1", "user_by_email:u1@x"}] if outcome == "commit" else [])


def test_published_rows_are_deleted_off_the_commit_path(
    engine: Engine, with_outbox: Callable[..., Any]
) -> None:
    factory, installation = with_outbox(Outbox(relay=False, interval=0.05))
    seed_user(factory, engine)
    for i in range(5):
        with factory.begin() as s:
            s.get(User, 1).name = f"n{i}"
    deadline = time.monotonic() + 30
    while rows(engine) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rows(engine) == []
    stats = installation.stats()
    assert stats["outbox_rows_written"] == 6 and stats["outbox_rows_deleted"] == 6  # with the seed
    assert stats["relay_rows_published"] == 0  # its own publishes went out at commit


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(0.01)
    return time.monotonic() - started


def reader_holds_old_value(cache: HybridCache, factory: sessionmaker[Any]) -> None:
    def load() -> str:
        with factory() as s:
            return str(s.get(User, 1).name)

    with factory() as s:
        assert cached(s, cache).get_or_set("user:1", load) == "old"
    assert cache.get_local("user:1") == "old"  # in L1, and in L2


@pytest.mark.slow
@pytest.mark.parametrize("cut_redis", [False, True], ids=["killed-in-publish", "redis-cut"])
def test_a_writer_killed_after_commit_is_invalidated_by_a_relay_elsewhere(
    db: DbSpec,
    engine: Engine,
    cache: HybridCache,
    redis_url: str,
    with_outbox: Callable[..., Any],
    proxy_factory: Callable[[str, int], TcpProxy],
    cut_redis: bool,
) -> None:
    """The writer's COMMIT reaches the database, then the process is SIGKILLed before Redis
    took the keys: inside the publish, or after a publish that failed on a cut link (queued in
    memory, which dies with it). This process holds the old value in L1 and L2, and runs a
    relay: it must stop serving the old value, everywhere, once the row is relayed."""
    factory, installation = with_outbox(Outbox(grace=0.5, interval=0.1))
    seed_user(factory, engine)
    reader_holds_old_value(cache, factory)
    writer_url = redis_url
    proxy = None
    if cut_redis:
        host, port = redis_url.split("//")[1].split("/")[0].rsplit(":", 1)
        proxy = proxy_factory(host, int(port))
        writer_url = proxy.url_for(int(redis_url.rsplit("/", 1)[1]))
    ours, theirs = ctx.Pipe()
    writer = ctx.Process(
        target=outbox_writer,
        args=(writer_url, cache.namespace, db, 1, "new", True, cut_redis, theirs),
    )
    writer.start()
    try:
        assert ours.poll(30) and ours.recv() == "ready"
        if proxy is not None:
            proxy.refuse()
            proxy.cut()
            ours.send("cut")
            assert ours.poll(30) and ours.recv() == ("published", False)
            writer.kill()
        writer.join(30)
        assert writer.exitcode == -9
        with engine.connect() as conn:  # committed, with its row
            assert conn.execute(select(User.name).where(User.id == 1)).scalar_one() == "new"
        if proxy is not None:
            proxy.accept_again()
        took = wait_until(lambda: cache.get_local("user:1") is None)
        assert cache.l2.get("user:1") == (None, None)  # gone from L2 too
        with factory() as s:
            assert cached(s, cache).get_or_set("user:1", lambda: "reloaded") == "reloaded"
        wait_until(lambda: rows(engine) == [])
        assert installation.stats()["relay_rows_published"] == 1
        logging.getLogger(__name__).info("relayed %.3f s after the writer died", took)
    finally:
        if writer.is_alive():
            writer.kill()


def test_while_redis_is_down_rows_wait_then_go_out_oldest_first_one_round_trip_a_batch(
    engine: Engine, redis_server_factory: Callable[..., RedisServer], namespace: str
) -> None:
    server = redis_server_factory()
    cache = HybridCache.from_url(server.url, namespace=namespace)
    try:
        assert cache.wait_until_subscribed(10)
        with engine.begin() as conn:
            for i in range(25):
                write_rows(conn, OUTBOX, [(namespace, [f"k:{i}", f"k:{i}:b"])])
        sent = record_invalidations(cache)
        relay = OutboxRelay(engine, OUTBOX, cache, grace=0.0, batch=10)
        server.stop()
        assert relay.run_once() == 0
        stats = relay.stats()
        assert stats["relay_failures"] == 1 and stats["outbox_backlog"] == 25
        assert len(rows(engine)) == 25 and sent == []
        server.start()
        assert relay.run_once() == 25
        assert [len(batch) for batch in sent] == [20, 20, 10]  # 10 rows (2 keys each) a trip
        order = [int(k.split(":")[1]) for batch in sent for k in batch if not k.endswith("b")]
        assert order == list(range(25))  # oldest first
        assert rows(engine) == []
    finally:
        cache.close()


@pytest.mark.slow
def test_two_relays_never_publish_one_row_twice(
    db: DbSpec, engine: Engine, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    n = 1000
    with engine.begin() as conn:
        for i in range(n):
            write_rows(conn, OUTBOX, [(namespace, [f"row:{i}"])])
    go = ctx.Event()
    outs = [str(tmp_path / f"relay{i}.json") for i in range(2)]
    ready = [ctx.Event() for _ in outs]
    procs = [
        ctx.Process(target=outbox_relay, args=(redis_url, namespace, db, 5, r, go, out))
        for r, out in zip(ready, outs, strict=True)
    ]
    for p in procs:
        p.start()
    assert all(r.wait(60) for r in ready)
    go.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    published = [
        [key for batch in json.loads(Path(out).read_text()) for key in batch] for out in outs
    ]
    both = published[0] + published[1]
    assert sorted(both) == sorted(f"row:{i}" for i in range(n))  # each exactly once
    if db.kind == "postgresql":
        # SKIP LOCKED shares the rows out. (On SQLite the relay that holds the write lock tends
        # to take it again before the other's busy handler polls, so one may do all the work:
        # still one at a time, which is what the lock is for.)
        assert all(published), "one relay did all the work: the race did not happen"
    assert rows(engine) == []


def test_a_row_that_cannot_be_relayed_stays_and_is_counted(
    engine: Engine, cache: HybridCache, caplog: pytest.LogCaptureFixture
) -> None:
    with engine.begin() as conn:
        conn.execute(
            OUTBOX.insert().values(namespace=cache.namespace, keys="not json", created_at=0.0)
        )
        conn.execute(OUTBOX.insert().values(namespace=cache.namespace, keys='[""]', created_at=0))
        write_rows(conn, OUTBOX, [(cache.namespace, ["fine:1"])])
    relay = OutboxRelay(engine, OUTBOX, cache, grace=0.0)
    with caplog.at_level(logging.ERROR, "hybridinval.sqlalchemy"):
        assert relay.run_once() == 1
        assert relay.run_once() == 0  # not retried in a loop
    assert relay.stats()["relay_bad_rows"] == 2
    assert sorted(raw for _, _, raw in _raw_rows(engine)) == ['[""]', "not json"]
    assert sum("cannot be relayed and stays in place" in r.message for r in caplog.records) == 2


def _raw_rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(OUTBOX.c.id, OUTBOX.c.namespace, OUTBOX.c["keys"])))


def test_outbox_options_are_checked(engine: Engine, cache: HybridCache) -> None:
    with pytest.raises(ValueError, match="grace"):
        Outbox(grace=-1)
    with pytest.raises(ValueError, match="interval"):
        Outbox(interval=0)
    with pytest.raises(ValueError, match="batch"):
        Outbox(batch=0)
    with pytest.raises(TypeError, match="outbox"):
        install(sessionmaker(engine, class_=TrackedSession), cache, outbox="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no bind"):
        install(TrackedSession, cache, outbox=True)
    unbound = install(TrackedSession, cache, outbox=Outbox(relay=engine))
    unbound.uninstall()


def test_an_async_engine_cannot_run_the_relay(cache: HybridCache, tmp_path: Path) -> None:
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    factory = async_sessionmaker(engine, sync_session_class=TrackedSession)
    with pytest.raises(ValueError, match="synchronous Engine"):
        install(factory, cache, outbox=True)
    sync = create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    install(factory, cache, outbox=Outbox(relay=sync)).uninstall()
    with pytest.raises(ValueError, match="synchronous Engine"):
        install(factory, cache, outbox=Outbox(relay=engine.sync_engine))


def test_the_database_clock_orders_rows(engine: Engine) -> None:
    with engine.begin() as conn:
        write_rows(conn, OUTBOX, [("ns", ["a"])])
        (created,) = conn.execute(select(OUTBOX.c.created_at)).one()
    assert abs(created - time.time()) < 60  # seconds since the epoch, on the database's clock


@pytest.mark.slow
def test_the_relay_command_relays_and_stops_cleanly_on_sigterm(
    db: DbSpec, engine: Engine, cache: HybridCache, redis_url: str
) -> None:
    import signal
    import subprocess
    import sys

    with engine.begin() as conn:
        write_rows(conn, OUTBOX, [(cache.namespace, ["user:7"])])
    cache.set("user:7", "old")
    assert cache.get_local("user:7") == "old"
    command = [sys.executable, "-m", "hybridinval.cli", "relay", "--namespace", cache.namespace]
    command += ["--database-url", db.url, "--redis-url", redis_url, "--grace", "0"]
    command += ["--interval", "0.1", *(["--schema", db.schema] if db.schema else [])]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: cache.get_local("user:7") is None)
        wait_until(lambda: rows(engine) == [])
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "1 row(s) republished" in out


def test_the_relay_command_names_what_is_missing() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "hybridinval.cli", "relay", "--namespace", "x"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode != 0
    assert "--database-url (or $HYBRIDINVAL_DATABASE_URL) is required" in done.stderr


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)  # SQLite has one write lock
def test_a_relay_holding_rows_never_blocks_a_commit(
    engine: Engine, cache: HybridCache, with_outbox: Callable[..., Any]
) -> None:
    """While a relay has due rows locked (mid-publish), commits go on: they only insert."""
    factory, _ = with_outbox()
    seed_user(factory, engine)
    with engine.begin() as conn:
        write_rows(conn, OUTBOX, [(cache.namespace, ["old:1"])])
    holding, release = threading.Event(), threading.Event()
    invalidate = cache.invalidate_many

    def slow_publish(keys: Any) -> None:
        holding.set()
        assert release.wait(30)
        invalidate(keys)

    relay = OutboxRelay(engine, OUTBOX, cache, grace=0.0)
    relay.cache = _Proxy(cache, invalidate_many=slow_publish)  # type: ignore[assignment]
    done: list[int] = []
    thread = threading.Thread(target=lambda: done.append(relay.run_once()))
    thread.start()
    try:
        assert holding.wait(30)  # the relay holds its row FOR UPDATE now
        for i in range(3):
            with factory.begin() as s:
                s.get(User, 1).name = f"during {i}"
    finally:
        release.set()
        thread.join(30)
    assert done == [1]


class _Proxy:
    def __init__(self, target: Any, **overrides: Any) -> None:
        self._target = target
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_a_forked_child_runs_its_own_relay_and_never_touches_the_parents_connection(
    db: DbSpec, engine: Engine, cache: HybridCache
) -> None:
    """gunicorn --preload: the parent's relay is mid-pass (its connection checked out, its
    row locked) when the worker forks. The child gets a relay thread of its own that relays
    new rows; the parent's pass completes on its connection."""
    import os

    with engine.begin() as conn:
        write_rows(conn, OUTBOX, [(cache.namespace, ["parent:1"])])
    holding, release = threading.Event(), threading.Event()
    invalidate = cache.invalidate_many

    def slow_publish(keys: Any) -> None:
        if "parent:1" in keys:
            holding.set()
            release.wait(30)
        invalidate(keys)

    relay = OutboxRelay(engine, OUTBOX, cache, grace=0.0, interval=0.05)
    relay.cache = _Proxy(cache, invalidate_many=slow_publish)  # type: ignore[assignment]
    relay.start()
    try:
        assert holding.wait(30)
        held = set(relay._checked_out)
        assert held
        parent_pool = relay.engine.pool
        pid = os.fork()
        if pid == 0:  # the child: report through the exit status only
            code = 1
            try:
                # No engine.dispose() here: the relay must not rely on the application doing
                # it first. Its pool is its own, and new in this process.
                ok = relay.running and not relay._checked_out
                ok = ok and relay.engine.pool is not parent_pool
                ok = ok and relay.engine.pool is not engine.pool
                mine = db.engine()  # this test's own reads and writes, on new connections
                with mine.begin() as conn:
                    write_rows(conn, OUTBOX, [(cache.namespace, ["child:1"])])
                deadline = time.monotonic() + 20
                while ok and time.monotonic() < deadline:
                    with mine.connect() as conn:
                        keys = [r[0] for r in conn.execute(select(OUTBOX.c["keys"]))]
                    if '["child:1"]' not in keys:
                        code = 0 if relay.stats()["relay_rows_published"] == 1 else 2
                        break
                    time.sleep(0.02)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert relay._checked_out == held  # the parent's pass still holds its own connection
    finally:
        release.set()
    wait_until(lambda: rows(engine) == [])
    relay.stop()
    assert relay.stats()["relay_rows_published"] >= 1


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)  # SQLite has no two-phase
def test_a_two_phase_commit_is_refused_rather_than_made_without_its_row(
    engine: Engine, cache: HybridCache, with_outbox: Callable[..., Any]
) -> None:
    factory, _ = with_outbox()
    seed_user(factory, engine)
    s = factory(twophase=True)
    s.get(User, 1).name = "two-phase"
    with pytest.raises(OutboxError, match="two-phase"):
        s.commit()  # refused before the PREPARE: the row would have to precede it
    s.rollback()
    s.close()
    with engine.connect() as conn:
        assert conn.execute(select(User.name).where(User.id == 1)).scalar_one() == "old"
    assert rows(engine) == []


def test_a_commit_whose_row_has_no_bind_is_refused(
    engine: Engine, cache: HybridCache, with_outbox: Callable[..., Any]
) -> None:
    factory, _ = with_outbox()
    seed_user(factory, engine)
    # The session binds only the mapped classes, so nothing says where the outbox is.
    s = factory(bind=None, binds={User: engine})
    s.get(User, 1).name = "unbound"
    with pytest.raises(OutboxError, match="has no bind in this session"):
        s.commit()
    s.rollback()
    s.close()
    with engine.connect() as conn:
        assert conn.execute(select(User.name).where(User.id == 1)).scalar_one() == "old"
    assert rows(engine) == []


def test_rows_are_deleted_from_the_database_they_were_written_to(
    engine: Engine, cache: HybridCache, tmp_path: Path, with_outbox: Callable[..., Any]
) -> None:
    """A session bound to another database than the relay's: its row is deleted there, and a
    row with the same id in the relay's database (a dead writer's) is left for the relay."""
    other = create_database("sqlite", str(tmp_path / "other.db")).engine()
    try:
        factory, installation = with_outbox(Outbox(interval=0.05, grace=3600))
        with engine.begin() as conn:  # a dead writer's row, not due for an hour
            (left_id,) = write_rows(conn, OUTBOX, [(cache.namespace, ["dead:1"])])
        with factory(bind=other) as s, s.begin():
            s.add(User(id=1, email="u1@x", name="elsewhere"))
        with other.connect() as conn:
            ids = [r[0] for r in conn.execute(select(OUTBOX.c.id))]
        assert ids  # written to the session's own database
        wait_until(lambda: _ids(other) == [])
        assert _ids(engine) == [left_id]
        assert installation.stats()["outbox_rows_deleted"] >= 1
    finally:
        other.dispose()


def _ids(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(select(OUTBOX.c.id))]


def test_ids_are_never_reused(engine: Engine) -> None:
    with engine.begin() as conn:
        first = write_rows(conn, OUTBOX, [("ns", ["a"]), ("ns", ["b"])])
        conn.execute(delete(OUTBOX))
        (again,) = write_rows(conn, OUTBOX, [("ns", ["c"])])
    assert again > max(first)


def test_a_bad_row_an_operator_deleted_hides_no_good_row(
    engine: Engine, cache: HybridCache
) -> None:
    with engine.begin() as conn:
        conn.execute(OUTBOX.insert().values(namespace=cache.namespace, keys="bad", created_at=0))
    relay = OutboxRelay(engine, OUTBOX, cache, grace=0.0)
    assert relay.run_once() == 0 and relay.stats()["relay_bad_rows"] == 1
    with engine.begin() as conn:
        conn.execute(delete(OUTBOX))  # the operator's fix
        write_rows(conn, OUTBOX, [(cache.namespace, ["good:1"])])
    assert relay.run_once() == 1
    assert rows(engine) == []


def test_the_relay_takes_sqlites_write_lock_under_the_pysqlite_begin_recipe(
    cache: HybridCache, tmp_path: Path
) -> None:
    """SQLAlchemy's documented pysqlite recipe: the driver's own transaction handling off, and
    a ``begin`` listener that emits BEGIN. BEGIN IMMEDIATE would then fail in a transaction."""
    spec = create_database("sqlite", str(tmp_path / "recipe.db"))
    engine = create_engine(spec.url, isolation_level=None)

    @event.listens_for(engine, "begin")
    def do_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")

    try:
        with engine.begin() as conn:
            write_rows(conn, OUTBOX, [(cache.namespace, ["k:1"])])
        relay = OutboxRelay(engine, OUTBOX, cache, grace=0.0)
        assert relay.run_once() == 1
        assert relay.stats()["relay_failures"] == 0
        assert _ids(engine) == []
    finally:
        engine.dispose()
