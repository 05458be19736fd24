"""The SQLAlchemy unit of work: publish the keys a transaction changed, once, after it commits.

Usage::

    from hybridinval.sqlalchemy import install, invalidate_on_commit, track

    track(User, keys=["user:{id}", "user_by_email:{email}"])
    install(SessionFactory, cache)          # sessionmaker, scoped_session, Session subclass,
                                            # async_sessionmaker or AsyncSession subclass
    with SessionFactory.begin() as session:
        session.get(User, 1).email = "new@example.com"
        invalidate_on_commit(session, "report:42")
    # commit() returned: user:1, user_by_email:<old>, user_by_email:<new> and report:42 are gone
    # from L2 and from every process's L1.

    scoped = cache.for_session(session)
    scoped.get_or_set("user:1", lambda: load_user(session, 1))

How keys are collected
    * Rows the ORM writes at flush (mapper ``after_insert``/``before_update``/``after_update``/
      ``before_delete`` events, so cascades and orphan deletes count): old values (from
      attribute history, or a SELECT on the flush connection when an old value was never
      loaded) and new values. Changing ``email`` invalidates both e-mail keys.
    * Relationships: a foreign-key column is a column like any other, so to invalidate a
      parent's "children" entry name the foreign key in the *child's* template
      (``track(Address, keys=["user_addresses:{user_id}"])``): moving a child invalidates the old
      and the new parent. A tracked object that SQLAlchemy flushes as dirty only because one of its
      collections changed (``user.addresses.append(a)``) also has its own keys invalidated,
      because cached values commonly embed the children.
    * Bulk ``session.execute(update(User)...)``/``delete(...)``/``insert(...)`` (also inside
      ``select(User).from_statement(...)``): watched where the statement reaches the database
      (the engine's ``before_execute``/``after_execute``), after SQLAlchemy's autoflush, every
      ``do_orm_execute`` hook, the shard's connection and the final execution options. The
      statement is never changed. Just before it, on its connection and in its transaction, a
      SELECT of the key columns with the statement's own WHERE, locked (``FOR UPDATE OF`` the
      target; SQLite's write lock is taken first), gives the old keys; an UPDATE that may change
      a key field has the same rows read again by primary key afterwards. A row that starts to
      match in between (READ COMMITTED) shows in the statement's row count and is read as
      committed through a second connection. INSERT keys come from the values bound, the
      primary keys SQLAlchemy reports and, for fields neither has, the new rows read back. These
      reads are ordinary statements on the session's connection: the engine's listeners see
      them (a statement counter counts them), and rewriting listeners apply to them too.
    * ``invalidate_on_commit(session, *keys)`` for anything else (raw SQL, derived values).

After-commit work
    ``on_commit(session, fn)`` and ``enqueue_on_commit(session, celery_task_or_signature)``
    run after the root commit *and* its invalidations, so a task never reads the old value
    from any cache; they follow the same frames (dropped with a rolled-back SAVEPOINT).

When keys are published
    Keys live in a stack of frames, one per real transaction (root or SAVEPOINT). A released
    SAVEPOINT merges its keys into its parent; a rolled-back one drops them. When the *root*
    transaction commits, all keys go out in one ``cache.invalidate_committed(keys)`` call per
    cache: one Redis round trip, and this process's L1 is evicted before ``commit()`` returns.
    A session joined to an outer connection-level transaction that it does not control
    (``join_transaction_mode`` other than ``"control_fully"``) hands its keys to that outer
    transaction instead: they are published right after the outer COMMIT reaches the database
    and dropped if it rolls back. If a connection is lost before the outcome is known (a
    disconnect during COMMIT makes ``commit()`` raise although the database may have committed),
    the keys are published anyway: an invalidation of unchanged data costs one miss.

Reading through a session (:class:`SessionCache`)
    A key the session has pending changes to (unflushed objects, flushed frames, keys handed to
    an open outer transaction) is loaded from the database and not cached. Neither is any key
    while the session's transaction may hold a snapshot older than the L2 version a fill would
    compare against (REPEATABLE READ/SERIALIZABLE once a statement ran, or an SQLite
    transaction that the driver did not open for a write): such a loader would read data older
    than the invalidations it was checked against. READ COMMITTED, a transaction that has not
    run a statement yet, and pysqlite's default write transactions (which hold the database
    write lock, so nobody else can commit under them) keep caching.

Not seen (declare their keys with ``invalidate_on_commit``)
    Raw SQL (``text()``), Core statements on tables rather than mapped classes, the legacy
    ``Session.bulk_save_objects``/``bulk_*_mappings`` methods (SQLAlchemy fires no event for
    them), the old key values of rows an ``INSERT ... ON CONFLICT DO UPDATE`` changes, the
    new key values of a bulk UPDATE that changes primary keys, a bulk UPDATE/DELETE whose WHERE
    reads a data-modifying CTE, and ``insert().from_select()`` into a table without an integer
    primary key (each logged when it happens). The isolation level is
    read once per DBAPI connection; a level changed by raw ``SET`` statements is not noticed.

This module must never publish a key before the COMMIT that made it stale has reached the
database (not at flush, not at SAVEPOINT release, not when a joined session "commits"), never
let a failed publish raise out of ``commit()``, and never store in L1 or L2 a value read through
a session that could see uncommitted or outdated rows for it. It never changes a statement
the application runs, never refuses one SQLAlchemy accepts, and reads only in the session's own
transaction (the one exception: rows that started to match a bulk statement late are read as
committed on a second connection of the same engine, read-only).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import decimal
import logging
import re
import string
import threading
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Column, UniqueConstraint, and_, event, func, inspect, or_, select, tuple_
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.orm import Mapper, Session, scoped_session, sessionmaker
from sqlalchemy.orm.exc import UnmappedColumnError
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.pool import AssertionPool, SingletonThreadPool, StaticPool
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.expression import CTE, BindParameter, ClauseElement, UpdateBase

from ..errors import (
    SessionNotInstalledError,
    SQLAlchemyIntegrationError,
    TransactionStateError,
    UntrackableRowError,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import SessionTransaction

    from .._cache import HybridCache

__all__ = [
    "Installation",
    "SQLAlchemyIntegrationError",
    "SessionCache",
    "SessionNotInstalledError",
    "TransactionStateError",
    "UntrackableRowError",
    "enqueue_on_commit",
    "install",
    "invalidate_on_commit",
    "on_commit",
    "track",
    "untrack",
]

log = logging.getLogger("hybridinval.sqlalchemy")

T = TypeVar("T")

_INFO_KEY = "hybridinval.sqlalchemy"
_ISOLATION_INFO_KEY = "hybridinval.isolation_level"
# Isolation levels under which every statement takes a fresh snapshot: a loader that starts after
# the L2 version was read sees every commit published before that read.
_PER_STATEMENT_SNAPSHOT = frozenset({"READ COMMITTED", "READ UNCOMMITTED", "AUTOCOMMIT"})
_MISSING: Any = object()


# -- process state -----------------------------------------------------------------------------


class _Registry:
    """Everything the integration keeps for the whole process, in one object: :data:`registry`.

    Its containers are made here once and never rebound, only changed in place, so a hot path
    (every statement, every read, every flushed row) may bind one to a module-level name at
    import time instead of looking it up through the registry each time. ``generation`` is the
    one value that is rebound: read it as ``registry.generation``.

    ``lock`` guards every change that must be seen whole: tracking (``tracked`` with
    ``specs_by_class``), installing (``installations`` with ``generation``) and listening on an
    engine (``watched_engines``). The per-statement and per-read paths read without it.
    """

    __slots__ = (
        "generation",
        "installations",
        "lock",
        "outer_pending",
        "outer_pending_data",
        "specs_by_class",
        "tracked",
        "uow_by_connection",
        "uow_by_connection_data",
        "warned_dialects",
        "watched_engines",
    )

    def __init__(self) -> None:
        self.lock = threading.RLock()
        # track(): the templates of each tracked class. Weak on the classes: a declarative
        # registry that is disposed (tests, plugins) frees its classes.
        self.tracked: weakref.WeakKeyDictionary[type, _ModelSpec] = weakref.WeakKeyDictionary()
        # Templates that apply to a class, its own and its tracked bases' (inheritance): computed
        # on first use, cleared on every track()/untrack().
        self.specs_by_class: weakref.WeakKeyDictionary[type, tuple[_ModelSpec, ...]] = (
            weakref.WeakKeyDictionary()
        )
        # install(): the live installations in the order they were made; the first one that
        # covers a session is its primary.
        self.installations: list[Installation] = []
        # Moved on every install and uninstall: a session's unit of work remembers which
        # installations cover it, and looks again when this has moved.
        self.generation = 0
        # The unit of work of each connection an installed session began. Values are weak
        # references: a unit of work holds its connections, and a strong value would keep its
        # own key alive (and the pooled connection of an abandoned session checked out for ever).
        self.uow_by_connection: weakref.WeakKeyDictionary[Connection, weakref.ref[_UnitOfWork]] = (
            weakref.WeakKeyDictionary()
        )
        # Its underlying dict, for the per-statement emptiness test (WeakKeyDictionary's own
        # __len__ is Python code).
        self.uow_by_connection_data: dict[Any, Any] = self.uow_by_connection.data  # type: ignore[attr-defined]
        # Engines whose statements are watched (handle_error, before_execute and after_execute
        # are listened on once per engine). Weak: a disposed engine is freed.
        self.watched_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
        # Keys and callbacks that joined sessions handed to the outer connection-level
        # transaction of each connection: published after its COMMIT, dropped on ROLLBACK.
        self.outer_pending: weakref.WeakKeyDictionary[Connection, _OuterPending] = (
            weakref.WeakKeyDictionary()
        )
        # Its underlying dict, for the per-read emptiness test.
        self.outer_pending_data: dict[Any, _OuterPending] = self.outer_pending.data  # type: ignore[attr-defined]
        # Dialects already warned about (they override do_commit()): one warning per process.
        self.warned_dialects: set[str] = set()

    def add_installation(self, installation: Installation) -> None:
        """Register ``installation`` after the others; every session looks again."""
        with self.lock:
            self.installations.append(installation)
            self.generation += 1

    def remove_installation(self, installation: Installation) -> None:
        """Forget ``installation`` (idempotent); every session looks again."""
        with self.lock:
            if installation in self.installations:
                self.installations.remove(installation)
            self.generation += 1


registry = _Registry()
# Bound once (the registry never rebinds it): read on every read through a session.
_outer_pending_data = registry.outer_pending_data


# -- key templates and tracked models --------------------------------------------------------


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


# -- per-session state: the frame stack --------------------------------------------------------


class _Frame:
    """What one real transaction collected: keys (an insertion-ordered dict as an ordered set)
    and callbacks to run after the root commit has been published."""

    __slots__ = ("callbacks", "keys")

    def __init__(self) -> None:
        self.keys: dict[str, None] = {}
        self.callbacks: list[Callable[[], object]] = []

    def merge(self, other: _Frame) -> None:
        self.keys.update(other.keys)
        self.callbacks.extend(other.callbacks)

    def __bool__(self) -> bool:
        return bool(self.keys or self.callbacks)


class _UnitOfWork:
    """The pending invalidations of one session, kept in ``session.info``.

    ``frames`` maps each real transaction (root or SAVEPOINT, never SQLAlchemy's internal
    subtransactions) to what was collected while it was the innermost one. ``connections`` are
    the connections the current root transaction began, for the outer-transaction and snapshot
    checks.
    """

    __slots__ = (
        "__weakref__",
        "caches",
        "connections",
        "frames",
        "generation",
        "max_key_length",
        "outcome_unknown",
        "primary",
        "session",
        "watches",
    )

    def __init__(self, session: Session) -> None:
        # Weak: the session holds this object in its info dict.
        self.session: weakref.ref[Session] | None = weakref.ref(session)
        # Bulk statements between their before_execute and after_execute, by id().
        self.watches: dict[int, _Watch] = {}
        self.frames: dict[SessionTransaction, _Frame] = {}
        self.connections: list[Connection] = []
        # Set when a connection of the current root transaction was lost: if that happened
        # during COMMIT, the transaction may have committed although commit() raised.
        self.outcome_unknown = False
        self.caches: tuple[HybridCache, ...] = ()
        self.primary: Installation | None = None
        self.generation = -1
        self.max_key_length = 0

    def frame(self, session: Session) -> _Frame:
        trans = session.get_nested_transaction() or session.get_transaction()
        if trans is None:
            raise TransactionStateError(
                "no transaction is in progress on this session; call session.begin() first"
            )
        frame = self.frames.get(trans)
        if frame is None:
            frame = self.frames[trans] = _Frame()
        return frame

    def add(self, session: Session, keys: Iterable[str]) -> None:
        frame = self.frame(session)
        batch = list(keys)
        limit = self.max_key_length
        for key in batch:
            # Checked now, at flush, so that a bad key fails the flush (and the transaction can
            # roll back) instead of failing the publish after the commit.
            if not key or len(key) > limit:
                raise ValueError(
                    f"cache key {key[:64]!r} is {len(key)} characters long; keys must be "
                    f"1..{limit} characters"
                )
        frame.keys.update(dict.fromkeys(batch))

    def collected(self) -> _Frame:
        """Everything in every frame, in order (for the root's commit or its unknown outcome)."""
        out = _Frame()
        for frame in self.frames.values():
            out.merge(frame)
        return out

    def has_key(self, key: str) -> bool:
        """Whether ``key`` was collected in this transaction (or handed to an open outer one)."""
        for frame in self.frames.values():
            if key in frame.keys:
                return True
        if not _outer_pending_data:
            return False
        for conn in self.connections:
            outer = registry.outer_pending.get(conn)
            if outer is not None and key in outer.keys:
                return True
        return False


def _sync_session(session: Any) -> Session:
    """The ORM Session behind ``session`` (an AsyncSession runs its events on one)."""
    if isinstance(session, Session):
        return session
    inner = getattr(session, "sync_session", None)
    if isinstance(inner, Session):
        return inner
    raise TypeError(f"expected a SQLAlchemy Session or AsyncSession, got {session!r:.100}")


def _uow_for(session: Session) -> _UnitOfWork | None:
    """The session's unit of work, or None if no installation covers its class."""
    uow: _UnitOfWork | None = session.info.get(_INFO_KEY)
    if uow is not None and uow.generation == registry.generation:
        return uow if uow.primary is not None else None
    with registry.lock:
        matching = [i for i in registry.installations if isinstance(session, i.session_class)]
        if uow is None:
            uow = _UnitOfWork(session)
            session.info[_INFO_KEY] = uow
        uow.generation = registry.generation
        uow.primary = matching[0] if matching else None
        uow.caches = tuple({id(i.cache): i.cache for i in matching}.values())
        uow.max_key_length = min((c.max_key_length for c in uow.caches), default=0)
    return uow if uow.primary is not None else None


# -- installation: session-level events --------------------------------------------------------


class Installation:
    """What :func:`install` returns: the listeners on one session class, and their counters.

    Several installations may cover one session (a base class and a sessionmaker, two caches):
    the first registered does the work for all of them and publishes to every cache.
    """

    def __init__(self, session_class: type[Session], cache: HybridCache) -> None:
        self.session_class = session_class
        self.cache = cache
        self._stats = dict.fromkeys(
            (
                "commits_published",
                "keys_published",
                "commits_deferred",
                "frames_dropped",
                "outer_publishes",
                "outer_drops",
                "bypassed_reads",
                "callbacks_run",
                "callback_failures",
            ),
            0,
        )
        self._listeners: list[tuple[str, Callable[..., Any]]] = [
            ("after_begin", self._after_begin),
            ("after_commit", self._after_commit),
            ("after_transaction_end", self._after_transaction_end),
        ]
        self.installed = False

    def _install(self) -> None:
        for name, fn in self._listeners:
            event.listen(self.session_class, name, fn)
        registry.add_installation(self)
        self.installed = True

    def uninstall(self) -> None:
        """Remove the listeners. Keys pending in open transactions are dropped. Idempotent."""
        if not self.installed:
            return
        self.installed = False
        registry.remove_installation(self)
        for name, fn in self._listeners:
            if event.contains(self.session_class, name, fn):
                event.remove(self.session_class, name, fn)

    def stats(self) -> dict[str, int]:
        """Counters since install (this installation acting as the sessions' primary)."""
        return dict(self._stats)

    def __repr__(self) -> str:
        state = "installed" if self.installed else "uninstalled"
        return f"<Installation {self.session_class.__name__} -> {self.cache.namespace} {state}>"

    def _uow(self, session: Session) -> _UnitOfWork | None:
        uow = _uow_for(session)
        return uow if uow is not None and uow.primary is self else None

    # The listeners. Each returns at once unless this installation is the session's primary.

    def _after_begin(self, session: Session, transaction: Any, connection: Connection) -> None:
        uow = self._uow(session)
        if uow is not None and connection not in uow.connections:
            uow.connections.append(connection)
            _watch_connection(connection, uow)
            # Learn the isolation level now, inside the session's own call (where an async
            # driver may do I/O); once per DBAPI connection, later reads hit connection.info.
            _isolation_level(connection, query=True)

    def _after_commit(self, session: Session) -> None:
        # Fires after the database COMMIT of the root *and* after every SAVEPOINT release;
        # only the first is a commit anyone else can see.
        uow = self._uow(session)
        if uow is None:
            return
        trans = session.get_nested_transaction() or session.get_transaction()
        if trans is None:
            return
        if trans.nested:
            frame = uow.frames.pop(trans, None)
            parent = _real_parent(trans)
            if frame and parent is not None:
                parent_frame = uow.frames.get(parent)
                if parent_frame is None:
                    uow.frames[parent] = frame
                else:
                    parent_frame.merge(frame)
            return
        # Root: every SAVEPOINT was released (merged) or rolled back (dropped) before this.
        collected = uow.collected()
        uow.frames.clear()
        if collected:
            self._publish(uow, list(collected.keys), collected.callbacks)

    def _after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        uow = self._uow(session)
        if uow is None:
            return
        # Ended without after_commit (rolled back, or closed while active) unless a root that
        # committed, whose frames after_commit already emptied.
        if transaction.parent is not None:
            dropped = uow.frames.pop(transaction, None)
            if dropped:
                self._stats["frames_dropped"] += 1
                log.debug(
                    "dropped %d key(s) and %d callback(s) of a rolled-back savepoint",
                    len(dropped.keys),
                    len(dropped.callbacks),
                )
            return
        collected = uow.collected()
        uow.frames.clear()
        if collected and uow.outcome_unknown:
            # A connection died, perhaps during COMMIT: the rows may be committed. Invalidating
            # unchanged data costs a miss; a missed invalidation serves stale data. Callbacks
            # (tasks to send) are not run: they must only follow a known commit.
            log.warning(
                "connection lost before the transaction's outcome was known; "
                "invalidating its %d key(s) anyway, dropping %d callback(s)",
                len(collected.keys),
                len(collected.callbacks),
            )
            if collected.keys:
                self._publish(uow, list(collected.keys), [])
        elif collected:
            self._stats["frames_dropped"] += 1
        uow.connections.clear()
        uow.watches.clear()
        uow.outcome_unknown = False

    def _publish(
        self, uow: _UnitOfWork, keys: list[str], callbacks: list[Callable[[], object]]
    ) -> None:
        """Publish a root commit's keys, then run its callbacks; or hand both to an outer
        transaction that is still open."""
        open_outer = [c for c in uow.connections if not c.closed and c.in_transaction()]
        if open_outer:
            # A joined session "committed" while the connection's own transaction continues: the
            # rows are not committed for anyone else yet. (Callbacks ride with the first outer
            # transaction only: they must run once.)
            self._stats["commits_deferred"] += 1
            for i, conn in enumerate(open_outer):
                _defer_to_outer(conn, keys, callbacks if i == 0 else [], uow.caches, self)
            return
        if keys:
            self._stats["commits_published"] += 1
            self._stats["keys_published"] += len(keys)
            _invalidate_committed(uow.caches, keys)
        _run_callbacks(callbacks, self)


def _watch_connection(connection: Connection, uow: _UnitOfWork) -> None:
    registry.uow_by_connection[connection] = weakref.ref(uow)
    engine = getattr(connection, "engine", None)
    if not isinstance(engine, Engine):
        return  # a mock or proxy bind: nothing to listen on, no statements to watch
    watched = registry.watched_engines
    if engine not in watched:
        with registry.lock:
            if engine not in watched:
                event.listen(engine, "handle_error", _on_dbapi_error)
                event.listen(engine, "before_execute", _on_before_execute)
                event.listen(engine, "after_execute", _on_after_execute)
                watched.add(engine)


def _on_dbapi_error(context: Any) -> None:
    conn = context.connection
    if conn is None:
        return
    ref = registry.uow_by_connection.get(conn)
    uow = ref() if ref is not None else None
    if uow is None:
        return
    stmt = getattr(context, "invoked_stmt", None)
    if stmt is not None and uow.watches:
        uow.watches.pop(id(stmt), None)
    if context.is_disconnect:
        uow.outcome_unknown = True


def _real_parent(trans: SessionTransaction) -> SessionTransaction | None:
    parent = trans.parent
    while parent is not None and not (parent.nested or parent.parent is None):
        parent = parent.parent
    return parent


def _invalidate_committed(caches: Iterable[HybridCache], keys: list[str]) -> None:
    """Publish after a commit. Never raises: the data is committed whatever Redis says."""
    for cache in caches:
        try:
            cache.invalidate_committed(keys)
        except Exception:
            # invalidate_committed() handles Redis failures itself; this is the last line for
            # anything else (a closed cache, a bug). Flushing L1 at least keeps this process
            # from serving what it just changed.
            log.exception("publishing %d key(s) after commit failed", len(keys))
            try:
                cache.clear_local()
            except Exception:
                log.exception("flushing the local cache after a failed publish failed")


def _run_callbacks(callbacks: list[Callable[[], object]], installation: Installation) -> None:
    """Run after-commit callbacks in order. Never raises: the transaction is committed, and
    an exception here would read as a failed commit; each failure is logged and counted."""
    for callback in callbacks:
        try:
            callback()
        except Exception:
            installation._stats["callback_failures"] += 1
            log.exception("after-commit callback %r failed", callback)
        else:
            installation._stats["callbacks_run"] += 1


def install(target: Any, cache: HybridCache) -> Installation:
    """Publish the keys of every committed transaction of ``target``'s sessions to ``cache``.

    ``target``: a ``sessionmaker``, ``scoped_session``, ``Session`` subclass (or ``Session``
    itself, for every session in the process), ``async_sessionmaker``/``async_scoped_session``
    or ``AsyncSession`` subclass (their events run on the sync session class underneath).
    Returns an :class:`Installation`; call its ``uninstall()`` to stop.
    """
    installation = Installation(_session_class(target), cache)
    installation._install()
    return installation


def _session_class(target: Any) -> type[Session]:
    if isinstance(target, type) and issubclass(target, Session):
        return target
    if isinstance(target, scoped_session):
        return _session_class(target.session_factory)
    if isinstance(target, sessionmaker):
        cls: type[Session] = target.class_
        return cls
    try:
        from sqlalchemy.ext.asyncio import (
            AsyncSession,
            async_scoped_session,
            async_sessionmaker,
        )
    except ImportError:  # pragma: no cover - asyncio extension unavailable
        AsyncSession = async_sessionmaker = async_scoped_session = None  # type: ignore[misc,assignment]
    if async_scoped_session is not None and isinstance(target, async_scoped_session):
        return _session_class(target.session_factory)
    if async_sessionmaker is not None and isinstance(target, async_sessionmaker):
        sync_class = target.kw.get("sync_session_class") or Session
        return _dedicated_sync_class(sync_class, target)
    if AsyncSession is not None and isinstance(target, type) and issubclass(target, AsyncSession):
        return _dedicated_sync_class(target.sync_session_class, target)
    raise TypeError(
        f"install() needs a sessionmaker, scoped_session, Session subclass, async_sessionmaker "
        f"or AsyncSession subclass, got {target!r:.100}"
    )


def _dedicated_sync_class(sync_class: type[Session], target: Any) -> type[Session]:
    if sync_class is Session:
        # Listening on Session itself would cover every session in the process; demand that
        # this be said explicitly (install(Session, cache)) rather than happen by accident.
        raise ValueError(
            f"{target!r:.100} uses the base Session as its sync_session_class; give it a "
            f"dedicated one (class MySession(Session): pass; async_sessionmaker(..., "
            f"sync_session_class=MySession)) or install(Session, cache) to cover all sessions"
        )
    return sync_class


# -- mapper events: keys of the rows a flush writes ----------------------------------------


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
    rows = _read_rows(connection, stmt, {}, {})
    row = rows[0] if rows else None
    if row is None:
        # Gone (deleted by another transaction that committed, and published, first): no key
        # of it can be read, and SQLAlchemy reports the stale row in its own way.
        log.debug(
            "key fields %s of %s %r: the row is gone", fields, mapper.class_.__name__, tuple(pk)
        )
        return {}
    return dict(zip(fields, row, strict=True))


# -- bulk statements, observed at the Core level ---------------------------------------------------
#
# ORM-enabled INSERT/UPDATE/DELETE statements are watched where they reach the database: the
# engine's ``before_execute``/``after_execute`` events, for connections that an installed session
# began. By then SQLAlchemy has autoflushed, every ``do_orm_execute`` hook has shaped the statement
# and its parameters, the shard's connection has been chosen and the execution options (schema
# translation) are final. The statement itself is never changed: its WHERE is reused in a SELECT
# of the key columns that runs just before it, on the same connection, in the same transaction.


_IN_CHUNK = {"sqlite": 500}  # parameters per IN list; SQLite's limit is the lowest
_DEFAULT_IN_CHUNK = 5000


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


def _read_rows(
    conn: Connection, sel: Any, params: Any, options: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    """Every read hybridinval makes for keys goes through here: an ordinary statement on the
    session's connection (or a second one), seen by the engine's listeners like any other."""
    return [tuple(r) for r in conn.execute(sel, params, execution_options=options)]


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
            self.floor = _read_rows(self.conn, sel, {}, self.options)[0][0]

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


# -- joined sessions: keys held for an outer connection-level transaction ---------------------


class _OuterPending:
    __slots__ = ("caches", "callbacks", "installation", "keys", "transaction")

    def __init__(self, transaction: Any, installation: Installation) -> None:
        # Weak: the transaction holds its connection, this entry's key.
        self.transaction = weakref.ref(transaction) if transaction is not None else None
        self.installation = installation
        self.keys: dict[str, None] = {}
        self.callbacks: list[Callable[[], object]] = []
        self.caches: dict[int, HybridCache] = {}


def _defer_to_outer(
    conn: Connection,
    keys: list[str],
    callbacks: list[Callable[[], object]],
    caches: Iterable[HybridCache],
    installation: Installation,
) -> None:
    entry = registry.outer_pending.get(conn)
    outer = conn.get_transaction()
    if entry is None or entry.transaction is None or entry.transaction() is not outer:
        entry = registry.outer_pending[conn] = _OuterPending(outer, installation)
    entry.keys.update(dict.fromkeys(keys))
    entry.callbacks.extend(callbacks)
    entry.caches.update((id(c), c) for c in caches)
    if not event.contains(conn, "commit", _on_outer_commit):
        event.listen(conn, "commit", _on_outer_commit)
        event.listen(conn, "rollback", _on_outer_rollback)
    log.debug("holding %d key(s) until the outer transaction of %r ends", len(keys), conn)


def _on_outer_rollback(conn: Connection) -> None:
    entry = registry.outer_pending.pop(conn, None)
    if entry is not None:
        entry.installation._stats["outer_drops"] += 1
        log.debug("outer transaction rolled back: dropped %d key(s)", len(entry.keys))


def _on_outer_commit(conn: Connection) -> None:
    # Fired just *before* the DBAPI COMMIT, and SQLAlchemy has no event after it. Publishing
    # now would let a reader cache the old row under the new version. So the publish rides on
    # the COMMIT call itself: the pool's connection proxy forwards ``commit`` to the driver, and
    # an instance attribute there runs first, commits, then publishes.
    entry = registry.outer_pending.pop(conn, None)
    if entry is None:
        return
    dialect_class = type(conn.dialect)
    if dialect_class.do_commit is not DefaultDialect.do_commit:
        name = dialect_class.__name__
        if name not in registry.warned_dialects:
            registry.warned_dialects.add(name)
            log.warning(
                "dialect %s overrides do_commit(); invalidations held for an outer "
                "transaction may not be published",
                name,
            )
    proxy = conn.connection
    driver_commit = proxy.dbapi_connection.commit  # type: ignore[union-attr]

    def commit_then_publish() -> None:
        try:
            driver_commit()
        except BaseException:
            # Published even though COMMIT raised: the outcome may be unknown (connection lost
            # mid-COMMIT), and an invalidation of data that did not change is harmless. The
            # callbacks are not run: they must only follow a known commit.
            vars(proxy).pop("commit", None)
            _invalidate_committed(list(entry.caches.values()), list(entry.keys))
            raise
        vars(proxy).pop("commit", None)
        entry.installation._stats["outer_publishes"] += 1
        if entry.keys:
            _invalidate_committed(list(entry.caches.values()), list(entry.keys))
        _run_callbacks(entry.callbacks, entry.installation)

    proxy.commit = commit_then_publish  # type: ignore[method-assign]


# -- explicit keys -----------------------------------------------------------------------------


def invalidate_on_commit(session: Any, *keys: str) -> None:
    """Invalidate ``keys`` when ``session``'s root transaction commits (never before).

    Keys given inside a SAVEPOINT that rolls back are dropped with it. Raises
    :class:`TransactionStateError` when no transaction is in progress (``session.begin()``
    first), ``TypeError`` for a non-str key and ``ValueError`` for an empty or too long one.
    """
    for key in keys:
        if type(key) is not str:
            raise TypeError(
                f"invalidate_on_commit: cache keys must be str, got {type(key).__name__}: "
                f"{key!r:.100}"
            )
    sync, uow = _open_unit_of_work(session, "invalidate_on_commit")
    uow.add(sync, keys)


def on_commit(session: Any, callback: Callable[[], object]) -> None:
    """Call ``callback()`` once ``session``'s root transaction has committed *and* its
    invalidations have been published, so whatever it triggers reads the new data everywhere.

    Dropped if the transaction (or the SAVEPOINT it was registered in) rolls back; for a session
    joined to an outer transaction, run after the outer COMMIT. Callbacks run in registration
    order inside ``commit()``; one that raises is logged and counted (``callback_failures``)
    and does not stop the others or fail the commit. Not run when the outcome is unknown (a
    connection lost during COMMIT).
    """
    if not callable(callback):
        raise TypeError(f"on_commit: callback must be callable, got {callback!r:.100}")
    sync, uow = _open_unit_of_work(session, "on_commit")
    uow.frame(sync).callbacks.append(callback)


def enqueue_on_commit(session: Any, task: Any, *args: Any, **kwargs: Any) -> None:
    """Send a Celery task (a ``Task`` or a ``Signature``) after the root commit and its
    invalidations, never for a transaction that rolled back: see :func:`on_commit`.

    ``args``/``kwargs`` go to ``task.apply_async(args=..., kwargs=...)``; without them the
    signature is sent as built (``task.apply_async()``).
    """
    apply_async = getattr(task, "apply_async", None)
    if not callable(apply_async):
        raise TypeError(
            f"enqueue_on_commit: expected a Celery task or signature (with apply_async), got "
            f"{task!r:.100}"
        )

    def send() -> object:
        if args or kwargs:
            return apply_async(args=args, kwargs=kwargs)
        return apply_async()

    on_commit(session, send)


def _open_unit_of_work(session: Any, caller: str) -> tuple[Session, _UnitOfWork]:
    sync = _sync_session(session)
    uow = _uow_for(sync)
    if uow is None:
        raise SessionNotInstalledError(
            f"{caller}: this session's class is not installed; call "
            f"hybridinval.sqlalchemy.install(session_factory, cache) first, or nothing would "
            f"ever be published"
        )
    if not sync.in_transaction():
        raise TransactionStateError(
            f"{caller}: no transaction is in progress on this session; call session.begin() "
            f"(or do the work inside `with session.begin():`) first"
        )
    return sync, uow


# -- reading through a session -----------------------------------------------------------------


class SessionCache:
    """``cache`` as seen from one session: never caches what that session could read wrongly.

    Built by ``cache.for_session(session)`` (``session`` may be an AsyncSession). Cheap: make
    one per use. The session's class must be installed (so its flushed changes are known).
    """

    __slots__ = ("_is_clean", "cache", "session", "uow")

    def __init__(self, cache: HybridCache, session: Any) -> None:
        self.cache = cache
        self.session = _sync_session(session)
        uow = _uow_for(self.session)
        if uow is None:
            raise SessionNotInstalledError(
                "for_session(): this session's class is not installed, so its flushed but "
                "uncommitted changes are invisible to hybridinval; call "
                "hybridinval.sqlalchemy.install(session_factory, cache) first"
            )
        self.uow = uow
        session = self.session
        # SQLAlchemy's own cleanliness check (private, but long-standing), bound once: it runs
        # on every read, and building the three identity sets would cost microseconds.
        self._is_clean: Callable[[], bool] = getattr(
            session, "_is_clean", lambda: _session_is_clean(session)
        )

    def get(self, key: str, default: Any = None) -> Any:
        """The cached value, or ``default`` when the session has pending changes to ``key``
        (the caller then reads the session's own writes from the database)."""
        uow = self.uow  # inline fast path: nothing collected and nothing unflushed
        if (uow.frames or _outer_pending_data or not self._is_clean()) and self.is_pending(key):
            self._count_bypass()
            return default
        return self.cache.get(key, default)

    def get_or_set(self, key: str, loader: Callable[[], T], ttl: float | None = None) -> T:
        """``cache.get_or_set(key, loader, ttl)``, unless the value must not be shared: then
        ``loader()`` is called and its result returned without being stored anywhere."""
        uow = self.uow
        if (uow.frames or _outer_pending_data or not self._is_clean()) and self.is_pending(key):
            self._count_bypass()
            return loader()
        # An L1 entry is committed data: fine for any session without changes to it. Only a
        # fill (which compares a version read now with rows the session reads) cares about the
        # session's snapshot. The entry is used as read, not looked up again through the core:
        # evicted in between, the core would fill without the snapshot check.
        hit = self.cache.get_local(key, _NOT_CACHED)
        if hit is not _NOT_CACHED:
            return hit  # type: ignore[no-any-return]
        if not _snapshot_is_fresh(self.uow.connections):
            self._count_bypass()
            return loader()
        return self.cache.get_or_set(key, loader, ttl)

    async def aget_or_set(
        self, key: str, loader: Callable[[], Awaitable[T]], ttl: float | None = None
    ) -> T:
        """``get_or_set`` for an async loader (an AsyncSession query).

        An L1 hit is answered on the event loop. A miss runs the core's read path in a worker
        thread (its Redis I/O is blocking), which schedules ``loader()`` back on this loop and
        waits for it, so the fill guard and the L2 compare-and-set work as for sync loaders.
        """
        uow = self.uow
        if (uow.frames or _outer_pending_data or not self._is_clean()) and self.is_pending(key):
            self._count_bypass()
            return await loader()
        hit = self.cache.get_local(key, _NOT_CACHED)
        if hit is not _NOT_CACHED:
            return hit  # type: ignore[no-any-return]
        if not _snapshot_is_fresh(self.uow.connections):
            self._count_bypass()
            return await loader()
        loop = asyncio.get_running_loop()

        def run_loader() -> T:
            return asyncio.run_coroutine_threadsafe(_await(loader), loop).result()

        return await asyncio.to_thread(self.cache.get_or_set, key, run_loader, ttl)

    def is_pending(self, key: str) -> bool:
        """Whether this session has changed, or may have changed, what ``key`` caches."""
        if type(key) is not str:
            raise TypeError(f"cache key must be a str, got {type(key).__name__}: {key!r:.100}")
        uow = self.uow
        if (uow.frames or _outer_pending_data) and uow.has_key(key):
            return True
        if self._is_clean():
            return False
        exact, patterns = _unflushed_keys(self.session)
        return key in exact or any(p.fullmatch(key) for p in patterns)

    def can_cache(self, key: str) -> bool:
        """Whether a value loaded through this session now may be stored in L1/L2."""
        return not self.is_pending(key) and _snapshot_is_fresh(self.uow.connections)

    def _count_bypass(self) -> None:
        primary = self.uow.primary
        if primary is not None:
            primary._stats["bypassed_reads"] += 1


_NOT_CACHED: Any = object()


def _session_is_clean(session: Session) -> bool:
    """No unflushed new, dirty or deleted objects. Runs on every read through a session, so it
    uses SQLAlchemy's own cleanliness check where present (private, but long-standing) rather
    than building three identity sets."""
    try:
        return bool(session._is_clean())
    except AttributeError:
        return not (session.new or session.dirty or session.deleted)


async def _await(loader: Callable[[], Awaitable[T]]) -> T:
    return await loader()


def _unflushed_keys(session: Session) -> tuple[set[str], list[re.Pattern[str]]]:
    """Keys of tracked objects changed in the session but not flushed yet.

    Old and new values are both pending. A value not known yet (the id of a new object, an
    old value never loaded) makes the template a pattern matching any value there.
    """
    exact: set[str] = set()
    patterns: list[re.Pattern[str]] = []
    if _session_is_clean(session):
        return exact, patterns
    for group, is_new in ((session.new, True), (session.dirty, False), (session.deleted, False)):
        for obj in group:
            specs = _specs_for(type(obj))
            if not specs:
                continue
            state: InstanceState[Any] = inspect(obj)
            current: dict[str, Any] = {}
            old: dict[str, Any] = {}
            for field in _fields(specs):
                value = state.dict.get(field, _MISSING)
                if is_new and value is None:
                    value = _MISSING  # assigned by the INSERT (autoincrement, defaults)
                current[field] = value
                if not is_new:
                    history = state.attrs[field].history
                    if history.deleted:
                        old[field] = history.deleted[0]
                    elif history.unchanged:
                        old[field] = history.unchanged[0]
                    else:
                        old[field] = _MISSING
            for values in (current, old) if not is_new else (current,):
                for spec in specs:
                    for template in spec.templates:
                        if any(values[f] is _MISSING for f in template.fields):
                            patterns.append(template.pattern(values))
                        else:
                            exact.add(template.format(values))
    return exact, patterns


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
