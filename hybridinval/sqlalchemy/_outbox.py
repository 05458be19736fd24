"""The transactional outbox: a committed change's keys, written in its own transaction.

With ``install(..., outbox=True)`` the keys a root transaction publishes are also inserted into
an outbox table just before its COMMIT, on the same connection, so they commit or roll back
with the data. After the COMMIT they are published at once, as without an outbox; once Redis has
taken them, the row is handed to the relay (:mod:`._relay`) to be deleted in a batch, off the
committing thread. A row that stays (its writer died between COMMIT and publish, or Redis was
unreachable) is republished by a relay once it is older than the grace period.

The row is written from the engine's ``commit`` event, fired just before the DBAPI COMMIT and
after ``Session.commit()``'s last flush (which runs *after* ``before_commit``), so keys found by
that flush are in it too. A rolled-back SAVEPOINT leaves no row: its keys were dropped with its
frame before the root commits. A session joined to an outer connection-level transaction writes
its row in that transaction, just before the outer COMMIT.

Every row carries the time it was written on the *database's* clock (:class:`db_epoch`), and a
relay compares against the same clock: writers and relays on machines whose clocks disagree
still agree on a row's age.

This module must never write a row outside the transaction whose keys it holds, and never let a
row be deleted before Redis has taken its keys.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import BigInteger, Column, Double, Integer, MetaData, String, Table, Text, insert
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.sql.compiler import SQLCompiler

__all__ = ["DEFAULT_TABLE_NAME", "Outbox", "db_epoch", "outbox_table"]

log = logging.getLogger("hybridinval.sqlalchemy")

DEFAULT_TABLE_NAME = "hybridinval_outbox"


def outbox_table(
    metadata: MetaData, name: str = DEFAULT_TABLE_NAME, *, schema: str | None = None
) -> Table:
    """Add the outbox table to ``metadata`` (so ``create_all`` and Alembic's autogenerate see
    it) and return it; pass it to ``install(..., outbox=Outbox(table=...))`` when its name or
    schema is not the default.

    Columns: ``id`` (ascending: the relay sends oldest first), ``namespace`` (the cache's),
    ``keys`` (a JSON array) and ``created_at`` (seconds since the epoch, the database's clock).
    No other index: every commit inserts a row, and the table holds only rows not yet deleted.
    """
    return Table(
        name,
        metadata,
        # INTEGER PRIMARY KEY on SQLite: the rowid itself, in ascending order.
        Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True),
        Column("namespace", String(200), nullable=False),
        Column("keys", Text(), nullable=False),
        Column("created_at", Double(), nullable=False),
        schema=schema,
        # AUTOINCREMENT: never reuse the id of a deleted row. A late delete by id (a writer
        # whose retry succeeded after a relay had republished and deleted its row) must not
        # remove another writer's row that took the id over.
        sqlite_autoincrement=True,
    )


@dataclass(frozen=True)
class Outbox:
    """How ``install(..., outbox=...)`` makes invalidations durable. ``outbox=True`` is
    ``Outbox()``.

    A committed change is invalidated everywhere within ``grace + interval`` plus one round
    trip, even when its writer dies between COMMIT and publish or Redis was unreachable at its
    commit, provided some process runs a relay and the database keeps the row.
    """

    table: Table | None = None
    """The outbox table (:func:`outbox_table`); None: ``hybridinval_outbox`` with no schema."""

    relay: bool | Engine = True
    """Run a relay in this process: True on the session factory's engine, or on the engine
    given; False when relays run elsewhere (``hybridinval relay``). Published rows are deleted
    by this process either way."""

    grace: float = 1.0
    """Seconds a row must wait before a relay republishes it: its writer normally publishes and
    deletes it well within this. Shorter means a faster recovery and more duplicate publishes
    (harmless: an invalidation is a delete)."""

    interval: float = 0.5
    """Seconds between a relay's looks at the table (one cheap query while it is empty)."""

    batch: int = 500
    """Rows a relay republishes per Redis round trip (and per database transaction)."""

    def __post_init__(self) -> None:
        for name in ("grace", "interval"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Outbox.{name} must be a number >= 0, got {value!r}")
        if self.interval == 0:
            raise ValueError("Outbox.interval must be > 0")
        if not isinstance(self.batch, int) or isinstance(self.batch, bool) or self.batch < 1:
            raise ValueError(f"Outbox.batch must be an int >= 1, got {self.batch!r}")
        if self.table is not None and not isinstance(self.table, Table):
            raise TypeError(f"Outbox.table must be a Table (outbox_table()), got {self.table!r}")

    @classmethod
    def of(cls, value: bool | Outbox | None) -> Outbox | None:
        """``install()``'s ``outbox=`` argument as an :class:`Outbox`, or None."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, Outbox):
            return value
        raise TypeError(f"install(outbox=...) takes True, False or an Outbox, got {value!r}")

    @property
    def resolved_table(self) -> Table:
        return self.table if self.table is not None else _DEFAULT_TABLE


_DEFAULT_TABLE = outbox_table(MetaData())


class db_epoch(FunctionElement[float]):
    """Now, in seconds since the epoch, on the database's clock (the statement's own time, not
    the transaction's start)."""

    type = Double()
    inherit_cache = True


@compiles(db_epoch, "postgresql")
def _pg_epoch(element: db_epoch, compiler: SQLCompiler, **kw: Any) -> str:
    return "EXTRACT(EPOCH FROM clock_timestamp())"


@compiles(db_epoch, "sqlite")
def _sqlite_epoch(element: db_epoch, compiler: SQLCompiler, **kw: Any) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


@compiles(db_epoch, "mysql")
@compiles(db_epoch, "mariadb")
def _mysql_epoch(element: db_epoch, compiler: SQLCompiler, **kw: Any) -> str:
    return "UNIX_TIMESTAMP(NOW(6))"


@compiles(db_epoch)
def _client_epoch(element: db_epoch, compiler: SQLCompiler, **kw: Any) -> str:
    # A database without a known epoch function: this process's clock, bound as a value (rows
    # and relays then agree only as far as the machines' clocks do).
    return compiler.process(_literal_now(), **kw)


def _literal_now() -> Any:
    from sqlalchemy import literal

    return literal(time.time(), Double())


def write_rows(conn: Connection, table: Table, batches: list[tuple[str, list[str]]]) -> list[int]:
    """Insert one row per ``(namespace, keys)`` on ``conn``, in its transaction; their ids."""
    returning = bool(conn.dialect.insert_returning)
    statement = _inserts.get((table, returning))
    if statement is None:
        # Built once per table: a statement made anew per commit costs its cache key every
        # time, measurably more than the statement itself on a fast database.
        statement = insert(table).values(created_at=db_epoch())
        if returning:
            statement = statement.returning(table.c.id)
        _inserts[table, returning] = statement
    ids: list[int] = []
    for namespace, keys in batches:
        params = {"namespace": namespace, "keys": json.dumps(keys, ensure_ascii=False)}
        result = conn.execute(statement, params)
        if returning:
            ids.append(int(result.scalar_one()))
        else:  # MySQL: the driver's last insert id
            pk = result.inserted_primary_key
            if pk is None or pk[0] is None:  # pragma: no cover - every dialect reports it
                raise RuntimeError(f"the outbox INSERT into {table.fullname} reported no id")
            ids.append(int(pk[0]))
    return ids


# Keyed by (table, whether the dialect has RETURNING); a table is made once per application.
_inserts: dict[tuple[Table, bool], Any] = {}
