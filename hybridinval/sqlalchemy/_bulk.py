"""Bulk statements, observed at the Core level.

ORM-enabled INSERT/UPDATE/DELETE statements are watched where they reach the database: the
engine's ``before_execute``/``after_execute`` events, for connections that an installed session
began. By then SQLAlchemy has autoflushed, every ``do_orm_execute`` hook has shaped the statement
and its parameters, the shard's connection has been chosen and the execution options (schema
translation) are final. The statement itself is never changed: its WHERE is reused in a SELECT
of the key columns that runs just before it, on the same connection, in the same transaction
(:mod:`._keyselect`, :mod:`._bulk_update`, :mod:`._bulk_insert`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapper
from sqlalchemy.sql.expression import UpdateBase

from ._bulk_insert import _InsertWatch
from ._bulk_update import _UpdateDeleteWatch
from ._keyselect import _KeySelect, _Watch
from ._registry import registry
from ._templates import _specs_for


def _orm_dml(elem: Any) -> tuple[Any, Mapper[Any]] | None:
    """The DML statement and its mapper, for an ORM-enabled INSERT/UPDATE/DELETE (also one
    wrapped in ``select(Entity).from_statement(...)``); None for anything else."""
    if not isinstance(elem, UpdateBase):
        elem = getattr(elem, "element", None)  # select(Entity).from_statement(dml)
        if not isinstance(elem, UpdateBase):
            return None
    subject = elem._propagate_attrs.get("plugin_subject")
    if subject is None:
        return None
    mapper = getattr(subject, "mapper", None)
    if not isinstance(mapper, Mapper):
        return None
    return elem, mapper


def _param_sets(multiparams: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> list[Any]:
    return list(multiparams) if multiparams else [params]


# Execution options that belong to the ORM statement itself, or that a Connection accepts only
# through Connection.execution_options() (they are in force on the connection anyway).
_UNFORWARDED_OPTIONS = frozenset(
    {
        "autoflush",
        "dml_strategy",
        "identity_token",
        "is_delete_using",
        "is_update_from",
        "populate_existing",
        "render_nulls",
        "synchronize_session",
        "isolation_level",
        "postgresql_readonly",
        "postgresql_deferrable",
        "logging_token",
    }
)


def _forwarded_options(execution_options: Mapping[str, Any]) -> dict[str, Any]:
    """The statement's execution options, for the SELECTs that read its keys: the user's own
    (``schema_translate_map``, options that hooks and listeners look for), not the ORM's."""
    return {
        k: v
        for k, v in execution_options.items()
        if not k.startswith("_") and k not in _UNFORWARDED_OPTIONS
    }


# Bound once (the registry never rebinds them): read for every statement of a watched engine.
_uow_by_connection = registry.uow_by_connection
_uow_by_connection_data = registry.uow_by_connection_data


def _on_before_execute(
    conn: Connection,
    clauseelement: Any,
    multiparams: Sequence[Mapping[str, Any]],
    params: Mapping[str, Any],
    execution_options: Mapping[str, Any],
) -> None:
    if not _uow_by_connection_data:
        return
    ref = _uow_by_connection.get(conn)
    if ref is None:
        return
    found = _orm_dml(clauseelement)
    if found is None:
        return
    uow = ref()
    session = uow.session() if uow is not None and uow.session is not None else None
    if uow is None or session is None or uow.primary is None:
        return
    dml, mapper = found
    specs = _specs_for(mapper.class_)
    if not specs:
        return
    keysel = _KeySelect(mapper, specs, dml)
    args = (
        conn,
        uow,
        session,
        mapper,
        specs,
        keysel,
        _param_sets(multiparams, params),
        _forwarded_options(execution_options),
    )
    watch: _Watch = _InsertWatch(dml, *args) if dml.is_insert else _UpdateDeleteWatch(dml, *args)
    uow.watches[id(clauseelement)] = watch


def _on_after_execute(
    conn: Connection,
    clauseelement: Any,
    multiparams: Any,
    params: Any,
    execution_options: Any,
    result: Any,
) -> None:
    if not _uow_by_connection_data:
        return
    ref = _uow_by_connection.get(conn)
    uow = ref() if ref is not None else None
    if uow is None or not uow.watches:
        return
    watch = uow.watches.pop(id(clauseelement), None)
    if watch is not None:
        watch.after(result)
