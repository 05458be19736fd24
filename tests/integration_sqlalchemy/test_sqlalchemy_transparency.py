"""Transparency: an installed session does exactly what SQLAlchemy does without hybridinval
(same rows changed, same rowcount, same results, same exceptions) and publishes the keys of the
rows SQLAlchemy really changed. Regression tests for a bug report on SQLAlchemy 2.1.

Most tests run one program twice on the same seeded database: first on a plain, uninstalled
``sessionmaker(engine)`` (the expectation), then on the installed ``Sessions``, and compare
the outcome and the tables; then they check ``publishes``.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock, Mock

import pytest
from sqlalchemy import (
    Engine,
    Integer,
    String,
    bindparam,
    create_engine,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.horizontal_shard import ShardedSession, set_shard_id
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    ORMExecuteState,
    Session,
    aliased,
    mapped_column,
    registry,
    sessionmaker,
)
from support.sa_models import Address, Base, DbSpec, TrackedSession, User
from support.sa_spy import Publishes
from support.sa_transparency_models import Nick, Owner, Pet, TBase, Toy

from hybridinval import HybridCache
from hybridinval.sqlalchemy import install, track, untrack

pytest_plugins = ["support.sa_fixtures"]  # db, engine, cache, Sessions, publishes

Program = Callable[[sessionmaker[Any]], Any]
USERS = [{"id": i, "email": f"u{i}@x", "name": f"n{i}"} for i in (1, 2, 3)]
ADDRESSES = [{"id": 10, "user_id": 1}, {"id": 11, "user_id": 2}]  # user 3 can be deleted
TABLES = [*reversed(Base.metadata.sorted_tables), *reversed(TBase.metadata.sorted_tables)]


def user_keys(*ids_emails: tuple[int, str]) -> set[str]:
    return {k for i, e in ids_emails for k in (f"user:{i}", f"user_by_email:{e}")}


# Runs the test on PostgreSQL alone (the ``db`` fixture's other parameter is SQLite).
postgresql_only = pytest.mark.parametrize("db", ["postgresql"], indirect=True)


def reset(db: DbSpec, engine: Engine, *, seeded: bool = True) -> None:
    """Empty every table (PostgreSQL: and restart the id sequences), then seed the users and
    addresses with Core (nothing goes through a session, nothing is published)."""
    with engine.begin() as conn:
        TBase.metadata.create_all(conn)
        if db.kind == "postgresql":
            names = ", ".join(f'"{db.schema}".{t.name}' for t in TABLES)
            conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
        else:
            for table in TABLES:
                conn.execute(table.delete())
        if seeded:
            conn.execute(insert(User), USERS)
            conn.execute(insert(Address), ADDRESSES)


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    with engine.connect() as conn:
        return {t.name: sorted(tuple(r) for r in conn.execute(select(t))) for t in TABLES}


def outcome(program: Program, factory: sessionmaker[Any], engine: Engine) -> tuple[Any, ...]:
    try:
        result: Any = ("returned", program(factory))
    except Exception as exc:  # compared with what plain SQLAlchemy raises
        result = ("raised", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    return (*result, snapshot(engine))


def same_as_plain(
    db: DbSpec,
    engine: Engine,
    Sessions: sessionmaker[Any],
    publishes: Publishes,
    program: Program,
    *,
    seeded: bool = True,
    plain: sessionmaker[Any] | None = None,
) -> Any:
    """Run ``program`` on a plain factory, then on ``Sessions``, from the same seed: the
    outcomes (result or exception, and the tables after) must be equal. Returns the result."""
    reset(db, engine, seeded=seeded)
    expected = outcome(program, plain or sessionmaker(engine), engine)
    reset(db, engine, seeded=seeded)
    publishes.clear()
    actual = outcome(program, Sessions, engine)
    assert actual == expected
    return expected[1]


@contextmanager
def installed_on(factory: sessionmaker[Any], cache: HybridCache) -> Iterator[sessionmaker[Any]]:
    installation = install(factory, cache)
    try:
        yield factory
    finally:
        installation.uninstall()


def committed(statement: Any, **execution_options: Any) -> Program:
    """A program: execute ``statement`` in a new session, commit, return the rowcount."""

    def program(S: sessionmaker[Any]) -> Any:
        with S() as s:
            rowcount = s.execute(statement, execution_options=execution_options).rowcount
            s.commit()
            return rowcount

    return program


# -- 1. autoflush: pending changes are written before the statement matches rows ----------------

SYNC = ["auto", "fetch", "evaluate", False]


@pytest.mark.parametrize("sync", SYNC)
def test_bulk_update_matches_a_pending_change_that_autoflush_writes_first(
    db: DbSpec, engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes, sync: Any
) -> None:
    def program(S: sessionmaker[Any]) -> Any:
        with S() as s:
            loaded = s.get(User, 1)
            loaded.name = "j2"  # unflushed: the UPDATE's autoflush writes it first
            result = s.execute(
                update(User).where(User.name == "j2").values(email="j2@x"),
                execution_options={"synchronize_session": sync},
            )
            s.commit()
            return result.rowcount

    assert same_as_plain(db, engine, Sessions, publishes, program) == 1
    assert publishes.keys == user_keys((1, "u1@x"), (1, "j2@x"))


@pytest.mark.parametrize("sync", SYNC)
def test_bulk_delete_matches_a_pending_change_that_autoflush_writes_first(
    db: DbSpec, engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes, sync: Any
) -> None:
    def program(S: sessionmaker[Any]) -> Any:
        with S() as s:
            s.get(User, 3).name = "j3"
            result = s.execute(
                delete(User).where(User.name == "j3"),
                execution_options={"synchronize_session": sync},
            )
            s.commit()
            return result.rowcount

    assert same_as_plain(db, engine, Sessions, publishes, program) == 1
    assert publishes.keys == user_keys((3, "u3@x"))


# -- 2. a user's do_orm_execute hook that retargets the statement -------------------------------


def _retarget_statement(state: ORMExecuteState) -> None:
    if state.is_update and state.bind_mapper is User.__mapper__:
        state.statement = update(User).where(User.id == 2).values(name="hooked")
    return None


def _retarget_params(state: ORMExecuteState) -> Any:
    params = state.parameters
    if state.is_update and isinstance(params, dict) and params.get("target") == 1:
        return state.invoke_statement(params={"target": 2})
    return None


@pytest.mark.parametrize("hook", [_retarget_statement, _retarget_params])
@pytest.mark.parametrize("order", ["hook_before_install", "hook_after_install"])
def test_a_user_hook_that_retargets_the_update_decides_the_rows_and_keys(
    db: DbSpec,
    engine: Engine,
    cache: HybridCache,
    publishes: Publishes,
    hook: Callable[[ORMExecuteState], Any],
    order: str,
) -> None:
    from sqlalchemy import event

    class PlainHooked(Session):
        pass

    class Hooked(Session):
        pass

    event.listen(PlainHooked, "do_orm_execute", hook)
    factory: sessionmaker[Any] = sessionmaker(engine, class_=Hooked)
    if order == "hook_before_install":
        event.listen(Hooked, "do_orm_execute", hook)
    with installed_on(factory, cache):
        if order == "hook_after_install":
            event.listen(Hooked, "do_orm_execute", hook)

        def program(S: sessionmaker[Any]) -> Any:
            with S() as s:
                stmt = update(User).where(User.id == bindparam("target")).values(name="hooked")
                rowcount = s.execute(stmt, {"target": 1}).rowcount
                s.commit()
                return rowcount

        plain: sessionmaker[Any] = sessionmaker(engine, class_=PlainHooked)
        assert same_as_plain(db, engine, factory, publishes, program, plain=plain) == 1
    assert publishes.keys == user_keys((2, "u2@x"))


# -- 3. a per-statement schema_translate_map --------------------------------------------------


@postgresql_only
def test_schema_translate_map_per_statement_updates_and_publishes_that_schemas_rows(
    db: DbSpec, engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    reset(db, engine)
    other = f"{db.schema}_other"
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{other}"')
    try:
        other_engine = engine.execution_options(schema_translate_map={None: other})
        Base.metadata.create_all(other_engine)
        with other_engine.begin() as conn:
            conn.execute(
                insert(User),
                [{"id": 1, "email": "o1@x", "name": "x"}, {"id": 2, "email": "o2@x", "name": "x"}],
            )
        with Sessions.begin() as s:
            result = s.execute(
                update(User).where(User.name == "x").values(email=User.email + "z"),
                execution_options={"schema_translate_map": {None: other}},
            )
            assert result.rowcount == 2
        with other_engine.connect() as conn:
            assert conn.execute(select(User.email).order_by(User.id)).scalars().all() == [
                "o1@xz",
                "o2@xz",
            ]
        assert snapshot(engine)["hi_users"] == [tuple(u.values()) for u in USERS]
        assert publishes.keys == user_keys((1, "o1@x"), (2, "o2@x"), (1, "o1@xz"), (2, "o2@xz"))
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{other}" CASCADE')


# -- 4. a parent expired by commit, made dirty by a child ------------------------------------


def test_backref_to_an_expired_parent_flushes(
    db: DbSpec, engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    def program(S: sessionmaker[Any]) -> Any:
        with S() as s:
            u1 = User(email="p@x")
            s.add(u1)
            s.commit()  # expires u1
            s.add(Address(user=u1, street="s"))
            s.commit()
            return [(a.id, a.user_id) for a in s.scalars(select(Address))]

    assert same_as_plain(db, engine, Sessions, publishes, program, seeded=False) == [(1, 1)]
    assert {"address:1", "user_addresses:1"} <= publishes.keys


@pytest.mark.parametrize("relationship", ["write_only", "dynamic", "association_proxy"])
def test_child_of_an_expired_parent_through_other_collections_flushes(
    db: DbSpec,
    engine: Engine,
    Sessions: sessionmaker[Any],
    publishes: Publishes,
    relationship: str,
) -> None:
    def program(S: sessionmaker[Any]) -> Any:
        with S() as s:
            owner = Owner(email="o@x")
            s.add(owner)
            s.commit()  # expires owner
            if relationship == "write_only":
                owner.pets.add(Pet())
            elif relationship == "dynamic":
                owner.toys.append(Toy())
            else:
                owner.nicks.append("nick")
            s.commit()
            return [s.scalars(select(func.count()).select_from(c)).one() for c in (Pet, Toy, Nick)]

    same_as_plain(db, engine, Sessions, publishes, program, seeded=False)
    child = {"write_only": "pet", "dynamic": "toy", "association_proxy": "nick"}[relationship]
    owner_key = {"pet": "owner_pets", "toy": "owner_toys", "nick": "owner_nicks"}[child]
    assert {f"{child}:1", f"{owner_key}:1"} <= publishes.keys


# -- 5, 6. bulk INSERT ------------------------------------------------------------------------


def test_bulk_insert_as_the_first_statement_of_a_session(
    db: DbSpec, engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    program = committed(insert(User).values(id=5, email="f@x"))
    same_as_plain(db, engine, Sessions, publishes, program)
    assert publishes.keys == user_keys((5, "f@x"))


def test_bulk_insert_without_primary_keys(
    db: DbSpec, engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    def program(S: sessionmaker[Any]) -> Any:
        with S() as s:
            s.execute(insert(User), [{"email": "a@x"}, {"email": "b@x"}])
            s.commit()
            return s.execute(select(User.id, User.email).order_by(User.id)).all()

    rows = same_as_plain(db, engine, Sessions, publishes, program, seeded=False)
    assert [tuple(r) for r in rows] == [(1, "a@x"), (2, "b@x")]
    assert {"user_by_email:a@x", "user_by_email:b@x"} <= publishes.keys
    # Exact ids: SQLAlchemy reports them (inserted_primary_key_rows, or RETURNING on PostgreSQL).
    # A fix that cannot learn them may publish something coarser instead; this is the ideal.
    assert {"user:1", "user:2"} <= publishes.keys


def test_bulk_insert_returning_the_entity(
    db: DbSpec, engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    def program(S: sessionmaker[Any]) -> Any:
        with S() as s:
            users = s.scalars(insert(User).returning(User), [{"email": "c@x"}, {"email": "d@x"}])
            out = sorted((u.id, u.email) for u in users)
            s.commit()
            return out

    rows = same_as_plain(db, engine, Sessions, publishes, program, seeded=False)
    assert rows == [(1, "c@x"), (2, "d@x")]
    assert {"user_by_email:c@x", "user_by_email:d@x"} <= publishes.keys
    # RETURNING User gives the ids: the exact keys are knowable here.
    assert publishes.keys == user_keys((1, "c@x"), (2, "d@x"))


# -- 7-10. statement shapes ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["update", "delete"])
def test_synchronize_evaluate_with_a_where_matching_nothing(
    db: DbSpec, engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes, kind: str
) -> None:
    stmt: Any = update(User).values(name="z") if kind == "update" else delete(User)

    def program(S: sessionmaker[Any]) -> Any:
        with S() as s:
            s.get(User, 1)  # something in the identity map to evaluate against
            result = s.execute(
                stmt.where(User.name == "nobody"),
                execution_options={"synchronize_session": "evaluate"},
            )
            s.commit()
            return result.rowcount

    assert same_as_plain(db, engine, Sessions, publishes, program) == 0
    assert publishes.keys == set()


def test_select_from_an_update_returning_the_entity(
    db: DbSpec, engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    def program(S: sessionmaker[Any]) -> Any:
        with S() as s:
            dml = update(User).where(User.id == 1).values(name="fs").returning(User)
            users = s.scalars(select(User).from_statement(dml)).all()
            s.commit()
            return [(u.id, u.name) for u in users]

    assert same_as_plain(db, engine, Sessions, publishes, program) == [(1, "fs")]
    assert publishes.keys == user_keys((1, "u1@x"))


@pytest.mark.parametrize(
    "options",
    [
        {"synchronize_session": False},  # SQLAlchemy itself refuses: no primary keys
        {"synchronize_session": False, "dml_strategy": "core_only"},  # what 2.1 accepts
    ],
)
def test_executemany_update_with_a_bindparam_where(
    db: DbSpec,
    engine: Engine,
    Sessions: sessionmaker[Any],
    publishes: Publishes,
    options: dict[str, Any],
) -> None:
    def program(S: sessionmaker[Any]) -> Any:
        with S() as s:
            result = s.execute(
                update(User).where(User.name == bindparam("old")).values(name=bindparam("new")),
                [{"old": "n1", "new": "m1"}, {"old": "n3", "new": "m3"}],
                execution_options=options,
            )
            s.commit()
            return result.rowcount

    rowcount = same_as_plain(db, engine, Sessions, publishes, program)
    if "dml_strategy" in options:
        assert rowcount == 2
        assert publishes.keys == user_keys((1, "u1@x"), (3, "u3@x"))


@pytest.mark.parametrize("sync", ["auto", "fetch", False])
def test_update_of_an_aliased_entity_touches_and_publishes_only_the_matching_rows(
    db: DbSpec, engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes, sync: Any
) -> None:
    ua = aliased(User)
    stmt = update(ua).where(ua.name == "n1").values(name="y")
    program = committed(stmt, synchronize_session=sync)
    assert same_as_plain(db, engine, Sessions, publishes, program) == 1
    assert publishes.keys == user_keys((1, "u1@x"))  # not every row (a cartesian key SELECT)


@pytest.mark.parametrize("sync", ["auto", "fetch", False])
def test_delete_of_an_aliased_entity(
    db: DbSpec, engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes, sync: Any
) -> None:
    ua = aliased(User)
    program = committed(delete(ua).where(ua.id == 3), synchronize_session=sync)
    assert same_as_plain(db, engine, Sessions, publishes, program) == 1
    assert publishes.keys == user_keys((3, "u3@x"))


# -- 11, 12. PostgreSQL: UPDATE ... FROM an aggregate, and statements over many rows ------------


@postgresql_only
def test_update_from_a_group_by_subquery(
    db: DbSpec, engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    sub = select(Address.user_id, func.count().label("n")).group_by(Address.user_id).subquery()
    program = committed(update(User).where(User.id == sub.c.user_id).values(name="has"))
    assert same_as_plain(db, engine, Sessions, publishes, program) == 2
    assert publishes.keys == user_keys((1, "u1@x"), (2, "u2@x"))


@postgresql_only
@pytest.mark.slow
def test_bulk_update_and_delete_of_more_rows_than_the_driver_has_parameters(
    db: DbSpec, engine: Engine, Sessions: sessionmaker[Any], publishes: Publishes
) -> None:
    n = 70_000
    reset(db, engine, seeded=False)
    with engine.begin() as conn:
        conn.execute(
            text(
                f'INSERT INTO "{db.schema}".hi_users (id, email, name) '
                f"SELECT g, 'e' || g, 'bulk' FROM generate_series(1, {n}) AS g"
            )
        )
    with Sessions.begin() as s:
        assert s.execute(update(User).where(User.name == "bulk").values(name="b2")).rowcount == n
    assert len(publishes.keys) == 2 * n
    publishes.clear()
    with Sessions.begin() as s:
        assert s.execute(delete(User).where(User.name == "b2")).rowcount == n
    assert len(publishes.keys) == 2 * n


# -- 13. horizontal sharding --------------------------------------------------------------------


def _shard_of(mapper: Any, instance: Any, clause: Any = None) -> str:
    return "even" if instance.id % 2 == 0 else "odd"  # like SQLAlchemy's example: needs a row


def _sharded_factory(shards: dict[str, Engine], class_: type[ShardedSession]) -> Any:
    return sessionmaker(
        class_=class_,
        shards=shards,
        shard_chooser=_shard_of,
        identity_chooser=lambda *args, **kw: list(shards),
        execute_chooser=lambda state: list(shards),
    )


@pytest.mark.parametrize("route", ["execute_chooser", "bind_arguments", "set_shard_id"])
def test_bulk_update_and_delete_on_a_sharded_session(
    tmp_path: Path, cache: HybridCache, publishes: Publishes, route: str
) -> None:
    class InstalledSharded(ShardedSession):
        pass

    shards = {name: create_engine(f"sqlite:///{tmp_path / name}.db") for name in ("even", "odd")}
    for shard in shards.values():
        Base.metadata.create_all(shard)
    kwargs: dict[str, Any] = {}
    options: tuple[Any, ...] = ()
    if route == "bind_arguments":
        kwargs = {"bind_arguments": {"shard_id": "odd"}}
    elif route == "set_shard_id":
        options = (set_shard_id("odd"),)

    def program(S: sessionmaker[Any]) -> Any:
        with S() as s:
            s.add_all(User(id=i, email=f"u{i}@x", name="s") for i in (1, 2, 3))
            s.commit()
            up = s.execute(
                update(User).where(User.name == "s").values(name="t").options(*options), **kwargs
            ).rowcount
            down = s.execute(delete(User).where(User.id == 3).options(*options), **kwargs).rowcount
            s.commit()
            left = {
                n: sorted(
                    tuple(r)
                    for r in s.execute(select(User.id, User.name), bind_arguments={"shard_id": n})
                )
                for n in shards
            }
            s.execute(delete(User), bind_arguments={"shard_id": "even"})
            s.execute(delete(User), bind_arguments={"shard_id": "odd"})
            s.commit()
            return up, down, left

    try:
        expected = program(_sharded_factory(shards, ShardedSession))
        with installed_on(_sharded_factory(shards, InstalledSharded), cache) as factory:
            publishes.clear()
            assert program(factory) == expected
    finally:
        for shard in shards.values():
            shard.dispose()
    assert user_keys((1, "u1@x"), (3, "u3@x")) <= publishes.keys


# -- 14. a session on a mock bind -------------------------------------------------------------


@pytest.mark.parametrize("bind", [Mock, lambda: MagicMock(spec=Engine)], ids=["Mock", "spec"])
def test_a_session_on_a_mock_bind(
    cache: HybridCache, publishes: Publishes, bind: Callable[[], Any]
) -> None:
    """User suites bind sessions to mocks to test code without a database. Plain SQLAlchemy
    begins on ``bind.connect()`` and runs statements on it; so must an installed session."""

    class MockBound(Session):
        pass

    def program(S: Any) -> Any:
        with S(bind=bind()) as s:
            s.execute(text("UPDATE t SET x = 1"))
            s.commit()
            return "ok"

    assert program(sessionmaker()) == "ok"
    with installed_on(sessionmaker(class_=MockBound), cache) as factory:
        assert program(factory) == "ok"
    assert publishes.calls == []


# -- 15. leaks ----------------------------------------------------------------------------------


def _drop_unclosed_sessions(factory: sessionmaker[Any], write: bool) -> None:
    """Three times: a session runs a statement and is dropped without close(); the third must
    get a connection (the first two went back to the pool when collected)."""
    for i in range(3):
        s = factory()
        if write:
            s.add(User(id=100 + i, email=f"leak{i}@x"))
            s.flush()
        else:
            s.execute(select(User)).all()
        del s
        gc.collect()


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
def test_sessions_dropped_without_close_give_their_connections_back(
    db: DbSpec, cache: HybridCache, write: bool
) -> None:
    # A leaked connection must not block the teardown: PostgreSQL ends it after 3 s idle.
    connect_args = (
        {"timeout": 1}
        if db.kind == "sqlite"
        else {"options": "-c idle_in_transaction_session_timeout=3000"}
    )
    engine = db.engine(pool_size=2, max_overflow=0, pool_timeout=1, connect_args=connect_args)
    try:
        plain: sessionmaker[Any] = sessionmaker(engine)
        _drop_unclosed_sessions(plain, write)
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        with installed_on(sessionmaker(engine, class_=TrackedSession), cache) as factory:
            _drop_unclosed_sessions(factory, write)
            assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    except (OperationalError, PoolTimeoutError) as exc:  # database is locked, QueuePool limit
        pytest.fail(f"a dropped session kept its connection: {exc}")
    finally:
        engine.dispose()


def _short_lived_model(tracked: bool) -> weakref.ref[type]:
    reg = registry()

    class LocalBase(DeclarativeBase):
        registry = reg

    class Ephemeral(LocalBase):
        __tablename__ = "hi_ephemeral"
        id: Mapped[int] = mapped_column(Integer, primary_key=True)
        label: Mapped[str] = mapped_column(String(10))

    if tracked:
        track(Ephemeral, keys=["eph:{id}", "eph_label:{label}"])
    ref: weakref.ref[type] = weakref.ref(Ephemeral)
    reg.dispose()
    return ref


def test_track_does_not_keep_a_disposed_mapped_class_alive() -> None:
    untracked = _short_lived_model(tracked=False)
    gc.collect()
    assert untracked() is None  # SQLAlchemy lets it go; so must track()
    tracked = _short_lived_model(tracked=True)
    gc.collect()
    cls = tracked()
    if cls is not None:
        untrack(cls)  # do not leave it behind for other tests
        del cls
    assert tracked() is None


def test_engines_and_installations_are_not_kept_after_dispose_and_uninstall(
    tmp_path: Path, cache: HybridCache
) -> None:
    """Install/uninstall cycles on engines created and disposed: hybridinval's module-level
    state must not keep any of them alive. (Sessions are closed: an unclosed session's engine
    may stay referenced by SQLAlchemy itself; the dropped-session leak is tested above.)"""

    def cycle(i: int) -> list[weakref.ref[Any]]:
        engine = create_engine(f"sqlite:///{tmp_path / f'e{i}.db'}")
        Base.metadata.create_all(engine)

        class Cycle(Session):
            pass

        installation = install(sessionmaker(engine, class_=Cycle), cache)
        s = Cycle(engine)
        s.add(User(id=1, email="c@x"))
        s.commit()
        s.execute(update(User).values(name="n"))
        s.commit()
        s.get(User, 1)
        s.close()
        installation.uninstall()
        engine.dispose()
        return [weakref.ref(x) for x in (engine, Cycle, installation, s)]

    refs = [ref for i in range(5) for ref in cycle(i)]
    gc.collect()
    assert [r() for r in refs if r() is not None] == []
