"""The integration's process-wide state, in one object that every module reaches: ``registry``.

Nothing else in :mod:`hybridinval.sqlalchemy` keeps state at module level; what a session
collects lives in its own ``session.info`` (:mod:`._frames`).
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from ._frames import _UnitOfWork
    from ._install import Installation
    from ._outer import _OuterPending
    from ._templates import _ModelSpec


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
