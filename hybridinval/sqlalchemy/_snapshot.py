"""Whether a session's transaction may hold a snapshot older than the L2 version that a fill
compares against, and the isolation level it is judged by (read once per DBAPI connection)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

log = logging.getLogger("hybridinval.sqlalchemy")


_ISOLATION_INFO_KEY = "hybridinval.isolation_level"
# Isolation levels under which every statement takes a fresh snapshot: a loader that starts after
# the L2 version was read sees every commit published before that read.
_PER_STATEMENT_SNAPSHOT = frozenset({"READ COMMITTED", "READ UNCOMMITTED", "AUTOCOMMIT"})


def _snapshot_is_fresh(connections: Iterable[Connection]) -> bool:
    """True when the next statement of the session will see every commit made before it.

    The core reads the L2 version before calling the loader, and that only proves something if
    the loader's read is newer than the version read. It is, unless the transaction already holds
    an older snapshot: REPEATABLE READ/SERIALIZABLE after its first statement, or an open SQLite
    read transaction. No I/O here (an async driver could not do it outside its greenlet): the
    isolation level was learnt when the connection began.
    """
    for conn in connections:
        if conn.closed or conn.invalidated or not conn.in_transaction():
            continue
        if _driver_says_current(conn):
            continue
        if _isolation_level(conn, query=False) in _PER_STATEMENT_SNAPSHOT:
            continue
        return False
    return True


def _driver_says_current(conn: Connection) -> bool:
    """Whether the driver shows that the next statement reads the latest committed state.

    * No database transaction open (BEGIN not sent yet): the loader's statement starts one.
    * SQLite in the driver's legacy transaction mode (pysqlite's and aiosqlite's default): it
      sends BEGIN only before a write, so an open transaction holds the database write lock and
      no other connection can commit until it ends.

    False when the driver cannot tell.
    """
    try:
        driver = conn.connection.driver_connection
    except Exception:
        return False
    in_transaction = getattr(driver, "in_transaction", None)  # sqlite3, aiosqlite
    if isinstance(in_transaction, bool) and conn.dialect.name == "sqlite":
        if not in_transaction:
            return True
        legacy = (
            getattr(driver, "isolation_level", None) is not None
            and getattr(
                driver,
                "autocommit",
                -1,  # sqlite3.LEGACY_TRANSACTION_CONTROL (3.12+), or absent
            )
            == -1
        )
        return legacy
    info = getattr(driver, "info", None)  # psycopg 3 (sync and async), psycopg2
    status = getattr(info, "transaction_status", None)
    if status is not None:
        return getattr(status, "name", status) in ("IDLE", 0)
    return False


def _isolation_level(conn: Connection, *, query: bool) -> str:
    level = conn.get_execution_options().get("isolation_level")
    if level:
        return str(level).upper()
    # Asked once per DBAPI connection (connection.info outlives checkouts); SQLAlchemy restores
    # the default level on check-in when an execution option changed it.
    info = conn.info
    cached = info.get(_ISOLATION_INFO_KEY)
    if cached is None:
        if not query:
            return "UNKNOWN"
        try:
            cached = str(conn.get_isolation_level()).upper()
        except Exception as exc:
            log.debug("cannot read the isolation level of %r: %s", conn, exc)
            return "UNKNOWN"
        info[_ISOLATION_INFO_KEY] = cached
    return str(cached)
