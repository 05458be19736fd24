"""The outbox relay: deletes the rows this process published, and republishes rows that no one
did (their writer died between COMMIT and publish, or Redis was unreachable).

One background thread per outbox table and database, started by ``install(..., outbox=True)``
(or run on its own by ``hybridinval relay``). Every ``interval`` it

1. deletes, in one statement, the rows this process has published since (so a commit never pays
   a second database round trip for its row);
2. looks at the table (one query: how many rows wait, and how old the oldest is, on the
   database's clock) and, if rows are older than ``grace``, republishes them oldest first:
   ``batch`` rows per database transaction, their keys in one Redis round trip, then deletes
   them in the same transaction. The rows are locked while that happens, so relays of many
   processes and machines never publish one row at the same time: ``FOR UPDATE SKIP LOCKED``
   (each relay takes the rows no other relay holds; commits only insert, and never wait for
   it), or on SQLite the database write lock (``BEGIN IMMEDIATE``, taken only when a row is due,
   and held for one Redis round trip).

While Redis is unreachable the publish fails, the transaction rolls back and the rows wait for
the next pass. A row whose keys cannot be read (not this library's JSON, or a key no cache
accepts) is logged, counted and left in place for an operator: it is never silently dropped.

The relay reaches the database through a pool of its own, made from the application's engine
(``Pool.recreate()``: the same driver, arguments and connect listeners), so that it never takes
the application's pooled connections, and a forked child gets a fresh one: a connection the
parent's relay held at the fork is kept referenced in the child, never used, returned or closed.

This module must never delete a row whose keys Redis has not taken, and never hold a database
lock across anything but one Redis round trip.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, delete, false, func, select

from ..errors import BackendUnavailableError, CacheClosedError
from ..keyspace import check_key
from ._outbox import db_epoch

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.engine import Connection, Engine

    from .._cache import HybridCache

__all__ = ["OutboxRelay"]

log = logging.getLogger("hybridinval.sqlalchemy")

_DELETE_CHUNK = 500  # ids per DELETE ... IN (...): well under every driver's parameter limit


class OutboxRelay:
    """Deletes published outbox rows and republishes rows left behind, for one cache's
    namespace in one outbox table.

    ``republish=False`` only deletes (a process whose relaying is done elsewhere).
    """

    def __init__(
        self,
        engine: Engine,
        table: Table,
        cache: HybridCache,
        *,
        grace: float = 1.0,
        interval: float = 0.5,
        batch: int = 500,
        republish: bool = True,
    ) -> None:
        self.app_engine = engine
        self.table = table
        self.cache = cache
        self.namespace = cache.namespace
        self.grace = grace
        self.interval = interval
        self.batch = batch
        self.republish = republish
        self._reset()
        _live_relays.add(self)

    def _reset(self) -> None:
        """State of one OS process (fresh at construction and in a forked child)."""
        self.engine = _private_engine(self.app_engine)
        self._lock = threading.Lock()
        self._published: list[int] = []
        self._bad_rows: set[int] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._checked_out: set[Connection] = set()  # for fork: never used again in a child
        self._stats: dict[str, Any] = {
            "outbox_backlog": None,
            "outbox_oldest_age_s": None,
            "relay_rows_published": 0,
            "relay_batches": 0,
            "relay_failures": 0,
            "relay_bad_rows": 0,
            "outbox_rows_deleted": 0,
        }

    # -- from the committing thread -------------------------------------------------------------

    def published(self, row_id: int) -> None:
        """Redis took row ``row_id``'s keys: delete it in the next batch. Never blocks."""
        with self._lock:
            self._published.append(row_id)
            many = len(self._published) >= self.batch
        if many:
            self._wake.set()

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> OutboxRelay:
        """Start the background thread (idempotent). Never touches the database itself."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._run, name=f"hybridinval-relay-{self.namespace}", daemon=True
                )
                self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread after a last delete of published rows. Idempotent."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        _live_relays.discard(self)
        if thread is None or not thread.is_alive():
            self.engine.dispose()  # the private pool's idle connections

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def stats(self) -> dict[str, Any]:
        """The backlog at the last look (``outbox_backlog`` rows of this namespace, the oldest
        ``outbox_oldest_age_s`` seconds old; None before the first look) and counters."""
        with self._lock:
            out = dict(self._stats)
            out["outbox_pending_deletes"] = len(self._published)
        return out

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            try:
                self.run_once(republish=self.republish and not stopping)
            except Exception:  # the thread must outlive a database outage or a bug
                self._count("relay_failures")
                log.exception("outbox relay pass for %r failed", self.namespace)
            if stopping:
                return
            self._wake.wait(self.interval)
            self._wake.clear()

    # -- one pass ---------------------------------------------------------------------------------

    def run_once(self, *, republish: bool = True) -> int:
        """Delete published rows, then (with ``republish``) republish rows older than
        ``grace``. Returns the number of rows republished."""
        self.delete_published()
        if not republish:
            return 0
        total = 0
        while True:
            due = self._look()
            if not due:
                return total
            sent = self._relay_batch()
            total += sent
            if sent < self.batch:
                return total

    def delete_published(self) -> int:
        with self._lock:
            ids, self._published = self._published, []
        if not ids:
            return 0
        table = self.table
        try:
            with self._connect() as conn, conn.begin():
                for i in range(0, len(ids), _DELETE_CHUNK):
                    conn.execute(delete(table).where(table.c.id.in_(ids[i : i + _DELETE_CHUNK])))
        except BaseException:
            with self._lock:
                self._published[:0] = ids  # left for the next pass (or for a relay)
            raise
        self._count("outbox_rows_deleted", len(ids))
        return len(ids)

    def _look(self) -> bool:
        """One query: the backlog, its oldest row's age; whether a row is due."""
        table = self.table
        with self._connect() as conn:
            count, oldest, now = conn.execute(
                select(func.count(), func.min(table.c.created_at), db_epoch()).where(
                    table.c.namespace == self.namespace
                )
            ).one()
            conn.rollback()
        count = int(count or 0)
        age = float(now) - float(oldest) if oldest is not None else None
        with self._lock:
            self._stats["outbox_backlog"] = count
            self._stats["outbox_oldest_age_s"] = round(age, 3) if age is not None else None
        return age is not None and age >= self.grace

    def _relay_batch(self) -> int:
        """Republish and delete up to ``batch`` due rows in one transaction; their number."""
        table = self.table
        with self._connect() as conn:
            if conn.dialect.name == "sqlite":
                _sqlite_write_lock(conn, table)
            # The first statement begins the transaction (SQLAlchemy's autobegin).
            query = (
                select(table.c.id, table.c["keys"])
                .where(
                    table.c.namespace == self.namespace,
                    table.c.created_at <= db_epoch() - self.grace,
                )
                .order_by(table.c.id)
                .limit(self.batch + len(self._bad_rows))
                .with_for_update(skip_locked=True)
            )
            found = list(conn.execute(query))
            if len(found) < self.batch + len(self._bad_rows):
                # Every due row was read: forget bad rows that are gone (an operator deleted
                # them), so they neither hide good rows nor pile up.
                self._bad_rows &= {r[0] for r in found}
            rows = [r for r in found if r[0] not in self._bad_rows][: self.batch]
            ids, keys = self._decode(rows)
            if not ids:
                conn.rollback()
                return 0
            try:
                self.cache.invalidate_many(keys)
            except (BackendUnavailableError, CacheClosedError) as exc:
                conn.rollback()
                self._count("relay_failures")
                log.warning(
                    "outbox relay for %r: %d row(s) wait, Redis did not take them: %s",
                    self.namespace,
                    len(ids),
                    exc,
                )
                return 0
            conn.execute(delete(table).where(table.c.id.in_(ids)))
            conn.commit()
        self._count("relay_rows_published", len(ids))
        self._count("relay_batches")
        log.info("outbox relay for %r republished %d row(s)", self.namespace, len(ids))
        return len(ids)

    def _decode(self, rows: list[Any]) -> tuple[list[int], list[str]]:
        ids: list[int] = []
        keys: dict[str, None] = {}
        limit = self.cache.max_key_length
        for row_id, raw in rows:
            try:
                batch = json.loads(raw)
                if not isinstance(batch, list):
                    raise ValueError(f"expected a JSON array, got {type(batch).__name__}")
                for key in batch:
                    check_key(key, limit)
            except (ValueError, TypeError) as exc:
                self._bad_rows.add(row_id)
                self._count("relay_bad_rows")
                log.error(
                    "outbox row %d of %r (table %s) cannot be relayed and stays in place: %s",
                    row_id,
                    self.namespace,
                    self.table.fullname,
                    exc,
                )
                continue
            ids.append(row_id)
            keys.update(dict.fromkeys(batch))
        return ids, list(keys)

    def _connect(self) -> _Checkout:
        return _Checkout(self)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    def _after_fork_in_child(self) -> None:
        running = self._thread is not None
        # The parent's private pool and the connections its relay thread held (that thread does
        # not exist here): kept referenced for ever, so nothing of theirs is used by this process
        # (the parent's sockets), returned to a pool or closed (which would end the parent's
        # database sessions). _reset() makes a fresh private pool.
        _inherited.append((self.engine, set(self._checked_out)))
        self._reset()
        if running:
            self.start()


class _Checkout:
    """``with relay._connect() as conn``: a connection of the relay's private pool, remembered
    while checked out (several threads may run passes at once)."""

    def __init__(self, relay: OutboxRelay) -> None:
        self.relay = relay
        self.conn: Connection | None = None

    def __enter__(self) -> Connection:
        conn = self.conn = self.relay.engine.connect()
        with self.relay._lock:
            self.relay._checked_out.add(conn)
        return conn

    def __exit__(self, *exc: object) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with self.relay._lock:
                self.relay._checked_out.discard(conn)
            conn.close()


def _private_engine(engine: Engine) -> Engine:
    """An engine on ``engine``'s database with a pool of its own (same creator, arguments and
    connect listeners) and the same execution options (a schema_translate_map, say)."""
    private = create_engine(engine.url, pool=engine.pool.recreate())
    options = engine.get_execution_options()
    return private.execution_options(**options) if options else private


def _sqlite_write_lock(conn: Connection, table: Table) -> None:
    """Take SQLite's write lock now, before reading, so one relay at a time picks rows: BEGIN
    IMMEDIATE, or, if a transaction is already open on the driver (the pysqlite recipe whose
    ``begin`` listener emits its own BEGIN), a write that changes nothing."""
    if not conn.in_transaction():
        conn.begin()
    dbapi = conn.connection.dbapi_connection
    if not getattr(dbapi, "in_transaction", True):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        conn.execute(delete(table).where(false()))


_live_relays: weakref.WeakSet[OutboxRelay] = weakref.WeakSet()
_inherited: list[Any] = []


def _reset_relays_after_fork() -> None:
    for relay in list(_live_relays):
        relay._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_relays_after_fork)
