"""Reading key fields from the database, for bulk statements (and, through ``_read_rows``, for
flushes too).

``_read_rows`` is the one function every such read goes through. ``_KeySelect`` selects the key
columns of a bulk statement's target rows with the statement's own WHERE. ``_Watch`` is one bulk
statement between its ``before_execute`` and its ``after_execute``: the base of
``_UpdateDeleteWatch`` (:mod:`._bulk_update`) and ``_InsertWatch`` (:mod:`._bulk_insert`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, tuple_
from sqlalchemy.sql import operators
from sqlalchemy.sql.expression import BindParameter

from ._templates import _attr_key, _fields, _row_keys

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Mapper, Session

    from ._frames import _UnitOfWork
    from ._templates import _ModelSpec


_IN_CHUNK = {"sqlite": 500}  # parameters per IN list; SQLite's limit is the lowest
_DEFAULT_IN_CHUNK = 5000


def _read_rows(
    conn: Connection, sel: Any, params: Any, options: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    """Every read hybridinval makes for keys goes through here: an ordinary statement on the
    session's connection (or a second one), seen by the engine's listeners like any other.

    Its callers look it up in this module when they call it, so replacing it here replaces every
    such read (the upstream suites' quiet-reads mode does)."""
    return [tuple(r) for r in conn.execute(sel, params, execution_options=options)]


def _in_chunks(conn: Connection, items: Sequence[Any], width: int) -> Iterator[Sequence[Any]]:
    size = max(1, _IN_CHUNK.get(conn.dialect.name, _DEFAULT_IN_CHUNK) // max(width, 1))
    for i in range(0, len(items), size):
        yield items[i : i + size]


class _KeySelect:
    """The key columns of one DML statement's target rows: primary key first, then every
    template field, selectable with the statement's own WHERE."""

    __slots__ = ("columns", "fields", "from_", "npk", "target")

    def __init__(self, mapper: Mapper[Any], specs: tuple[_ModelSpec, ...], dml: Any) -> None:
        pk_fields = [_attr_key(mapper, c) for c in mapper.primary_key]
        self.npk = len(pk_fields)
        wanted = list(dict.fromkeys([*pk_fields, *_fields(specs)]))
        target = dml.table
        self.target = target
        columns: list[Any] = []
        fields: list[str] = []
        from_: Any = target
        missing = False
        for field in wanted:
            col = target.corresponding_column(mapper.columns[field])
            if col is None:
                missing = True
                break
            columns.append(col)
            fields.append(field)
        if missing:
            # Joined inheritance: key fields in another of the mapper's tables. The statement's
            # table is one of them (not an alias), so the mapper's join adds the rest.
            from_ = mapper.persist_selectable
            columns = [mapper.columns[f] for f in wanted]
            fields = wanted
        self.columns = columns
        self.fields = fields
        self.from_ = from_

    def where(self, criteria: Any, *, lock: bool, key_share: bool = False) -> Any:
        sel: Any = select(*self.columns).select_from(self.from_)
        if criteria is not None:
            sel = sel.where(criteria)
        if lock:
            # OF the target only: the statement's other FROMs (a GROUP BY subquery) stay unlocked,
            # and PostgreSQL refuses FOR UPDATE over grouped relations. Rendered as nothing where
            # the database has no FOR UPDATE (SQLite, which is serialized by its write lock).
            # key_share: FOR NO KEY UPDATE, the lock PostgreSQL's own UPDATE takes when it changes
            # no key column (so inserts of rows referencing these stay unblocked, as without us).
            sel = sel.with_for_update(of=self.target, key_share=key_share)
        return sel

    def by_pk(
        self, pks: Sequence[tuple[Any, ...]], *, lock: bool = False, key_share: bool = False
    ) -> Any:
        pk_cols = self.columns[: self.npk]
        if self.npk == 1:
            criteria = pk_cols[0].in_([pk[0] for pk in pks])
        else:
            criteria = tuple_(*pk_cols).in_(list(pks))
        return self.where(criteria, lock=lock, key_share=key_share)

    def pk_bind_names(self, criteria: Any) -> list[str] | None:
        """For a WHERE that is exactly ``pk_col == :bind`` for every primary-key column (an
        executemany UPDATE by primary key), the bind names in primary-key order; else None."""
        terms = list(getattr(criteria, "clauses", None) or [criteria])
        if len(terms) != self.npk or (
            len(terms) > 1 and getattr(criteria, "operator", None) is not operators.and_
        ):
            return None
        names: list[str | None] = [None] * self.npk
        pk_cols = self.columns[: self.npk]
        for term in terms:
            left, right = getattr(term, "left", None), getattr(term, "right", None)
            if getattr(term, "operator", None) is not operators.eq:
                return None
            if not isinstance(right, BindParameter) or left is None:
                return None
            col = self.target.corresponding_column(left)
            index = next((i for i, c in enumerate(pk_cols) if c is col), None)
            if index is None or names[index] is not None:
                return None
            names[index] = right.key
        return [n for n in names if n is not None] if None not in names else None

    def read(
        self, conn: Connection, sel: Any, params: Any, options: Mapping[str, Any]
    ) -> list[tuple[Any, ...]]:
        return _read_rows(conn, sel, params, options)

    def read_by_pk(
        self,
        conn: Connection,
        pks: Sequence[tuple[Any, ...]],
        options: Mapping[str, Any],
        *,
        lock: bool = False,
        key_share: bool = False,
    ) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        for chunk in _in_chunks(conn, pks, self.npk):
            sel = self.by_pk(chunk, lock=lock, key_share=key_share)
            rows.extend(self.read(conn, sel, {}, options))
        return rows

    def keys(self, specs: tuple[_ModelSpec, ...], rows: Iterable[Sequence[Any]]) -> list[str]:
        return _row_keys(specs, self.fields, rows)


class _Watch:
    """One DML statement between its ``before_execute`` and its ``after_execute``."""

    __slots__ = ("conn", "keysel", "mapper", "options", "params", "session", "specs", "uow")

    def __init__(
        self,
        conn: Connection,
        uow: _UnitOfWork,
        session: Session,
        mapper: Mapper[Any],
        specs: tuple[_ModelSpec, ...],
        keysel: _KeySelect,
        params: list[Any],
        options: dict[str, Any],
    ) -> None:
        self.conn = conn
        self.uow = uow
        self.session = session
        self.mapper = mapper
        self.specs = specs
        self.keysel = keysel
        self.params = params
        self.options = options

    def add(self, keys: list[str]) -> None:
        if keys:
            self.uow.add(self.session, keys)

    def after(self, result: Any) -> None:
        raise NotImplementedError
