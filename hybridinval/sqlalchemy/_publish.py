"""The steps around a commit, for a root COMMIT (:mod:`._install`) and an outer one
(:mod:`._outer`) alike: write the outbox rows just before it (when installed with an outbox),
publish the keys after it, then run the callbacks. Nothing after the COMMIT ever raises: the
data is committed whatever happens here."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from sqlalchemy.util.concurrency import await_only, in_greenlet

from .._async import AsyncHybridCache
from ._outbox import write_rows

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from .._async import AnyCache
    from ._install import Installation
    from ._relay import OutboxRelay

log = logging.getLogger("hybridinval.sqlalchemy")


class OutboxRow(NamedTuple):
    """An outbox row written for one installation's cache in the committing transaction, and
    the relay that deletes it from that database once published (None: left to a relay)."""

    installation: Installation
    row_id: int
    relay: OutboxRelay | None


def _write_outbox(
    conn: Connection, installations: Sequence[Installation], keys: list[str]
) -> list[OutboxRow]:
    """Just before the COMMIT, on its connection: one row per installation that keeps an
    outbox. Raises (failing the commit, so nothing commits without its row) if it cannot."""
    rows: list[OutboxRow] = []
    for installation in installations:
        outbox = installation.outbox
        assert outbox is not None
        (row_id,) = write_rows(conn, outbox.resolved_table, [(installation.cache.namespace, keys)])
        installation._stats["outbox_rows_written"] += 1
        rows.append(OutboxRow(installation, row_id, installation._relay_for(conn)))
    return rows


def _invalidate_committed(
    caches: Iterable[AnyCache], keys: list[str], rows: Sequence[OutboxRow] = ()
) -> None:
    """Publish after a commit. Never raises a failure: the data is committed whatever Redis
    says. (An AsyncSession's task cancelled during the publish raises ``CancelledError`` once
    every cache has the keys, sent or queued for its retry.)

    A cache that has an outbox row for these keys has it deleted once Redis took them."""
    done = {id(row.installation.cache): row for row in rows if row.relay is not None}
    cancelled: BaseException | None = None
    for cache in caches:
        row = done.get(id(cache))
        on_published = (
            None
            if row is None or row.relay is None
            else functools.partial(row.relay.published, row.row_id)
        )
        try:
            if not isinstance(cache, AsyncHybridCache):
                cache.invalidate_committed(keys, on_published=on_published)
            elif in_greenlet():
                # An AsyncSession's events run in a greenlet on its event loop: await the
                # publish there, so the loop serves other tasks meanwhile.
                await_only(cache.invalidate_committed(keys, on_published=on_published))
            else:
                cache.sync.invalidate_committed(keys, on_published=on_published)
        except asyncio.CancelledError as exc:
            cancelled = exc  # the keys are with the cache's retry; the other caches still go
        except Exception:
            # invalidate_committed() handles Redis failures itself; this is the last line for
            # anything else (a closed cache, a bug). Flushing L1 at least keeps this process
            # from serving what it just changed.
            log.exception("publishing %d key(s) after commit failed", len(keys))
            try:
                cache.clear_local()
            except Exception:
                log.exception("flushing the local cache after a failed publish failed")
    if cancelled is not None:
        raise cancelled


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
