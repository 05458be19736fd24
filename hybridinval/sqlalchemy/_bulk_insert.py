"""Bulk INSERT: the keys of the new rows, from the values the statement bound, the primary keys
SQLAlchemy reports and, for fields neither has, the new rows read back."""

from __future__ import annotations

import datetime
import decimal
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.exc import UnmappedColumnError
from sqlalchemy.sql.expression import ClauseElement

from ._keyselect import _in_chunks, _Watch
from ._templates import _MISSING, _attr_key, _fields, _keys

log = logging.getLogger("hybridinval.sqlalchemy")


class _InsertWatch(_Watch):
    """Keys of new rows: from the values the statement bound, the primary keys SQLAlchemy reports
    for them, and (for fields neither has, such as server defaults) a read by primary key.

    An executemany INSERT without RETURNING gets no primary keys back. Its rows are then found
    again by the values they were given (``IS NOT DISTINCT FROM`` each plain value), among the
    rows above the largest integer primary key read just before the INSERT when that finds them
    all (an autoincrement in step with the table), else in the whole table. Extra rows that match
    cost an extra invalidation each. ``insert().from_select()`` binds no row values: its new rows
    are the rows above that largest primary key.
    """

    __slots__ = ("floor", "from_select", "multi", "table")

    def __init__(self, dml: Any, *args: Any) -> None:
        super().__init__(*args)
        self.table = dml.table
        self.floor: Any = _MISSING
        self.from_select = getattr(dml, "select", None) is not None
        self.multi = _multi_values(dml, self.table)
        pk_cols = list(self.mapper.primary_key)
        if (
            (len(self.params) > 1 or self.from_select)
            and len(pk_cols) == 1
            and not dml._returning
            and not getattr(dml, "_return_defaults", False)
            and _attr_key(self.mapper, pk_cols[0]) not in self.params[0]
            and pk_cols[0].key not in self.params[0]
            and _is_integer(pk_cols[0])
        ):
            col = self.keysel.columns[0]
            sel = select(func.max(col)).select_from(self.keysel.from_)
            self.floor = self.keysel.read(self.conn, sel, {}, self.options)[0][0]

    def after(self, result: Any) -> None:
        fields = _fields(self.specs)
        mapper = self.mapper
        if self.from_select:
            self.add(self.keysel.keys(self.specs, self._rows_above_floor()))
            return
        try:
            bound: Sequence[Mapping[str, Any]] = self.multi or list(
                result.context.compiled_parameters
            )
        except Exception:
            bound = []
        try:
            pk_rows: list[Any] = list(result.inserted_primary_key_rows)
        except Exception:
            pk_rows = []
        attrs = _column_attrs(mapper, self.table)
        pk_keys = [_attr_key(mapper, c) for c in mapper.primary_key]
        keys: list[str] = []
        lookups: list[tuple[Any, ...]] = []
        unknown: list[dict[str, Any]] = []
        for i, params in enumerate(bound):
            values = {attrs[name]: value for name, value in params.items() if name in attrs}
            if i < len(pk_rows) and pk_rows[i] is not None:
                for key, value in zip(pk_keys, pk_rows[i], strict=False):
                    if value is not None:
                        values[key] = value
            if all(f in values for f in fields):
                keys.extend(_keys(self.specs, values))
            elif all(values.get(k) is not None for k in pk_keys):
                lookups.append(tuple(values[k] for k in pk_keys))
            else:
                unknown.append(values)
        rows: list[tuple[Any, ...]] = []
        if lookups:
            rows.extend(self.keysel.read_by_pk(self.conn, lookups, self.options))
        if unknown:
            rows.extend(self._rows_like(unknown))
        self.add(keys + self.keysel.keys(self.specs, rows))

    def _rows_above_floor(self) -> list[tuple[Any, ...]]:
        if self.floor is _MISSING:
            log.warning(
                "INSERT ... FROM SELECT into tracked %s: the new rows cannot be told from the "
                "others (no integer primary key), so their keys are not invalidated; declare them "
                "with invalidate_on_commit()",
                self.mapper.class_.__name__,
            )
            return []
        above = self.keysel.columns[0] > self.floor if self.floor is not None else None
        return self.keysel.read(self.conn, self.keysel.where(above, lock=False), {}, self.options)

    def _rows_like(self, rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        """Rows holding the values that ``rows`` were inserted with."""
        mapper = self.mapper
        matchers: list[Any] = []
        for values in rows:
            terms = [
                mapper.columns[attr].is_not_distinct_from(value)
                for attr, value in values.items()
                if attr in mapper.columns and isinstance(value, _COMPARABLE)
            ]
            if not terms:
                log.warning(
                    "bulk INSERT into tracked %s: a new row has no primary key and no plain "
                    "value to find it by, so its keys are not invalidated (a cached miss for "
                    "them lasts until its TTL); pass the primary keys or add .returning()",
                    mapper.class_.__name__,
                )
                continue
            matchers.append(and_(*terms))
        if not matchers:
            return []
        width = max(1, len(matchers[0].clauses) if hasattr(matchers[0], "clauses") else 1)
        found: list[tuple[Any, ...]] = []
        if self.floor is not _MISSING and self.floor is not None:
            above = self.keysel.columns[0] > self.floor
            found = self._read_matching(matchers, width, above)
            if len(found) >= len(matchers):
                return found
        return self._read_matching(matchers, width, None)

    def _read_matching(self, matchers: list[Any], width: int, floor: Any) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        for chunk in _in_chunks(self.conn, matchers, width):
            criteria = or_(*chunk) if floor is None else and_(floor, or_(*chunk))
            sel = self.keysel.where(criteria, lock=False)
            out.extend(self.keysel.read(self.conn, sel, {}, self.options))
        return list(dict.fromkeys(out))


# Values an INSERT's row can be found again by (equality is exact for them in every database).
_COMPARABLE = (str, int, bool, bytes, uuid.UUID, datetime.date, datetime.time, decimal.Decimal)


def _multi_values(dml: Any, table: Any) -> list[dict[str, Any]]:
    """The rows of ``insert().values([...])`` by column key (its binds are named ``x_m0``, ``x_m1``
    ...), plain values only; empty for any other INSERT."""
    multi = getattr(dml, "_multi_values", None) or ()
    rows: list[dict[str, Any]] = []
    for row in multi[0] if multi else ():
        if isinstance(row, Mapping):
            items = [
                (k if isinstance(k, str) else getattr(k, "key", None), v) for k, v in row.items()
            ]
        else:
            items = [(c.key, v) for c, v in zip(table.c, row, strict=False)]
        rows.append({k: v for k, v in items if k is not None and not isinstance(v, ClauseElement)})
    return rows


def _column_attrs(mapper: Mapper[Any], table: Any) -> dict[str, str]:
    """Bind names of an INSERT into ``table`` (its column keys) -> the mapped attribute names."""
    attrs: dict[str, str] = {}
    for col in table.c:
        try:
            attrs[col.key] = _attr_key(mapper, col)
        except UnmappedColumnError:
            continue  # a column of the table that this mapper does not map
    return attrs


def _is_integer(col: Any) -> bool:
    try:
        return col.type.python_type is int
    except NotImplementedError:
        return False
