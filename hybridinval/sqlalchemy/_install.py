"""``install()`` and :class:`Installation`: the session-level listeners that follow a session's
transactions (``after_begin``, ``before_commit``, ``after_commit``, ``after_transaction_end``),
merge or drop their frames, and publish the root commit's keys; the engine listeners for lost
connections and, with an outbox, for the COMMIT its rows are written just before."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import UnboundExecutionError
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from .._async import AsyncHybridCache
from ..errors import OutboxError
from ._bulk import _on_after_execute, _on_before_execute
from ._frames import _real_parent, _UnitOfWork, _uow_for
from ._outbox import Outbox
from ._outer import _defer_to_outer
from ._publish import _invalidate_committed, _run_callbacks, _write_outbox
from ._registry import registry
from ._relay import OutboxRelay
from ._snapshot import _isolation_level

if TYPE_CHECKING:
    from sqlalchemy.orm import SessionTransaction

    from .._async import AnyCache

log = logging.getLogger("hybridinval.sqlalchemy")


class Installation:
    """What :func:`install` returns: the listeners on one session class, and their counters.

    Several installations may cover one session (a base class and a sessionmaker, two caches):
    the first registered does the work for all of them and publishes to every cache.
    """

    def __init__(
        self,
        session_class: type[Session],
        cache: AnyCache,
        outbox: Outbox | None = None,
        relay_engine: Engine | None = None,
    ) -> None:
        self.session_class = session_class
        self.cache = cache
        # Relays publish from their own threads: through the blocking face of an asyncio cache.
        relay_cache = cache.sync if isinstance(cache, AsyncHybridCache) else cache
        self._relay_cache = relay_cache
        self.outbox = outbox
        # With an outbox: the relay that republishes rows left behind (unless the outbox says
        # relay=False; started by install()), and one relay per database rows were written to,
        # which deletes them once published (the republishing one for its own database).
        self.relay: OutboxRelay | None = None
        self._relays: dict[tuple[int, str], OutboxRelay] = {}
        if outbox is not None and relay_engine is not None:
            self.relay = OutboxRelay(
                relay_engine,
                outbox.resolved_table,
                relay_cache,
                grace=outbox.grace,
                interval=outbox.interval,
                batch=outbox.batch,
            )
            self._relays[_engine_key(relay_engine)] = self.relay
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
                "outbox_rows_written",
            ),
            0,
        )
        self._listeners: list[tuple[str, Callable[..., Any]]] = [
            ("after_begin", self._after_begin),
            ("after_commit", self._after_commit),
            ("after_transaction_end", self._after_transaction_end),
        ]
        if outbox is not None:
            self._listeners.append(("before_commit", self._before_commit))
        self.installed = False

    def _install(self) -> None:
        for name, fn in self._listeners:
            event.listen(self.session_class, name, fn)
        registry.add_installation(self)
        self.installed = True
        for relay in self._relays.values():
            relay.start()

    def uninstall(self) -> None:
        """Remove the listeners. Keys pending in open transactions are dropped. Idempotent."""
        if not self.installed:
            return
        self.installed = False
        registry.remove_installation(self)
        for name, fn in self._listeners:
            if event.contains(self.session_class, name, fn):
                event.remove(self.session_class, name, fn)
        for relay in list(self._relays.values()):
            relay.stop()

    def stats(self) -> dict[str, Any]:
        """Counters since install (this installation acting as the sessions' primary); with an
        outbox, also its relay's: ``outbox_backlog`` rows waiting in this namespace and the
        age of the oldest, ``outbox_oldest_age_s`` (None until the relay's first look, and
        in a process that runs no relay), rows republished and deleted."""
        out: dict[str, Any] = dict(self._stats)
        if self.outbox is not None:
            out["outbox_backlog"] = out["outbox_oldest_age_s"] = None
            for relay in list(self._relays.values()):
                for name, value in relay.stats().items():
                    if name in ("outbox_backlog", "outbox_oldest_age_s"):
                        if relay.republish:
                            out[name] = value
                    else:
                        out[name] = out.get(name, 0) + value
        return out

    # -- the outbox ---------------------------------------------------------------------------

    def _relay_for(self, conn: Connection) -> OutboxRelay | None:
        """The relay that deletes rows written through ``conn`` once they are published: the
        one for its database (same pool and schema map), made delete-only if there is none."""
        key = _engine_key(conn.engine)
        relay = self._relays.get(key)
        if relay is not None or self.outbox is None:
            return relay
        if conn.dialect.is_async:
            # An async engine's connections belong to its event loop: no thread may use them.
            # The rows are then deleted by the relay that republishes them (a duplicate
            # publish, which is harmless).
            return None
        with registry.lock:
            relay = self._relays.get(key)
            if relay is None:
                relay = self._relays[key] = OutboxRelay(
                    conn.engine,
                    self.outbox.resolved_table,
                    self._relay_cache,
                    grace=self.outbox.grace,
                    interval=self.outbox.interval,
                    batch=self.outbox.batch,
                    republish=False,
                ).start()
        return relay

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

    def _before_commit(self, session: Session) -> None:
        # Fires for the root and for every SAVEPOINT commit; only the root writes outbox rows.
        uow = self._uow(session)
        if uow is None or not uow.outboxes or session.get_nested_transaction() is not None:
            return
        pending = bool(uow.collected() or session.new or session.dirty or session.deleted)
        if pending or uow.connections:
            if session.twophase and pending:
                # The row would have to precede the PREPARE; nothing writes it there.
                raise OutboxError(
                    "install(outbox=...) does not support two-phase sessions (twophase=True): "
                    "the commit is refused rather than made without its outbox row"
                )
            # The rows go on the connection of the outbox table's bind, begun now if the
            # transaction has none yet (keys given with no statement run): Session.commit()
            # flushes after this event, and that flush may find keys too.
            tables = {i.outbox.resolved_table.fullname for i in uow.outboxes}  # type: ignore[union-attr]
            if len(tables) > 1:
                raise OutboxError(
                    f"installations with outboxes in different tables ({sorted(tables)}) cover "
                    f"this session; give them one outbox table"
                )
            table = uow.outboxes[0].outbox.resolved_table  # type: ignore[union-attr]
            try:
                uow.outbox_conn = session.connection(bind_arguments={"clause": table})
            except UnboundExecutionError as exc:
                raise OutboxError(
                    f"the outbox table {table.fullname!r} has no bind in this session; add it "
                    f"to the session's binds (binds={{outbox_table: engine, ...}})"
                ) from exc
            uow.committing = True

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
        rows, uow.outbox_rows = uow.outbox_rows, []
        uow.committing, uow.outbox_conn = False, None
        if collected:
            self._publish(uow, list(collected.keys), collected.callbacks, rows)

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
        rows, uow.outbox_rows = uow.outbox_rows, []
        uow.committing, uow.outbox_conn = False, None
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
                self._publish(uow, list(collected.keys), [], rows)
        elif collected:
            self._stats["frames_dropped"] += 1
        uow.connections.clear()
        uow.watches.clear()
        uow.outcome_unknown = False

    def _publish(
        self,
        uow: _UnitOfWork,
        keys: list[str],
        callbacks: list[Callable[[], object]],
        rows: list[Any],
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
                _defer_to_outer(
                    conn, keys, callbacks if i == 0 else [], uow.caches, self, uow.outboxes
                )
            return
        try:
            if keys:
                self._stats["commits_published"] += 1
                self._stats["keys_published"] += len(keys)
                _invalidate_committed(uow.caches, keys, rows)
        finally:  # a cancelled AsyncSession task: the commit stands, so its callbacks run
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
                event.listen(engine, "commit", _on_connection_commit)
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


def _on_connection_commit(conn: Connection) -> None:
    # Just before the DBAPI COMMIT (and after Session.commit()'s last flush): the outbox rows
    # of the session whose root transaction this is, on the connection chosen in before_commit.
    if not _uow_by_connection_data:
        return
    ref = registry.uow_by_connection.get(conn)
    uow = ref() if ref is not None else None
    if uow is None or not uow.committing or uow.outbox_conn is not conn:
        return
    uow.committing = False  # once, whatever happens below
    keys = list(uow.collected().keys)
    if keys:
        uow.outbox_rows = _write_outbox(conn, uow.outboxes, keys)


_uow_by_connection_data = registry.uow_by_connection_data


def install(target: Any, cache: AnyCache, *, outbox: bool | Outbox = False) -> Installation:
    """Publish the keys of every committed transaction of ``target``'s sessions to ``cache``
    (a :class:`~hybridinval.HybridCache` or an :class:`~hybridinval.AsyncHybridCache`: an
    AsyncSession's commit then awaits the publish, and its event loop runs on meanwhile).

    ``target``: a ``sessionmaker``, ``scoped_session``, ``Session`` subclass (or ``Session``
    itself, for every session in the process), ``async_sessionmaker``/``async_scoped_session``
    or ``AsyncSession`` subclass (their events run on the sync session class underneath).
    Returns an :class:`Installation`; call its ``uninstall()`` to stop.

    ``outbox=True`` (or an :class:`Outbox`) also writes each commit's keys to an outbox table
    in the same transaction, and runs a relay in this process that republishes rows whose
    writer died before publishing them (see :class:`Outbox`). The relay needs a synchronous
    engine: the factory's own ``bind``, or ``Outbox(relay=engine)``.
    """
    options = Outbox.of(outbox)
    relay_engine: Engine | None = None
    if options is not None and options.relay is not False:
        relay_engine = _relay_engine(target, options)
    installation = Installation(_session_class(target), cache, options, relay_engine)
    installation._install()
    return installation


def _engine_key(engine: Engine) -> tuple[int, str]:
    """Which database and schema a connection of ``engine`` writes rows to."""
    translate = engine.get_execution_options().get("schema_translate_map")
    return id(engine.pool), repr(sorted(translate.items(), key=repr)) if translate else ""


def _relay_engine(target: Any, options: Outbox) -> Engine:
    engine: Any
    if isinstance(options.relay, Engine):
        engine = options.relay
    else:
        factory = target.session_factory if hasattr(target, "session_factory") else target
        kw = getattr(factory, "kw", None)
        engine = kw.get("bind") if isinstance(kw, dict) else None
        if engine is None:
            raise ValueError(
                f"install(outbox=True): {target!r:.100} has no bind, so the relay has no engine; "
                f"pass Outbox(relay=engine), or Outbox(relay=False) when relays run elsewhere "
                f"(hybridinval relay)"
            )
    if not isinstance(engine, Engine) or engine.dialect.is_async:
        raise ValueError(
            f"install(outbox=...): the relay runs on its own thread and needs a synchronous "
            f"Engine, got {engine!r:.100}; pass Outbox(relay=create_engine(<sync URL>)), or "
            f"Outbox(relay=False) and run `hybridinval relay`"
        )
    return engine


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
