"""Key templates and tracked models: ``track()``, ``untrack()``, and the lookups the listeners
make (the templates that apply to a class, the keys of a row)."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Column, inspect
from sqlalchemy.orm import Mapper

from ._registry import registry

# The value of a key field that is not known (not loaded, not assigned yet, set by the database).
_MISSING: Any = object()


class _KeyTemplate:
    """One ``track()`` key template, parsed once: ``"user_by_email:{email}"``."""

    __slots__ = ("fields", "parts", "text")

    def __init__(self, text: str, owner: type, columns: Mapping[str, Any]) -> None:
        if type(text) is not str:
            raise TypeError(
                f"track({owner.__name__}): key templates must be str, got "
                f"{type(text).__name__}: {text!r:.100}"
            )
        if not text:
            raise ValueError(f"track({owner.__name__}): empty key template")
        self.text = text
        parts: list[tuple[str, str | None, str, str | None]] = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ValueError(
                f"track({owner.__name__}): key template {text!r} is not a valid format string: "
                f"{exc}"
            ) from exc
        for literal, field, spec, conversion in parsed:
            if field is not None:
                if not field.isidentifier():
                    raise ValueError(
                        f"track({owner.__name__}): key template {text!r} has placeholder "
                        f"{{{field}}}; placeholders must name a column attribute, like {{id}}"
                    )
                if field not in columns or not isinstance(columns[field], Column):
                    known = ", ".join(k for k, c in columns.items() if isinstance(c, Column))
                    raise ValueError(
                        f"track({owner.__name__}): key template {text!r} names field "
                        f"{field!r}, which is not a column attribute of {owner.__name__} "
                        f"(columns: {known})"
                    )
                if spec and "{" in spec:
                    raise ValueError(
                        f"track({owner.__name__}): key template {text!r}: nested placeholders "
                        f"in a format spec are not supported"
                    )
            parts.append((literal, field, spec or "", conversion))
        self.parts = tuple(parts)
        self.fields = tuple(dict.fromkeys(p[1] for p in parts if p[1] is not None))

    def format(self, values: Mapping[str, Any]) -> str:
        return "".join(
            literal + (_format_field(values[field], spec, conv) if field is not None else "")
            for literal, field, spec, conv in self.parts
        )

    def pattern(self, values: Mapping[str, Any]) -> re.Pattern[str]:
        """A regex for every key this template could yield, ``_MISSING`` values being unknown."""
        out = []
        for literal, field, spec, conv in self.parts:
            out.append(re.escape(literal))
            if field is not None:
                value = values.get(field, _MISSING)
                out.append(
                    "(?s:.*)" if value is _MISSING else re.escape(_format_field(value, spec, conv))
                )
        return re.compile("".join(out))


def _format_field(value: Any, spec: str, conversion: str | None) -> str:
    if conversion == "r":
        value = repr(value)
    elif conversion == "a":
        value = ascii(value)
    elif conversion == "s":
        value = str(value)
    return format(value, spec)


class _ModelSpec:
    """What ``track()`` recorded for one mapped class."""

    __slots__ = ("fields", "templates")

    def __init__(self, templates: tuple[_KeyTemplate, ...]) -> None:
        self.templates = templates
        self.fields = tuple(dict.fromkeys(f for t in templates for f in t.fields))


# Bound once (the registry never rebinds it): read for every row a flush writes.
_specs_by_class = registry.specs_by_class


def track(
    model: type,
    keys: Sequence[str],
    tags: Sequence[str] = (),
) -> None:
    """Invalidate ``keys`` (format templates over ``model``'s column attributes) whenever a row
    of ``model`` is inserted, updated or deleted through an installed session.

    A template without placeholders (``"users:all"``) is invalidated by any change to any row.
    Calling ``track()`` again for the same model replaces its templates. Subclasses (mapped
    inheritance) inherit their tracked bases' templates.

    ``tags`` are not supported yet and must be empty: tag invalidation needs a cross-process
    index that the core does not have, and accepting tags that never invalidate anything would
    be a silent correctness trap. A constant template gives the same invalidation today.
    """
    if tags:
        raise ValueError(
            f"track({getattr(model, '__name__', model)!r}): tags={list(tags)!r} are not "
            f"supported yet; use a constant key template instead, e.g. keys=[..., 'users:all']"
        )
    if not isinstance(model, type):
        raise TypeError(f"track() needs a mapped class, got {model!r:.100}")
    mapper: Any = inspect(model, raiseerr=False)
    if not isinstance(mapper, Mapper):
        raise TypeError(f"track(): {model.__name__} is not a mapped SQLAlchemy class")
    if isinstance(keys, str) or not isinstance(keys, Sequence):
        raise TypeError(
            f"track({model.__name__}): keys must be a list of templates, got {keys!r:.100}"
        )
    if not keys:
        raise ValueError(f"track({model.__name__}): keys must name at least one template")
    # mapper.columns is keyed by attribute name and is complete before mapper configuration, so
    # track() can run right after the class statement, before related classes exist.
    columns = dict(mapper.columns.items())
    spec = _ModelSpec(tuple(_KeyTemplate(text, model, columns) for text in keys))
    # Imported here rather than at the top: _flush imports this module for the templates.
    from ._flush import _install_mapper_listeners

    with registry.lock:
        _install_mapper_listeners()
        registry.tracked[model] = spec
        registry.specs_by_class.clear()


def untrack(model: type) -> None:
    """Stop invalidating keys for ``model`` (mostly for tests). Idempotent."""
    with registry.lock:
        registry.tracked.pop(model, None)
        registry.specs_by_class.clear()


def _specs_for(cls: type) -> tuple[_ModelSpec, ...]:
    specs = _specs_by_class.get(cls)
    if specs is None:
        with registry.lock:
            tracked = registry.tracked
            specs = tuple(tracked[c] for c in cls.__mro__ if c in tracked)
            _specs_by_class[cls] = specs
    return specs


def _keys(specs: Iterable[_ModelSpec], values: Mapping[str, Any]) -> list[str]:
    """The keys of every template whose fields ``values`` has (a row that is gone has none)."""
    return [
        t.format(values)
        for spec in specs
        for t in spec.templates
        if all(f in values for f in t.fields)
    ]


def _fields(specs: Iterable[_ModelSpec]) -> list[str]:
    return list(dict.fromkeys(f for spec in specs for f in spec.fields))


def _attr_key(mapper: Mapper[Any], column: Any) -> str:
    key: str = mapper.get_property_by_column(column).key
    return key


def _row_keys(
    specs: tuple[_ModelSpec, ...], fields: list[str], rows: Iterable[Sequence[Any]]
) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys.extend(_keys(specs, dict(zip(fields, row, strict=True))))
    return keys
