"""Bulk UPDATE and DELETE: old keys from a locked SELECT with the statement's own WHERE just
before it runs, new keys (UPDATE) from the same rows read again by primary key after it."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from sqlalchemy import Column, UniqueConstraint
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm.exc import UnmappedColumnError
from sqlalchemy.pool import AssertionPool, SingletonThreadPool, StaticPool
from sqlalchemy.sql import visitors
from sqlalchemy.sql.expression import CTE, UpdateBase

from ._keyselect import _Watch
from ._templates import _attr_key

log = logging.getLogger("hybridinval.sqlalchemy")


class _UpdateDeleteWatch(_Watch):
    """Old keys from a locked SELECT with the statement's WHERE, just before it runs; new keys
    (UPDATE) from the same rows read by primary key after it.

    The rows selected are locked (``FOR UPDATE OF`` the target; on SQLite the database write lock
    is held first), so they still match when the statement runs and their old values are exact.
    Under READ COMMITTED another transaction can still make a *different* row match in between;
    the statement then reports more rows than were locked, and the old values of the rows that
    matched late are read as committed (they are locked by our statement now, so the committed
    version is the one it changed) through a second connection of the same engine.
    """

    __slots__ = ("dml", "locked", "pks")

    def __init__(self, dml: Any, *args: Any) -> None:
        super().__init__(*args)
        self.dml = dml
        self.pks: list[tuple[Any, ...]] = []
        self.locked: int | None = None
        if _has_dml_cte(dml):
            # Its WHERE would run the CTE's INSERT/UPDATE/DELETE a second time.
            log.warning(
                "bulk %s of tracked %s reads a data-modifying CTE: its keys are not read (that "
                "would run the CTE twice); declare them with invalidate_on_commit()",
                "UPDATE" if dml.is_update else "DELETE",
                self.mapper.class_.__name__,
            )
            self.dml = None
            return
        _hold_sqlite_write_lock(self.conn)
        npk = self.keysel.npk
        key_share = dml.is_update and not _may_change_key_columns(dml, self.params, self)
        old: list[tuple[Any, ...]] = []
        names = self.keysel.pk_bind_names(dml.whereclause) if len(self.params) > 1 else None
        if names is not None and not all(n in p for p in self.params for n in names):
            names = None  # a parameter set lacks a key: SQLAlchemy's own error comes from the read
        if names is not None:
            # ORM bulk UPDATE by primary key: one locked SELECT per chunk of rows, not per row.
            # No row can start matching a primary key, so there is no row count to check.
            wanted = list(dict.fromkeys(tuple(p[n] for n in names) for p in self.params))
            old = self.keysel.read_by_pk(
                self.conn, wanted, self.options, lock=True, key_share=key_share
            )
        else:
            sel = self.keysel.where(dml.whereclause, lock=True, key_share=key_share)
            self.locked = 0
            for params in self.params:
                rows = self.keysel.read(self.conn, sel, params, self.options)
                # The statement's row count, if no other row matches late: each parameter set
                # changes each of its rows once (a join may repeat one in the SELECT).
                self.locked += len({r[:npk] for r in rows})
                old.extend(rows)
        self.pks = list(dict.fromkeys(r[:npk] for r in old))
        self.add(self.keysel.keys(self.specs, old))

    def after(self, result: Any) -> None:
        if self.dml is None:
            return
        pks = self.pks
        late = self._late_rows(result)
        if late:
            self.add(self.keysel.keys(self.specs, late))
            pks = list(dict.fromkeys([*pks, *(r[: self.keysel.npk] for r in late)]))
        if not (self.dml.is_update and pks and _may_change_keys(self.dml, self.params, self)):
            return
        new = self.keysel.read_by_pk(self.conn, pks, self.options)
        if len({r[: self.keysel.npk] for r in new}) < len(pks):
            log.warning(
                "bulk UPDATE of tracked %s changed primary keys (or a trigger removed rows): "
                "keys with the new primary key values are not invalidated",
                self.mapper.class_.__name__,
            )
        self.add(self.keysel.keys(self.specs, new))

    def _late_rows(self, result: Any) -> list[tuple[Any, ...]]:
        """Rows the statement changed that were not locked by the key SELECT, read as committed
        from a second connection; empty when the row count proves there are none."""
        if self.locked is None:
            return []
        dialect = self.conn.dialect
        sane = (
            dialect.supports_sane_multi_rowcount
            if len(self.params) > 1
            else dialect.supports_sane_rowcount
        )
        try:
            count = result.rowcount
        except Exception:
            count = -1
        if not sane or count <= self.locked:
            return []
        engine = getattr(self.conn, "engine", None)
        if not isinstance(engine, Engine) or isinstance(engine.pool, _SHARED_CONNECTION_POOLS):
            # One connection for everyone (SQLite :memory:): nobody else could have committed,
            # and a "second" connection would be this one.
            return []
        log.info(
            "bulk %s of tracked %s changed %d row(s) but %d were locked for their keys (a "
            "concurrent commit); reading the others as committed",
            "UPDATE" if self.dml.is_update else "DELETE",
            self.mapper.class_.__name__,
            count,
            self.locked,
        )
        sel = self.keysel.where(self.dml.whereclause, lock=False)
        rows: list[tuple[Any, ...]] = []
        try:
            with engine.connect() as other:
                for params in self.params:
                    rows.extend(self.keysel.read(other, sel, params, self.options))
        except Exception:
            # The statement has run; failing it now (a full pool, a lost server) would read as
            # if it had not. Logged loudly: these rows' old keys are not invalidated.
            log.exception(
                "bulk %s of tracked %s: reading the rows that matched late failed; their old "
                "keys are not invalidated",
                "UPDATE" if self.dml.is_update else "DELETE",
                self.mapper.class_.__name__,
            )
            return []
        known = set(self.pks)
        return [r for r in rows if r[: self.keysel.npk] not in known]


# Pools that hand every checkout the same DBAPI connection.
_SHARED_CONNECTION_POOLS = (SingletonThreadPool, StaticPool, AssertionPool)


def _assigned_names(dml: Any, param_sets: list[Any]) -> set[str] | None:
    """Names of what an UPDATE assigns (column keys, names or attribute names); None if unknown."""
    names: set[str] = set()
    try:
        values = list(dml._values or ())
    except AttributeError:
        return None
    # SQLAlchemy 2.0 keeps ordered_values() apart; 2.1 keeps them in _values.
    values += [k for k, _ in getattr(dml, "_ordered_values", None) or ()]
    for key in values:
        if isinstance(key, str):
            names.add(key)
            continue
        for attr in ("key", "name"):
            value = getattr(key, attr, None)
            if isinstance(value, str):
                names.add(value)
    for params in param_sets:
        names.update(k for k in params if isinstance(k, str))
    return names


def _has_dml_cte(dml: Any) -> bool:
    """Whether ``dml`` reads a CTE that is itself an INSERT/UPDATE/DELETE."""
    return any(
        isinstance(el, CTE) and isinstance(getattr(el, "element", None), UpdateBase)
        for el in visitors.iterate(dml)
    )


def _may_change_key_columns(dml: Any, param_sets: list[Any], watch: _Watch) -> bool:
    """Whether an UPDATE may assign a primary-key or unique column (PostgreSQL then locks the
    row FOR UPDATE, else FOR NO KEY UPDATE)."""
    assigned = _assigned_names(dml, param_sets)
    if assigned is None:
        return True
    table: Any = watch.mapper.local_table
    unique: set[Any] = {c for c in table.columns if c.primary_key or c.unique}
    for constraint in getattr(table, "constraints", ()):
        if isinstance(constraint, UniqueConstraint):
            unique.update(constraint.columns)
    for index in getattr(table, "indexes", ()):
        if index.unique:
            unique.update(c for c in index.columns if isinstance(c, Column))
    for col in unique:
        names = {col.key, col.name}
        with contextlib.suppress(UnmappedColumnError):
            names.add(_attr_key(watch.mapper, col))
        if names & assigned:
            return True
    return False


def _may_change_keys(dml: Any, param_sets: list[Any], watch: _Watch) -> bool:
    """Whether the UPDATE may change a key field, so the new values must be read back."""
    assigned = _assigned_names(dml, param_sets)
    if assigned is None:
        return True
    for field in watch.keysel.fields:
        col = watch.mapper.columns[field]
        if col.onupdate is not None or col.server_onupdate is not None:
            return True
        if {field, col.key, col.name} & assigned:
            return True
    return False


def _hold_sqlite_write_lock(conn: Connection) -> None:
    """On SQLite, take the database write lock before the key SELECT, so that nobody commits
    between it and the statement. pysqlite (in its default mode) would send BEGIN right before
    the statement anyway; this sends ``BEGIN IMMEDIATE`` a moment earlier, straight to the driver
    so no statement event sees it. A transaction the driver already opened is left alone."""
    if conn.dialect.name != "sqlite":
        return
    try:
        driver = conn.connection.driver_connection
        if getattr(driver, "in_transaction", True):
            return
        if getattr(driver, "isolation_level", None) is None:  # the driver's autocommit mode
            return
        if getattr(driver, "autocommit", -1) != -1:  # sqlite3.LEGACY_TRANSACTION_CONTROL
            return
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute("BEGIN IMMEDIATE")
        finally:
            cursor.close()
    except Exception as exc:  # the lock is an optimisation of exactness, never a new failure
        log.debug("could not take the SQLite write lock early: %s", exc)
