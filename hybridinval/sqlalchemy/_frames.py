"""Per-session state: the frames of one session's transactions (a :class:`_UnitOfWork` in
``session.info``), and the calls that add to the innermost frame: ``invalidate_on_commit()``,
``on_commit()`` and ``enqueue_on_commit()``."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from ..errors import SessionNotInstalledError, TransactionStateError
from ._registry import registry

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import SessionTransaction

    from .._async import AnyCache
    from ._install import Installation
    from ._keyselect import _Watch
    from ._publish import OutboxRow


# Where a session's _UnitOfWork is kept, in session.info.
_INFO_KEY = "hybridinval.sqlalchemy"


# Bound once (the registry never rebinds it): read on every read through a session.
_outer_pending_data = registry.outer_pending_data


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
        "committing",
        "connections",
        "frames",
        "generation",
        "max_key_length",
        "outbox_conn",
        "outbox_rows",
        "outboxes",
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
        self.caches: tuple[AnyCache, ...] = ()
        self.primary: Installation | None = None
        # The installations that keep an outbox; for the root commit under way (before_commit
        # until it ends), the connection its rows go on and the rows written there.
        self.outboxes: tuple[Installation, ...] = ()
        self.committing = False
        self.outbox_conn: Connection | None = None
        self.outbox_rows: list[OutboxRow] = []
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
        uow.outboxes = tuple(i for i in matching if i.outbox is not None)
        uow.max_key_length = min((c.max_key_length for c in uow.caches), default=0)
    return uow if uow.primary is not None else None


def _real_parent(trans: SessionTransaction) -> SessionTransaction | None:
    parent = trans.parent
    while parent is not None and not (parent.nested or parent.parent is None):
        parent = parent.parent
    return parent


# -- explicit keys and after-commit callbacks --------------------------------------------------


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
