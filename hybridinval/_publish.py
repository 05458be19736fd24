"""After-commit publishing: the invalidation of a change that is already committed.

The data *is* committed, so a Redis failure must not surface as if it were not. A
:class:`Publisher` takes a committed batch and never raises a backend failure. The default,
:class:`RetryingPublisher`, sends at once and, on failure, flushes this process's L1 (it cannot
tell which of its entries other writers' lost messages would have evicted either) and retries
in the background until the backend takes the keys. It is at most once across a crash of the
process: a durable publisher (an outbox) plugs in at this seam.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from ._local import LocalState
from .errors import BackendUnavailableError

__all__ = ["Publisher", "RetryingPublisher"]

log = logging.getLogger("hybridinval")

Send = Callable[[list[str]], None]
Done = Callable[[], object]
"""Called once the backend has taken a batch (now or on a retry), e.g. to delete its outbox
row. Must not block for long: it may run on the committing thread or the retry thread."""
"""One round trip for a deduplicated, checked batch (the cache's invalidation); raises
``BackendUnavailableError``."""


class Publisher(Protocol):
    """Publishes the invalidation of committed changes."""

    def publish_committed(self, keys: list[str], on_published: Done | None = None) -> bool:
        """Invalidate ``keys`` (checked, deduplicated) everywhere, now or eventually; never
        raises ``BackendUnavailableError``. Returns whether it went out now. ``on_published``
        is called once the backend has taken them (never if they are dropped, say by
        ``close()``)."""
        ...

    def retry_later(self, keys: list[str], on_published: Done | None, error: BaseException) -> None:
        """Take over keys whose send failed elsewhere (an asyncio send): retry them until the
        backend takes them, as if :meth:`publish_committed` had failed."""
        ...

    def pending(self) -> int:
        """Keys accepted but not yet sent."""
        ...

    def close(self) -> None:
        """Stop background work. Idempotent."""
        ...


class RetryingPublisher:
    """Send now; on failure flush local L1 and retry in the background with backoff."""

    def __init__(self, send: Send, local: LocalState, is_closed: Callable[[], bool]) -> None:
        self._send = send
        self._local = local
        self._is_closed = is_closed
        self._lock = threading.Lock()
        self._keys: set[str] = set()
        self._done: list[Done] = []
        self._in_flight = 0
        self._thread: threading.Thread | None = None

    def publish_committed(self, keys: list[str], on_published: Done | None = None) -> bool:
        try:
            self._send(keys)
        except BackendUnavailableError as exc:
            self.retry_later(keys, on_published, exc)
            return False
        if on_published is not None:
            _notify(on_published)
        return True

    def retry_later(self, keys: list[str], on_published: Done | None, error: BaseException) -> None:
        """Keys whose send failed (or may not have happened: a cancelled send): flush local L1,
        log, and retry them in the background."""
        local = self._local
        with local.lock:
            local.stats["publish_failures"] += 1
            local.flush_locked()
        log.error(
            "publishing %d invalidation(s) after commit failed; retrying in the background: %s",
            len(keys),
            error if str(error) else type(error).__name__,
        )
        with self._lock:
            self._keys.update(keys)
            if on_published is not None:
                self._done.append(on_published)
            if self._thread is None:  # cleared, under this lock, only by a thread that ends
                self._thread = threading.Thread(
                    target=self._run, name="hybridinval-retry", daemon=True
                )
                self._thread.start()

    def pending(self) -> int:
        return len(self._keys) + self._in_flight

    def close(self) -> None:
        pass  # the thread sees is_closed() and stops; nothing else is held

    def _run(self) -> None:
        delay = 0.05
        stats = self._local.stats
        while True:
            with self._lock:
                if not self._keys or self._is_closed():
                    self._thread = None  # pending() still counts what a closed cache never sent
                    return
                batch, self._keys = list(self._keys), set()
                done, self._done = self._done, []
                self._in_flight = len(batch)
            try:
                self._send(batch)
            except Exception as exc:  # this thread must outlive anything, close() included
                with self._lock:
                    self._keys.update(batch)
                    self._done[:0] = done
                    self._in_flight = 0
                if self._is_closed():
                    log.debug("invalidation retry stopped: the cache was closed (%s)", exc)
                    continue  # the loop's check ends the thread
                if isinstance(exc, BackendUnavailableError):
                    log.debug("invalidation retry failed (%d keys): %s", len(batch), exc)
                else:
                    log.exception("invalidation retry failed (%d keys)", len(batch))
                time.sleep(delay)
                delay = min(2.0, delay * 2)
            else:
                self._in_flight = 0
                stats["publish_retries_succeeded"] += 1
                log.info("published %d invalidation(s) after retry", len(batch))
                for callback in done:
                    _notify(callback)
                delay = 0.05


def _notify(callback: Done) -> None:
    try:
        callback()
    except Exception:  # the keys went out; a failing follow-up must not undo or repeat that
        log.exception("after-publish callback %r failed", callback)
