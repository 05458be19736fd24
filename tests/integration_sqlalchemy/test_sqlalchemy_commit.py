"""When keys leave: only after the root COMMIT reached the database (never before commit), never on
flush, SAVEPOINT release or a joined session's "commit"; savepoint frames; a publish failure
after the commit (committed means published). Every test runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from support import RedisServer, TcpProxy
from support.inspect import entries
from support.sa_models import DbSpec, TrackedSession, User
from support.sa_spy import Publishes
from support.waiting import wait_until

from hybridinval import HybridCache
from hybridinval.sqlalchemy import (
    Installation,
    enqueue_on_commit,
    install,
    invalidate_on_commit,
    on_commit,
)

pytest_plugins = ["support.sa_fixtures"]  # db, engine, cache, Sessions, publishes


def seed(Sessions: sessionmaker[Any], publishes: Publishes, n: int = 3) -> None:
    with Sessions.begin() as s:
        s.add_all(User(id=i, email=f"u{i}@x") for i in range(1, n + 1))
    publishes.clear()


def keys_of(*ids: int) -> set[str]:
    return {k for i in ids for k in (f"user:{i}", f"user_by_email:u{i}@x")}


def test_nothing_is_published_at_flush(Sessions: sessionmaker[Any], publishes: Publishes) -> None:
    seed(Sessions, publishes)
    with Sessions() as s:
        s.get(User, 1).name = "x"
        s.flush()
        invalidate_on_commit(s, "report:1")
        s.execute(select(User)).all()  # autoflush, more SQL
        assert publishes.calls == []
        s.commit()
    assert len(publishes.calls) == 1 and set(publishes.calls[0]) == keys_of(1) | {"report:1"}


def test_savepoint_release_is_not_a_commit(
    Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    """SQLAlchemy fires after_commit on SAVEPOINT release: a naive hook would publish there."""
    seed(Sessions, publishes)
    naive: list[str] = []
    event.listen(Sessions, "after_commit", lambda s: naive.append("after_commit"))
    with Sessions() as s:
        with s.begin_nested():
            s.get(User, 1).name = "in savepoint"
        assert naive == ["after_commit"]  # what a naive after_commit publisher would act on
        assert publishes.calls == []  # ours: the rows are not committed for anyone else
        s.commit()
    assert publishes.calls == [["user:1", "user_by_email:u1@x"]]


def test_rolled_back_savepoints_drop_only_their_own_keys(
    Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    seed(Sessions, publishes, 5)
    with Sessions() as s:
        s.get(User, 1).name = "outer"
        s.flush()
        sp = s.begin_nested()
        s.get(User, 2).name = "rolled back"
        invalidate_on_commit(s, "report:2")
        s.flush()
        sp.rollback()
        with s.begin_nested():
            s.get(User, 3).name = "released"
            inner = s.begin_nested()
            s.get(User, 4).name = "inner rolled back"
            s.flush()
            inner.rollback()
        s.get(User, 5).name = "outer again"
        assert publishes.calls == []
        s.commit()
    assert len(publishes.calls) == 1
    assert set(publishes.calls[0]) == keys_of(1, 3, 5)


def test_a_failed_flush_inside_a_savepoint_keeps_the_outer_keys(
    Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    seed(Sessions, publishes, 2)
    with Sessions() as s:
        s.get(User, 1).name = "outer"
        s.flush()
        with pytest.raises(IntegrityError), s.begin_nested():
            s.get(User, 2).name = "lost"
            s.add(User(id=3, email="u1@x"))  # duplicate: the flush fails, the savepoint rolls back
        s.commit()
    assert publishes.calls == [["user:1", "user_by_email:u1@x"]]
    with Sessions() as s:
        assert s.get(User, 2).name == ""


# -- sessions joined to an outer connection-level transaction ----------------------------


@pytest.mark.parametrize("mode", ["conditional_savepoint", "create_savepoint", "rollback_only"])
def test_joined_session_publishes_when_the_outer_transaction_commits(
    engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes, mode: str
) -> None:
    seed(Sessions, publishes, 2)
    naive: list[str] = []
    event.listen(Sessions, "after_commit", lambda s: naive.append("after_commit"))
    seen_at_publish: list[str] = []
    publishes.before_each.append(lambda: seen_at_publish.append(committed_name(engine, 1)))

    with engine.connect() as conn:
        outer = conn.begin()
        s = Sessions(bind=conn, join_transaction_mode=mode)
        s.get(User, 1).name = "first"
        s.commit()  # not a commit: the connection's transaction goes on
        assert naive == ["after_commit"] and publishes.calls == []
        s.get(User, 2).name = "second"
        invalidate_on_commit(s, "report:1")
        s.commit()
        s.close()
        conn.execute(text("SELECT 1"))
        assert publishes.calls == []
        outer.commit()
    assert len(publishes.calls) == 1
    assert set(publishes.calls[0]) == keys_of(1, 2) | {"report:1"}
    assert seen_at_publish == ["first"]  # published after the COMMIT reached the database


@pytest.mark.parametrize("mode", ["conditional_savepoint", "create_savepoint", "rollback_only"])
def test_joined_session_publishes_nothing_when_the_outer_transaction_rolls_back(
    engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes, mode: str
) -> None:
    seed(Sessions, publishes, 1)
    with engine.connect() as conn:
        outer = conn.begin()
        with Sessions(bind=conn, join_transaction_mode=mode) as s:
            s.get(User, 1).name = "never"
            s.commit()
        outer.rollback()
        # The connection is reused: a later transaction of its own publishes only its keys.
        with conn.begin(), Sessions(bind=conn, join_transaction_mode=mode) as s:
            s.add(User(id=9, email="u9@x"))
            s.commit()
    assert publishes.calls == [["user:9", "user_by_email:u9@x"]]


def test_joined_session_in_control_publishes_at_its_own_commit(
    engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    seed(Sessions, publishes, 1)
    with engine.connect() as conn:
        conn.begin()
        with Sessions(bind=conn, join_transaction_mode="control_fully") as s:
            s.get(User, 1).name = "x"
            s.commit()  # commits the connection's transaction
            assert publishes.calls == [["user:1", "user_by_email:u1@x"]]


# -- ordering: the publish follows the database COMMIT -----------------------------------


def committed_name(engine: Engine, user_id: int) -> str:
    with engine.connect() as other:
        name: str = other.execute(select(User.name).where(User.id == user_id)).scalar_one()
        return name


def test_no_reader_can_cache_the_old_row_after_commit_returns(
    db: DbSpec,
    engine: Engine,
    Sessions: sessionmaker[Any],
    publishes: Publishes,
    redis_url: str,
    namespace: str,
) -> None:
    """Another process reads and caches the row at the worst moment: just before the database
    COMMIT. A publish at that moment (before_commit, or the connection's pre-COMMIT event)
    would leave it in L2 for good; ours comes after the COMMIT and removes it."""
    seed(Sessions, publishes, 1)
    reader = HybridCache.from_url(redis_url, namespace=namespace)
    reader_engine = db.engine()
    assert reader.wait_until_subscribed(10)
    stored: list[Any] = []

    def read_through_other_process(conn: Connection) -> None:
        if conn.get_transaction() is None or stored:
            return
        # (The writer's COMMIT is next; the reader sees the committed, old row.)
        stored.append(reader.get_or_set("user:1", lambda: committed_name(reader_engine, 1)))

    try:
        event.listen(engine, "commit", read_through_other_process)
        with Sessions.begin() as s:
            s.get(User, 1).name = "new"
        event.remove(engine, "commit", read_through_other_process)
        assert stored == [""]  # it did cache the old row, before our COMMIT
        assert reader.l2.get("user:1")[0] is None  # our publish came after, and removed it
        wait_until(lambda: "user:1" not in entries(reader), what="the reader's eviction")
        assert reader.get_or_set("user:1", lambda: committed_name(reader_engine, 1)) == "new"
    finally:
        reader.close()
        reader_engine.dispose()


# -- publish failure after commit --------------------------------------------------------


def test_publish_failure_after_commit_does_not_raise_and_is_retried(
    engine: Engine,
    redis_server: RedisServer,
    tcp_proxy: TcpProxy,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import redis

    cache = HybridCache.from_url(tcp_proxy.url_for(0), namespace=namespace, socket_timeout=0.5)
    direct = redis.Redis.from_url(redis_server.url)
    factory = sessionmaker(engine, class_=TrackedSession)
    installation = install(factory, cache)
    try:
        assert cache.wait_until_subscribed(10)
        with factory.begin() as s:
            s.add(User(id=1, email="a@x"))
        cache.get_or_set("user:1", lambda: "old row")
        cache.get_or_set("unrelated", lambda: "v")
        assert direct.get(f"hi:{namespace}:d:user:1") is not None
        assert "unrelated" in entries(cache)

        tcp_proxy.refuse()
        tcp_proxy.cut()
        with factory() as s:
            s.get(User, 1).name = "committed"
            s.commit()  # must not raise: the data is committed
        assert cache.stats()["publish_failures"] == 1
        # (0 while a retry attempt is in flight, so wait for a moment between attempts.)
        wait_until(lambda: cache.pending_retries() == 2, timeout=10, what="keys queued")
        assert "unrelated" not in entries(cache)  # L1 flushed: it may have missed messages
        assert any("retrying in the background" in r.getMessage() for r in caplog.records)
        assert direct.get(f"hi:{namespace}:d:user:1") is not None  # not delivered yet

        tcp_proxy.accept_again()
        wait_until(
            lambda: cache.stats()["publish_retries_succeeded"] >= 1, timeout=30, what="the retry"
        )
        assert cache.pending_retries() == 0
        assert direct.get(f"hi:{namespace}:d:user:1") is None
    finally:
        installation.uninstall()
        cache.close()
        direct.close()


def test_uninstall_stops_publishing(
    Sessions: sessionmaker[Any], installed: tuple[Any, Installation], publishes: Publishes
) -> None:
    seed(Sessions, publishes, 1)
    installed[1].uninstall()
    installed[1].uninstall()
    with Sessions.begin() as s:
        s.get(User, 1).name = "x"
    assert publishes.calls == []


def test_two_caches_installed_on_one_session_each_get_one_publish(
    engine: Engine,
    cache: HybridCache,
    publishes: Publishes,
    redis_url: str,
    namespace: str,
) -> None:
    second = HybridCache.from_url(redis_url, namespace=namespace + "-2")
    spy2 = Publishes(second)

    class Both(Session):
        pass

    factory = sessionmaker(engine, class_=Both)
    one, two = install(Both, cache), install(factory, second)
    try:
        with factory.begin() as s:
            s.add(User(id=1, email="a@x"))
    finally:
        one.uninstall()
        two.uninstall()
        second.close()
    assert publishes.calls == spy2.calls == [["user:1", "user_by_email:a@x"]]


def test_sessions_in_threads_keep_separate_frames(
    Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    seed(Sessions, publishes, 4)
    barrier = threading.Barrier(2)

    def work(i: int, commit: bool) -> None:
        with Sessions() as s:
            s.get(User, i).name = f"t{i}"
            invalidate_on_commit(s, f"report:{i}")
            barrier.wait()
            if commit:
                s.commit()
            else:
                s.rollback()

    threads = [
        threading.Thread(target=work, args=(1, True)),
        threading.Thread(target=work, args=(2, False)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [set(c) for c in publishes.calls] == [keys_of(1) | {"report:1"}]


def test_install_accepts_each_kind_of_factory(engine: Engine, cache: HybridCache) -> None:
    from sqlalchemy.orm import scoped_session

    class Mine(Session):
        pass

    maker = sessionmaker(engine, class_=Mine)
    scoped = scoped_session(sessionmaker(engine, class_=Mine))
    for target, expected in (
        (Mine, Mine),
        (maker, maker.class_),
        (scoped, scoped.session_factory.class_),
    ):
        installation = install(target, cache)
        assert installation.session_class is expected
        installation.uninstall()
    with pytest.raises(TypeError, match="sessionmaker"):
        install(engine, cache)


def test_a_connection_lost_during_commit_invalidates_anyway(
    postgres_url: str,
    cache: HybridCache,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """commit() raised because the connection died at COMMIT: the database may or may not have
    committed. The keys are published anyway (harmless if it did not). PostgreSQL only: it
    needs a server backend that another connection can terminate."""
    from sqlalchemy.exc import OperationalError
    from support.sa_models import create_database, drop_database

    db = create_database("postgresql", postgres_url)
    engine, killer = db.engine(), db.engine()
    factory = sessionmaker(engine, class_=TrackedSession)
    installation = install(factory, cache)
    publishes = Publishes(cache)
    pids: list[int] = []

    def kill_backend(conn: Connection) -> None:
        if pids:
            with killer.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pids.pop()})

    try:
        seed(factory, publishes, 1)
        with factory() as s:
            s.get(User, 1).name = "maybe"
            pids.append(s.execute(text("SELECT pg_backend_pid()")).scalar_one())
            event.listen(engine, "commit", kill_backend)
            with pytest.raises(OperationalError):
                s.commit()
            event.remove(engine, "commit", kill_backend)
    finally:
        installation.uninstall()
        engine.dispose()
        killer.dispose()
        drop_database(db)
    assert publishes.calls == [["user:1", "user_by_email:u1@x"]]
    assert any("outcome" in r.getMessage() for r in caplog.records)


# -- after-commit callbacks ----------------------------------------------------------------


def test_on_commit_runs_after_the_publish_and_follows_the_frames(
    Sessions: sessionmaker[Any], publishes: Publishes, cache: HybridCache
) -> None:
    seed(Sessions, publishes, 2)
    ran: list[tuple[str, int]] = []
    with Sessions() as s:
        s.get(User, 1).name = "x"
        on_commit(s, lambda: ran.append(("root", len(publishes.calls))))
        with s.begin_nested():
            on_commit(s, lambda: ran.append(("released savepoint", len(publishes.calls))))
        sp = s.begin_nested()
        on_commit(s, lambda: ran.append(("rolled-back savepoint", 0)))
        sp.rollback()
        assert ran == []
        s.commit()
    # Both ran once, in order, after the one publish; the rolled-back one never.
    assert ran == [("root", 1), ("released savepoint", 1)]

    ran.clear()
    with Sessions() as s:
        s.begin()
        on_commit(s, lambda: ran.append(("rolled back", 0)))
        s.rollback()
        s.begin()
        on_commit(s, lambda: ran.append(("nothing to publish", len(publishes.calls))))
        s.commit()  # no tracked change: still runs, after the (empty) publish
    assert ran == [("nothing to publish", 1)]


def test_a_failing_callback_does_not_fail_the_commit_or_the_others(
    Sessions: sessionmaker[Any],
    installed: tuple[Any, Installation],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []

    def boom() -> None:
        raise RuntimeError("broker down")

    with Sessions.begin() as s:
        s.add(User(id=1, email="a@x"))
        on_commit(s, boom)
        on_commit(s, lambda: ran.append("second"))
    assert ran == ["second"]
    assert installed[1].stats()["callback_failures"] == 1
    assert any("broker down" in (r.exc_text or "") or r.exc_info for r in caplog.records)
    with Sessions() as s:
        assert s.get(User, 1) is not None  # committed


class _Signature:
    """The part of a Celery signature enqueue_on_commit uses."""

    def __init__(self, cache: HybridCache, publishes: Publishes) -> None:
        self.sent: list[tuple[Any, ...]] = []
        self._cache, self._publishes = cache, publishes

    def apply_async(self, args: Any = None, kwargs: Any = None) -> str:
        # What the task would find: the writer's keys already invalidated.
        self.sent.append(
            (args, kwargs, len(self._publishes.calls), self._cache.l2.get("user:1")[0])
        )
        return "task-id"


def test_enqueue_on_commit_sends_after_invalidation_and_joined_outer_commit(
    engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes, cache: HybridCache
) -> None:
    seed(Sessions, publishes, 1)
    cache.get_or_set("user:1", lambda: "old")
    sig = _Signature(cache, publishes)
    with Sessions.begin() as s:
        s.get(User, 1).name = "x"
        enqueue_on_commit(s, sig, 1, mode="fast")
        enqueue_on_commit(s, sig)
        assert sig.sent == []
    assert sig.sent == [((1,), {"mode": "fast"}, 1, None), (None, None, 1, None)]

    sig.sent.clear()
    publishes.clear()
    with engine.connect() as conn:
        outer = conn.begin()
        with Sessions(bind=conn, join_transaction_mode="create_savepoint") as s:
            s.get(User, 1).name = "y"
            enqueue_on_commit(s, sig)
            s.commit()
        assert sig.sent == []  # the outer transaction can still roll back
        outer.commit()
    assert [sent[2] for sent in sig.sent] == [1]

    with pytest.raises(TypeError, match="apply_async"), Sessions.begin() as s:
        enqueue_on_commit(s, object())
