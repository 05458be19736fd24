"""The two steps after a commit, for a root COMMIT (:mod:`._install`) and an outer one
(:mod:`._outer`) alike: publish the keys, then run the callbacks. Neither ever raises: the data is
committed whatever happens here."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .._cache import HybridCache
    from ._install import Installation

log = logging.getLogger("hybridinval.sqlalchemy")


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
