"""Joined sessions: keys held for an outer connection-level transaction that the session does
not control, published right after that transaction's COMMIT reaches the database and dropped if
it rolls back."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine.default import DefaultDialect

from ._publish import OutboxRow, _invalidate_committed, _run_callbacks, _write_outbox
from ._registry import registry

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from .._async import AnyCache
    from ._install import Installation

log = logging.getLogger("hybridinval.sqlalchemy")


class _OuterPending:
    __slots__ = ("caches", "callbacks", "installation", "keys", "outboxes", "transaction")

    def __init__(self, transaction: Any, installation: Installation) -> None:
        # Weak: the transaction holds its connection, this entry's key.
        self.transaction = weakref.ref(transaction) if transaction is not None else None
        self.installation = installation
        self.keys: dict[str, None] = {}
        self.callbacks: list[Callable[[], object]] = []
        self.caches: dict[int, AnyCache] = {}
        self.outboxes: dict[int, Installation] = {}


def _defer_to_outer(
    conn: Connection,
    keys: list[str],
    callbacks: list[Callable[[], object]],
    caches: Iterable[AnyCache],
    installation: Installation,
    outboxes: Iterable[Installation] = (),
) -> None:
    entry = registry.outer_pending.get(conn)
    outer = conn.get_transaction()
    if entry is None or entry.transaction is None or entry.transaction() is not outer:
        entry = registry.outer_pending[conn] = _OuterPending(outer, installation)
    entry.keys.update(dict.fromkeys(keys))
    entry.callbacks.extend(callbacks)
    entry.caches.update((id(c), c) for c in caches)
    entry.outboxes.update((id(i), i) for i in outboxes)
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
    rows: list[OutboxRow] = []
    if entry.outboxes and entry.keys:
        # In the outer transaction, before its COMMIT: the rows commit or roll back with it.
        # A failure here fails that COMMIT (nothing commits without its row).
        rows = _write_outbox(conn, list(entry.outboxes.values()), list(entry.keys))
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
            _invalidate_committed(list(entry.caches.values()), list(entry.keys), rows)
            raise
        vars(proxy).pop("commit", None)
        entry.installation._stats["outer_publishes"] += 1
        try:
            if entry.keys:
                _invalidate_committed(list(entry.caches.values()), list(entry.keys), rows)
        finally:  # a cancelled AsyncSession task: the commit stands, so its callbacks run
            _run_callbacks(entry.callbacks, entry.installation)

    proxy.commit = commit_then_publish  # type: ignore[method-assign]
