"""The SQLAlchemy unit of work: publish the keys a transaction changed, once, after it commits.

Usage::

    from hybridinval.sqlalchemy import cached, install, invalidate_on_commit, track

    track(User, keys=["user:{id}", "user_by_email:{email}"])
    install(SessionFactory, cache)          # sessionmaker, scoped_session, Session subclass,
                                            # async_sessionmaker or AsyncSession subclass
    with SessionFactory.begin() as session:
        session.get(User, 1).email = "new@example.com"
        invalidate_on_commit(session, "report:42")
    # commit() returned: user:1, user_by_email:<old>, user_by_email:<new> and report:42 are gone
    # from L2 and from every process's L1.

    with SessionFactory() as session:      # reads: never cache what the session changed
        user = cached(session).get_or_set("user:1", lambda: load_user(session, 1))

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

Reading through a session (:func:`cached`, a :class:`SessionCache`)
    A key the session has pending changes to (unflushed objects, flushed frames, keys handed to
    an open outer transaction) is loaded from the database and not cached. Neither is any key
    while the session's transaction may hold a snapshot older than the L2 version a fill would
    compare against (REPEATABLE READ/SERIALIZABLE once a statement ran, or an SQLite
    transaction that the driver did not open for a write): such a loader would read data older
    than the invalidations it was checked against. READ COMMITTED, a transaction that has not
    run a statement yet, and pysqlite's default write transactions (which hold the database
    write lock, so nobody else can commit under them) keep caching.

    ``cached(session)`` reads through the cache the session's class was installed with;
    ``cached(session, cache)`` names one, as it must when installations with different caches
    cover the session (:class:`~hybridinval.AmbiguousCacheError` otherwise).

Not seen (declare their keys with ``invalidate_on_commit``)
    Raw SQL (``text()``), Core statements on tables rather than mapped classes, the legacy
    ``Session.bulk_save_objects``/``bulk_*_mappings`` methods (SQLAlchemy fires no event for
    them), the old key values of rows an ``INSERT ... ON CONFLICT DO UPDATE`` changes, the
    new key values of a bulk UPDATE that changes primary keys, a bulk UPDATE/DELETE whose WHERE
    reads a data-modifying CTE, and ``insert().from_select()`` into a table without an integer
    primary key (each logged when it happens). The isolation level is
    read once per DBAPI connection; a level changed by raw ``SET`` statements is not noticed.

This package must never publish a key before the COMMIT that made it stale has reached the
database (not at flush, not at SAVEPOINT release, not when a joined session "commits"), never
let a failed publish raise out of ``commit()``, and never store in L1 or L2 a value read through
a session that could see uncommitted or outdated rows for it. It never changes a statement
the application runs, never refuses one SQLAlchemy accepts, and reads only in the session's own
transaction (the one exception: rows that started to match a bulk statement late are read as
committed on a second connection of the same engine, read-only).

Layout (the public API is what this module exports; every other module is private)
    ``_registry``     the process-wide state, in one object
    ``_templates``    key templates: ``track()``, ``untrack()``
    ``_frames``       a session's frames: ``invalidate_on_commit()``, ``on_commit()``,
                      ``enqueue_on_commit()``
    ``_install``      ``install()``, the session listeners, the lost-connection listener
    ``_publish``      the after-commit steps (publish, then callbacks)
    ``_outer``        outer connection-level transactions
    ``_flush``        the flush (mapper) listeners
    ``_bulk``         the engine listeners for bulk statements, with ``_keyselect`` (the key
                      SELECT, every read for keys), ``_bulk_update`` and ``_bulk_insert``
    ``_reads``        ``cached()``, :class:`SessionCache`
    ``_snapshot``     the isolation-level and snapshot checks
"""

from __future__ import annotations

from ..errors import (
    AmbiguousCacheError,
    OutboxError,
    SessionNotInstalledError,
    SQLAlchemyIntegrationError,
    TransactionStateError,
    UntrackableRowError,
)
from ._frames import enqueue_on_commit, invalidate_on_commit, on_commit
from ._install import Installation, install
from ._outbox import Outbox, outbox_table
from ._reads import SessionCache, cached
from ._relay import OutboxRelay
from ._templates import track, untrack

__all__ = [
    "AmbiguousCacheError",
    "Installation",
    "Outbox",
    "OutboxError",
    "OutboxRelay",
    "SQLAlchemyIntegrationError",
    "SessionCache",
    "SessionNotInstalledError",
    "TransactionStateError",
    "UntrackableRowError",
    "cached",
    "enqueue_on_commit",
    "install",
    "invalidate_on_commit",
    "on_commit",
    "outbox_table",
    "track",
    "untrack",
]
