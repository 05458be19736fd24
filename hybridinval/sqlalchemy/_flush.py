"""Flush listeners: the keys of the rows a flush writes, from mapper events on ``Mapper`` itself
(``after_insert``, ``before_update``, ``after_update``, ``before_delete``), so cascades and orphan
deletes count."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, event, inspect, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.state import InstanceState

from ..errors import UntrackableRowError
from . import _keyselect
from ._frames import _uow_for
from ._templates import _MISSING, _attr_key, _fields, _keys, _ModelSpec, _specs_for

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from ._frames import _UnitOfWork

log = logging.getLogger("hybridinval.sqlalchemy")


def _install_mapper_listeners() -> None:
    """Listen on Mapper itself: every mapped class, including subclasses mapped later. Each
    listener returns after a dict lookup for classes nobody tracked. Checked on every track(),
    so listeners that a test suite cleared globally (``Mapper.dispatch._clear()``) come back."""
    for name, listener in _MAPPER_LISTENERS:
        if not event.contains(Mapper, name, listener):
            event.listen(Mapper, name, listener)


def _flush_context(
    mapper: Mapper[Any], target: Any
) -> tuple[InstanceState[Any], Session, _UnitOfWork, tuple[_ModelSpec, ...]] | None:
    specs = _specs_for(mapper.class_)
    if not specs:
        return None
    state: InstanceState[Any] = inspect(target)
    session = state.session
    if session is None:
        return None
    uow = _uow_for(session)
    if uow is None:
        return None
    return state, session, uow, specs


_ValuesReader = Callable[
    [InstanceState[Any], Mapper[Any], tuple["_ModelSpec", ...], Connection], dict[str, Any]
]
_MapperListener = Callable[[Mapper[Any], Connection, Any], None]


def _key_collector(read_values: _ValuesReader) -> _MapperListener:
    """A mapper listener adding the keys of ``target`` as ``read_values`` sees its row."""

    def collect(mapper: Mapper[Any], connection: Connection, target: Any) -> None:
        ctx = _flush_context(mapper, target)
        if ctx is not None:
            state, session, uow, specs = ctx
            uow.add(session, _keys(specs, read_values(state, mapper, specs, connection)))

    return collect


def _old_values(
    state: InstanceState[Any],
    mapper: Mapper[Any],
    specs: tuple[_ModelSpec, ...],
    connection: Connection,
) -> dict[str, Any]:
    """Key fields as the row holds them now, before this flush writes it."""

    def known(field: str) -> Any:
        history = state.attrs[field].history
        if history.deleted:
            return history.deleted[0]
        if history.unchanged:
            return history.unchanged[0]
        return _MISSING  # expired, deferred, or set without loading the old value

    def pk() -> Sequence[Any]:
        if state.identity is None:
            raise UntrackableRowError(f"cannot read old key fields of {state.obj()!r}: no identity")
        return state.identity

    return _key_fields(specs, known, mapper, connection, pk)


def _current_values(
    state: InstanceState[Any],
    mapper: Mapper[Any],
    specs: tuple[_ModelSpec, ...],
    connection: Connection,
) -> dict[str, Any]:
    """Key fields as this flush left the row (after its INSERT or UPDATE)."""
    current = state.dict

    def pk() -> Sequence[Any]:
        values = tuple(
            current.get(mapper.get_property_by_column(c).key) for c in mapper.primary_key
        )
        if any(v is None for v in values) and state.identity is not None:
            # Expired (a parent flushed only for a backref after a commit): its identity is
            # still the row, and nothing in this flush changed its primary key.
            return state.identity
        return values

    # Missing: a server default/onupdate, or a SQL expression assigned.
    return _key_fields(specs, lambda f: current.get(f, _MISSING), mapper, connection, pk)


# Old values before UPDATE/DELETE, new values after INSERT/UPDATE: a changed key field
# invalidates both the key it had and the key it has.
_old_keys, _new_keys = _key_collector(_old_values), _key_collector(_current_values)
_MAPPER_LISTENERS: tuple[tuple[str, _MapperListener], ...] = (
    ("after_insert", _new_keys),
    ("before_update", _old_keys),
    ("after_update", _new_keys),
    ("before_delete", _old_keys),
)


def _key_fields(
    specs: tuple[_ModelSpec, ...],
    known: Callable[[str], Any],
    mapper: Mapper[Any],
    connection: Connection,
    pk: Callable[[], Sequence[Any]],
) -> dict[str, Any]:
    """The specs' key fields: ``known(field)`` where it knows them (else ``_MISSING``), a
    primary-key field from ``pk()`` (the identity of an expired object: no query), and the rest
    in one SELECT by primary key."""
    values: dict[str, Any] = {}
    missing: list[str] = []
    for field in _fields(specs):
        value = known(field)
        if value is _MISSING:
            missing.append(field)
        else:
            values[field] = value
    if missing:
        key = tuple(pk())
        pk_fields = [_attr_key(mapper, c) for c in mapper.primary_key]
        for field, value in zip(pk_fields, key, strict=False):
            if field in missing and value is not None:
                values[field] = value
                missing.remove(field)
        if missing:
            values.update(_select_row(mapper, connection, missing, key))
    return values


def _select_row(
    mapper: Mapper[Any], connection: Connection, fields: list[str], pk: Sequence[Any]
) -> dict[str, Any]:
    # Mapper flush events may emit SQL on the flush connection (not through the Session).
    columns = [mapper.columns[f] for f in fields]
    criteria = [col == value for col, value in zip(mapper.primary_key, pk, strict=True)]
    stmt = select(*columns).select_from(mapper.persist_selectable).where(and_(*criteria))
    # Through the module: every read for keys goes through _keyselect._read_rows.
    rows = _keyselect._read_rows(connection, stmt, {}, {})
    row = rows[0] if rows else None
    if row is None:
        # Gone (deleted by another transaction that committed, and published, first): no key
        # of it can be read, and SQLAlchemy reports the stale row in its own way.
        log.debug(
            "key fields %s of %s %r: the row is gone", fields, mapper.class_.__name__, tuple(pk)
        )
        return {}
    return dict(zip(fields, row, strict=True))
