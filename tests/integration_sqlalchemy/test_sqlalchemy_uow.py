"""Which keys a unit of work yields, and how they leave: the ORM flush, bulk statements,
rollbacks, one round trip per commit, and bad input. Every test runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    create_engine,
    delete,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from support.inspect import entries
from support.sa_models import Address, Base, Item, Membership, Team, TrackedSession, User
from support.sa_spy import Publishes

from hybridinval import HybridCache, TransactionStateError
from hybridinval.sqlalchemy import install, invalidate_on_commit, track

pytest_plugins = ["support.sa_fixtures"]  # db, engine, cache, Sessions, publishes


def seed_users(Sessions: sessionmaker[Any], publishes: Publishes, n: int = 3) -> None:
    with Sessions.begin() as s:
        s.add_all(User(id=i, email=f"u{i}@x", name=f"n{i}") for i in range(1, n + 1))
    publishes.clear()


def user_keys(*ids_emails: tuple[int, str]) -> set[str]:
    return {k for i, e in ids_emails for k in (f"user:{i}", f"user_by_email:{e}")}


# -- keys from the ORM flush ---------------------------------------------------------------------


def test_insert_update_delete_each_publish_the_rows_keys(
    Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    with Sessions.begin() as s:
        s.add(User(email="a@x"))  # autoincrement id: known only after the INSERT
    assert publishes.calls == [["user:1", "user_by_email:a@x"]]

    publishes.clear()
    with Sessions.begin() as s:
        s.get(User, 1).name = "renamed"
    assert publishes.calls == [["user:1", "user_by_email:a@x"]]

    publishes.clear()
    with Sessions() as s:
        user = s.get(User, 1)
        s.commit()  # expires every attribute: the delete must load what its keys need
        s.delete(user)
        s.commit()
    assert publishes.calls == [["user:1", "user_by_email:a@x"]]


def test_changing_a_key_field_invalidates_the_old_and_the_new_key(
    Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    seed_users(Sessions, publishes, 2)
    with Sessions.begin() as s:
        s.get(User, 1).email = "new1@x"
    assert set(publishes.calls[0]) == user_keys((1, "u1@x"), (1, "new1@x"))

    # The old value never loaded: set while expired. Still known (read before the UPDATE).
    publishes.clear()
    with Sessions.begin() as s:
        user = s.get(User, 2)
        s.expire(user, ["email"])
        user.email = "new2@x"
    assert set(publishes.calls[0]) == user_keys((2, "u2@x"), (2, "new2@x"))


def test_untracked_models_publish_nothing(
    Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    with Sessions.begin() as s:
        s.add(Team(id=1, name="t"))
    with Sessions.begin() as s:
        s.get(Team, 1).name = "u"
    assert publishes.calls == []


def test_relationship_changes(Sessions: sessionmaker[Any], publishes: Publishes) -> None:
    """A foreign key is a column: moving a child invalidates the old and new parent's key.
    A parent made dirty by a collection change is invalidated too; orphans are deletes."""
    seed_users(Sessions, publishes, 2)
    with Sessions.begin() as s:
        s.add(Address(id=10, user_id=1, street="a"))
    assert set(publishes.calls[0]) == {"address:10", "user_addresses:1"}

    publishes.clear()
    with Sessions.begin() as s:
        s.get(Address, 10).user_id = 2
    assert set(publishes.calls[0]) == {"address:10", "user_addresses:1", "user_addresses:2"}

    publishes.clear()
    with Sessions.begin() as s:
        parent = s.get(User, 1)
        parent.addresses.append(Address(id=11, street="b"))
    assert set(publishes.calls[0]) == {"address:11", "user_addresses:1"} | user_keys((1, "u1@x"))

    publishes.clear()
    with Sessions() as s:
        user = s.get(User, 1)
        assert [a.id for a in user.addresses] == [11]
        s.commit()  # expire everything: the orphan's key fields are not loaded
        user.addresses.clear()  # delete-orphan
        s.commit()
    assert {"address:11", "user_addresses:1"} <= set(publishes.calls[0])

    publishes.clear()
    with Sessions() as s:
        s.delete(s.get(User, 2))  # cascades to address 10
        s.commit()
    assert set(publishes.calls[0]) == {"address:10", "user_addresses:2"} | user_keys((2, "u2@x"))


# -- rollback: nothing published, nothing left behind ---------------------------------------


def test_rollback_publishes_nothing_and_the_next_transaction_starts_clean(
    Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    seed_users(Sessions, publishes, 2)
    with Sessions() as s:
        s.get(User, 1).name = "x"
        invalidate_on_commit(s, "report:1")
        s.flush()
        s.rollback()
        assert publishes.calls == []
        s.get(User, 2).name = "y"
        s.commit()
    assert publishes.calls == [["user:2", "user_by_email:u2@x"]]


def test_integrity_error_at_flush_publishes_nothing(
    Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    seed_users(Sessions, publishes, 2)
    with Sessions() as s:
        s.get(User, 1).name = "changed before the failure"
        s.flush()
        s.add(User(id=3, email="u2@x"))  # duplicate email
        with pytest.raises(IntegrityError):
            s.flush()
        s.rollback()
        assert publishes.calls == []
        s.get(User, 2).name = "later"
        s.commit()
    assert publishes.calls == [["user:2", "user_by_email:u2@x"]]


def test_integrity_error_at_commit_publishes_nothing(
    Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    seed_users(Sessions, publishes, 1)
    with Sessions() as s:
        s.add(Membership(id=1, user_id=999))  # deferred FK: checked by COMMIT
        s.get(User, 1).name = "x"
        s.flush()
        with pytest.raises(IntegrityError):
            s.commit()
        s.rollback()
        assert publishes.calls == []
        s.add(Membership(id=2, user_id=1))
        s.commit()
    assert publishes.calls == [["membership:2"]]


# -- one round trip, read-your-writes --------------------------------------------------------


def test_one_publish_per_commit_and_own_l1_evicted_before_commit_returns(
    Sessions: sessionmaker[Any], publishes: Publishes, cache: HybridCache
) -> None:
    seed_users(Sessions, publishes, 50)
    for i in range(1, 51):
        assert cache.get_or_set(f"user:{i}", lambda i=i: {"id": i, "name": f"n{i}"})
    assert "user:7" in entries(cache)
    sent_before = cache.stats()["invalidations_sent"]

    with Sessions.begin() as s:
        for user in s.scalars(select(User)):
            user.name = "bulk"
        invalidate_on_commit(s, "report:1", "report:1")
    # commit() has returned: this process no longer holds any of it, in L1 or L2.
    assert len(publishes.calls) == 1
    assert set(publishes.calls[0]) == {f"user:{i}" for i in range(1, 51)} | {
        f"user_by_email:u{i}@x" for i in range(1, 51)
    } | {"report:1"}
    assert cache.stats()["invalidations_sent"] - sent_before == 1  # one message, one round trip
    assert not any(f"user:{i}" in entries(cache) for i in range(1, 51))
    assert cache.l2.get("user:7")[0] is None


# -- bulk statements ---------------------------------------------------------------------------


def test_bulk_update_publishes_old_and_new_keys_of_matched_rows(
    Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    seed_users(Sessions, publishes, 4)
    with Sessions.begin() as s:
        loaded = s.get(User, 1)
        result = s.execute(
            update(User).where(User.id <= 2).values(email=User.email + "z", name="bulk")
        )
        assert result.rowcount == 2
        assert loaded.name == "bulk"  # synchronize_session still works on the pinned statement
    assert set(publishes.calls[0]) == user_keys(
        (1, "u1@x"), (2, "u2@x"), (1, "u1@xz"), (2, "u2@xz")
    )
    with Sessions() as s:
        assert s.scalars(select(User.email).order_by(User.id)).all() == [
            "u1@xz",
            "u2@xz",
            "u3@x",
            "u4@x",
        ]


def test_bulk_update_without_key_changes_and_bulk_delete(
    Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    seed_users(Sessions, publishes, 4)
    with Sessions.begin() as s:
        s.execute(update(User).where(User.name.in_(["n3", "n4"])).values(name="q"))
    assert set(publishes.calls[0]) == user_keys((3, "u3@x"), (4, "u4@x"))

    publishes.clear()
    with Sessions.begin() as s:
        result = s.execute(delete(User).where(User.name == "q"))
        assert result.rowcount == 2
    assert set(publishes.calls[0]) == user_keys((3, "u3@x"), (4, "u4@x"))

    publishes.clear()
    with Sessions.begin() as s:
        s.execute(delete(User).where(User.name == "nobody"))
    assert publishes.calls == []


def test_bulk_update_by_primary_key(Sessions: sessionmaker[Any], publishes: Publishes) -> None:
    seed_users(Sessions, publishes, 3)
    with Sessions.begin() as s:
        s.execute(update(User), [{"id": 1, "email": "e1@x"}, {"id": 3, "name": "z"}])
    assert set(publishes.calls[0]) == user_keys((1, "u1@x"), (1, "e1@x"), (3, "u3@x"))


def test_bulk_insert_uses_the_parameter_rows_and_the_new_primary_keys(
    Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    with Sessions.begin() as s:
        s.execute(insert(User), [{"id": 5, "email": "a@x"}, {"id": 6, "email": "b@x"}])
        s.execute(insert(Item).values(id=1, value="v"))
    assert set(publishes.calls[0]) == user_keys((5, "a@x"), (6, "b@x")) | {"item:1"}

    # Autoincrement ids, which SQLAlchemy does not report for an executemany INSERT without
    # RETURNING: the new rows' keys (which may hold a cached "not found") are still published.
    publishes.clear()
    with Sessions.begin() as s:
        s.execute(insert(User), [{"email": "c@x"}, {"email": "d@x"}])
        s.execute(insert(User).values(email="e@x"))  # one row: its id is reported
    with Sessions() as s:  # PostgreSQL's sequence gives 1, 2, 3; SQLite 7, 8, 9
        rows = s.execute(select(User.id, User.email).where(User.id.not_in([5, 6]))).all()
    assert len(rows) == 3
    assert set(publishes.calls[0]) == user_keys(*((i, e) for i, e in rows))


def test_bulk_insert_with_returning_reads_the_keys_and_returns_the_rows(
    Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    with Sessions.begin() as s:
        rows = s.execute(
            insert(User).returning(User.id, User.email), [{"email": "c@x"}, {"email": "d@x"}]
        ).all()
    assert sorted(tuple(r) for r in rows) == [(1, "c@x"), (2, "d@x")]
    assert set(publishes.calls[0]) == user_keys((1, "c@x"), (2, "d@x"))


# -- bad input ---------------------------------------------------------------------------------


class _Base(DeclarativeBase):
    pass


class _Widget(_Base):
    __tablename__ = "hi_widgets"
    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str]


def test_track_rejects_templates_naming_missing_columns() -> None:
    with pytest.raises(ValueError, match=r"'widget:\{colour\}'.*'colour'.*_Widget.*id, label"):
        track(_Widget, keys=["widget:{id}", "widget:{colour}"])
    with pytest.raises(ValueError, match="placeholders must name a column"):
        track(_Widget, keys=["widget:{}"])
    with pytest.raises(ValueError, match="placeholders must name a column"):
        track(_Widget, keys=["widget:{id.real}"])
    with pytest.raises(ValueError, match="tags"):
        track(_Widget, keys=["widget:{id}"], tags=["widgets"])
    with pytest.raises(TypeError, match="list of templates"):
        track(_Widget, keys="widget:{id}")
    with pytest.raises(TypeError, match="not a mapped"):
        track(int, keys=["x"])


def test_invalidate_on_commit_bad_input(Sessions: sessionmaker[Any], publishes: Publishes) -> None:
    with Sessions() as s:
        with pytest.raises(TransactionStateError, match="no transaction"):
            invalidate_on_commit(s, "report:1")
        s.begin()
        with pytest.raises(TypeError, match="got int: 42"):
            invalidate_on_commit(s, "report:1", 42)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            invalidate_on_commit(s, "")
        s.commit()
    assert publishes.calls == []  # the valid key before the bad one was not half-added


def test_a_key_too_long_fails_the_flush_not_the_publish(
    engine: Engine, redis_url: str, namespace: str
) -> None:
    short = HybridCache.from_url(redis_url, namespace=namespace + "-short", max_key_length=16)
    spy = Publishes(short)
    factory = sessionmaker(engine, class_=TrackedSession)
    installation = install(factory, short)
    try:
        with factory() as s:
            s.add(User(id=1, email="a-rather-long-address@example.com"))
            with pytest.raises(ValueError, match="characters long"):
                s.commit()
            s.rollback()
            assert s.scalars(select(User)).all() == []
    finally:
        installation.uninstall()
        short.close()
    assert spy.calls == []


def test_sessions_of_other_factories_are_not_affected(
    engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    other = sessionmaker(engine)
    with other.begin() as s:
        s.add(User(id=1, email="a@x"))
    assert publishes.calls == []
    with other() as s, pytest.raises(Exception, match="not installed"):
        invalidate_on_commit(s, "k")


def _after_key_select(engine: Engine, run: Any) -> Any:
    """Call ``run()`` once, right after the first SELECT of ``hi_users`` (the bulk statement's
    key SELECT) on any connection; returns the listener to remove."""
    done: list[bool] = []

    def listener(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if not done and statement.lstrip().upper().startswith("SELECT") and "hi_users" in statement:
            done.append(True)
            run()

    event.listen(Connection, "after_cursor_execute", listener)
    return listener


def test_a_row_that_starts_matching_after_the_key_select_is_still_invalidated(
    db: Any, engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    """Right after the bulk statement's key SELECT, another connection makes user 3 match its
    WHERE and commits. SQLite: it cannot (the write lock is held from before the SELECT), so the
    statement changes users 1 and 2. PostgreSQL (READ COMMITTED): it can, and the UPDATE then
    changes user 3 too, exactly as without hybridinval; its keys were never selected, so they
    are found from the row count and read as committed."""
    from sqlalchemy.exc import OperationalError

    seed_users(Sessions, publishes, 3)
    with Sessions.begin() as s:
        s.get(User, 1).name = "target"
        s.get(User, 2).name = "target"
    publishes.clear()
    interloper = db.engine(connect_args={"timeout": 0.2}) if db.kind == "sqlite" else engine
    outcome: list[str] = []

    def interlope() -> None:
        try:
            with interloper.begin() as conn:
                conn.execute(update(User).where(User.id == 3).values(name="target"))
            outcome.append("committed")
        except OperationalError:
            outcome.append("locked out")

    listener = _after_key_select(engine, interlope)
    try:
        with Sessions() as s:
            s.begin()
            result = s.execute(
                update(User).where(User.name == "target").values(email=User.email + "z"),
                execution_options={"synchronize_session": False},
            )
            updated = result.rowcount
            s.commit()
    finally:
        event.remove(Connection, "after_cursor_execute", listener)
        if interloper is not engine:
            interloper.dispose()
    with Sessions() as s:
        emails = {i: e for i, e in s.execute(select(User.id, User.email))}
    expected = user_keys((1, "u1@x"), (2, "u2@x"), (1, "u1@xz"), (2, "u2@xz"))
    if db.kind == "sqlite":
        assert outcome == ["locked out"]
        assert updated == 2 and emails[3] == "u3@x"
    else:
        assert outcome == ["committed"]
        assert updated == 3 and emails[3] == "u3@xz"
        expected |= user_keys((3, "u3@x"), (3, "u3@xz"))
    assert publishes.keys == expected


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_a_selected_row_stays_locked_until_the_bulk_statement_commits(
    db: Any, engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    """The key SELECT locks what it read: another transaction that changes user 1's e-mail right
    after it waits for our COMMIT (PostgreSQL: FOR UPDATE; SQLite: the write lock), so the old
    e-mail published is the one the UPDATE really replaced."""
    import threading

    seed_users(Sessions, publishes, 2)
    blocked = threading.Event()
    errors: list[BaseException] = []
    backend: list[int] = []
    connected = threading.Event()

    def change_email() -> None:
        try:
            with engine.begin() as conn:
                backend.append(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
                connected.set()
                conn.execute(update(User).where(User.id == 1).values(email="other@x"))
        except BaseException as exc:
            errors.append(exc)
            connected.set()

    worker = threading.Thread(target=change_email)

    def start_and_wait_until_blocked() -> None:
        worker.start()
        connected.wait(10)
        with engine.connect() as probe:
            for _ in range(1000):
                if not backend or not worker.is_alive():
                    break
                waiting = probe.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = :pid "
                        "AND wait_event_type = 'Lock'"
                    ),
                    {"pid": backend[0]},
                ).scalar()
                if waiting:
                    blocked.set()
                    break
                worker.join(0.01)

    listener = _after_key_select(engine, start_and_wait_until_blocked)
    try:
        with Sessions.begin() as s:
            s.execute(
                update(User).where(User.id == 1).values(name="bulk"),
                execution_options={"synchronize_session": False},
            )
    finally:
        event.remove(Connection, "after_cursor_execute", listener)
        worker.join(10)
    assert not errors
    assert blocked.is_set(), "the row selected for its keys was not locked"
    assert publishes.calls[0] == ["user:1", "user_by_email:u1@x"]


def test_a_chained_executemany_on_a_single_connection_pool_keeps_its_transaction(
    cache: HybridCache,
) -> None:
    """An executemany UPDATE whose later parameter sets match rows an earlier one changed
    reports more rows than its key SELECTs locked, as a concurrent commit would. On a pool that
    hands out one connection (SQLite ``:memory:``) no second connection may be used to read
    committed rows: it would be this one, and returning it to the pool rolled the session's
    transaction back."""
    engine = create_engine("sqlite://")  # SingletonThreadPool
    Base.metadata.create_all(engine)
    Sessions = sessionmaker(engine, class_=TrackedSession)
    installation = install(Sessions, cache)
    publishes = Publishes(cache)
    try:
        with Sessions.begin() as s:
            s.add_all([User(id=1, email="a@x", name="n1"), User(id=2, email="b@x", name="n2")])
        publishes.clear()
        with Sessions() as s:
            result = s.execute(
                update(User).where(User.name == bindparam("old")).values(name=bindparam("new")),
                [{"old": "n1", "new": "n2"}, {"old": "n2", "new": "n3"}],
                execution_options={"synchronize_session": False, "dml_strategy": "core_only"},
            )
            assert result.rowcount == 3  # type: ignore[attr-defined]
            assert s.in_transaction()
            s.commit()
        with Sessions() as s:
            assert s.execute(select(User.id, User.name).order_by(User.id)).all() == [
                (1, "n3"),
                (2, "n3"),
            ]
        assert publishes.keys == user_keys((1, "a@x"), (2, "b@x"))
    finally:
        installation.uninstall()
        engine.dispose()


def test_an_expired_object_is_keyed_by_its_identity_without_a_query(
    engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    """``item:{id}`` of an object expired by commit() comes from its identity: deleting and
    updating it emit exactly the statements SQLAlchemy emits without hybridinval."""

    def statements(factory: sessionmaker[Any], item_id: int) -> list[str]:
        with factory.begin() as s:
            s.add(Item(id=item_id, value="v"))
        seen: list[str] = []

        def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            seen.append(statement.split()[0])

        event.listen(engine, "before_cursor_execute", record)
        try:
            with factory() as s:
                item = s.get(Item, item_id)
                s.commit()  # expires it
                item.value = "w"
                s.commit()
                s.delete(item)
                s.commit()
        finally:
            event.remove(engine, "before_cursor_execute", record)
        return seen

    plain = statements(sessionmaker(engine), 1)
    publishes.clear()
    assert statements(Sessions, 2) == plain
    assert publishes.calls == [["item:2"]] * 3  # insert, update, delete


def test_track_puts_back_flush_listeners_that_were_cleared(
    Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    """Test suites clear ORM listeners globally between tests (SQLAlchemy's own does); the next
    track() must bring hybridinval's back, or nothing would be invalidated from then on."""
    from sqlalchemy.orm import Mapper

    Mapper.dispatch._clear()  # type: ignore[call-arg]
    track(Item, keys=["item:{id}"])
    with Sessions.begin() as s:
        s.add(Item(id=1, value="v"))
    assert publishes.calls == [["item:1"]]


# -- statements whose keys must be read with care (found by review) --------------------------


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_a_data_modifying_cte_in_the_where_runs_once(
    Sessions: sessionmaker[Any], publishes: Publishes, caplog: pytest.LogCaptureFixture
) -> None:
    """The key SELECT reuses the statement's WHERE: with a CTE that INSERTs, that would insert
    twice. Such a statement is left unread, and says so."""
    seed_users(Sessions, publishes, 1)
    with Sessions.begin() as s:
        cte = insert(Team).values(id=1, name="t").returning(Team.id).cte("added")
        s.execute(update(User).where(User.id.in_(select(cte.c.id))).values(name="via cte"))
    with Sessions() as s:
        assert s.scalars(select(Team.id)).all() == [1]
        assert s.get(User, 1).name == "via cte"
    assert "data-modifying CTE" in caplog.text


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_the_key_select_locks_no_more_than_the_update_would(
    engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    """An UPDATE of no key column takes FOR NO KEY UPDATE in PostgreSQL, which lets another
    transaction insert a row referencing it (its FOR KEY SHARE check passes); the key SELECT
    must not take the stronger FOR UPDATE."""
    seed_users(Sessions, publishes, 1)
    with Sessions.begin() as s:
        s.execute(update(User).where(User.id == 1).values(name="busy"))
        with engine.connect() as other:
            other.exec_driver_sql("SET lock_timeout = '2s'")
            other.execute(insert(Address).values(id=1, user_id=1))  # raises if blocked
            other.rollback()
    assert publishes.keys == user_keys((1, "u1@x"))


def test_multi_values_and_from_select_inserts_publish_their_rows_keys(
    Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    with Sessions.begin() as s:
        s.execute(insert(User).values([{"id": 1, "email": "a@x"}, {"id": 2, "email": "b@x"}]))
    assert set(publishes.calls[0]) == user_keys((1, "a@x"), (2, "b@x"))
    publishes.clear()
    with Sessions.begin() as s:
        source = select(User.id + 10, User.email + "!", User.name)
        s.execute(insert(User).from_select(["id", "email", "name"], source))
    assert set(publishes.calls[0]) == user_keys((11, "a@x!"), (12, "b@x!"))


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_a_full_pool_never_fails_a_statement_that_has_run(
    db: Any, cache: HybridCache, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows that matched late are read on a second connection; with the pool exhausted that read
    fails, and the statement (already executed) must still return as without hybridinval."""
    small = db.engine(pool_size=1, max_overflow=0, pool_timeout=0.3)
    interloper = db.engine()
    Sessions = sessionmaker(small, class_=TrackedSession)
    installation = install(Sessions, cache)

    def interlope() -> None:
        with interloper.begin() as conn:
            conn.execute(update(User).where(User.id == 2).values(name="target"))

    try:
        with Sessions.begin() as s:
            s.add_all([User(id=1, email="a@x", name="target"), User(id=2, email="b@x")])
        listener = _after_key_select(small, interlope)
        try:
            with Sessions.begin() as s:
                result = s.execute(
                    update(User).where(User.name == "target").values(name="done"),
                    execution_options={"synchronize_session": False},
                )
                assert result.rowcount == 2  # type: ignore[attr-defined]
        finally:
            event.remove(Connection, "after_cursor_execute", listener)
        assert "matched late failed" in caplog.text
        with Sessions() as s:
            assert s.scalars(select(User.name).order_by(User.id)).all() == ["done", "done"]
    finally:
        installation.uninstall()
        small.dispose()
        interloper.dispose()
