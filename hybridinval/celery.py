"""Celery integration: one :class:`~hybridinval.HybridCache` per worker process that runs tasks.

Usage, in the module that builds the Celery app::

    from hybridinval import HybridCache
    from hybridinval import celery as hybrid_celery

    app = Celery("proj")
    hybrid_celery.install(app, lambda: HybridCache.from_url(REDIS_URL, namespace="proj"))

    @app.task
    def show(user_id):
        cache = hybrid_celery.current_cache()
        ...

Which process gets a cache, and from which signal (Celery sends ``worker_process_init`` only
in prefork children and the solo pool):

========== ======================================= ===========================================
pool       process that runs tasks                 signal that opens its cache
========== ======================================= ===========================================
prefork    each child (also every replacement       ``worker_process_init`` (in the child)
           child of ``--max-tasks-per-child``)
solo       the worker's main process               ``worker_init`` (``worker_process_init``,
                                                    also sent by solo, is then a no-op)
threads,   the worker's main process               ``worker_init``; ``worker_ready`` is a
gevent,                                            safety net (a no-op if already open)
eventlet
========== ======================================= ===========================================

Eager tasks (``task_always_eager``, as in tests) run in the calling process, which no worker
signal reaches: call :meth:`CeleryIntegration.open_process_cache` there once (a test fixture) and
:meth:`CeleryIntegration.close_process_cache` after; ``current_cache()`` then returns it.

The prefork parent never gets a cache: it runs no tasks, and anything it held would be
inherited by every child (the core's fork hook would reset it, but a cache that is never built
costs nothing). Opening a cache runs the factory and starts the subscriber thread; both must be
non-blocking, so a worker starts even while Redis is down and the cache recovers by itself.

Closing: prefork children close in ``worker_process_shutdown`` (sent in the child as it exits
normally, e.g. on warm shutdown or after ``--max-tasks-per-child``), the main process in
``worker_shutdown`` and, because Celery does not promise that either signal runs, at interpreter
exit (``atexit``). Prefork children leave through ``os._exit``, which skips ``atexit``: a child
killed before its shutdown signal relies on the kernel closing its sockets, which Redis notices
at once.

This module must never do network I/O or wait in a signal handler (Celery kills a prefork child
whose ``worker_process_init`` takes more than 4 seconds), never open a cache in a prefork parent,
and never hand a task a cache that was opened in another process.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from ._cache import HybridCache
from .errors import NoWorkerCacheError

__all__ = ["CeleryIntegration", "NoWorkerCacheError", "current_cache", "install"]

log = logging.getLogger("hybridinval.celery")

CacheFactory = Callable[[], HybridCache]

SLOW_FACTORY_WARNING_S = 1.0
"""A factory slower than this is logged: Celery kills a child whose init takes over 4 s."""


class _ProcessCache:
    """The cache of one OS process, and who opened it. Never valid in another process."""

    __slots__ = ("cache", "integration", "opened_at", "pid")

    def __init__(self, cache: HybridCache, integration: CeleryIntegration) -> None:
        self.pid = os.getpid()
        self.cache = cache
        self.integration = integration
        self.opened_at = time.time()


_lock = threading.Lock()
_current: _ProcessCache | None = None
_last_error: BaseException | None = None
_atexit_pid: int | None = None


def _reset_after_fork() -> None:
    # Another thread may have held the lock at fork time; in the child it would never be released.
    # The parent's cache object stays referenced (the core resets it) but is not ours to use.
    global _lock, _last_error
    _lock = threading.Lock()
    _last_error = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def install(celery_app: Any, cache_factory: CacheFactory) -> CeleryIntegration:
    """Give every task-running process of ``celery_app``'s workers its own cache.

    ``cache_factory`` is called once in each such process (never in a prefork parent) and must
    not do network I/O: :meth:`HybridCache.from_url` qualifies (its connections are lazy).
    Returns the installed :class:`CeleryIntegration`.
    """
    return CeleryIntegration(celery_app, cache_factory).install()


def current_cache() -> HybridCache:
    """The cache of the worker process this task runs in.

    Raises :class:`NoWorkerCacheError` outside a worker process of an app with the integration
    installed (for example in a web process, or with ``task_always_eager``), or if the factory
    failed in this process.
    """
    state = _current
    if state is not None and state.pid == os.getpid():
        return state.cache
    if _last_error is not None:
        raise NoWorkerCacheError(
            f"the hybridinval cache factory failed in this worker process (pid {os.getpid()}): "
            f"{_last_error!r}"
        ) from _last_error
    raise NoWorkerCacheError(
        f"no hybridinval cache in this process (pid {os.getpid()}): current_cache() works in "
        "Celery worker processes of an app passed to hybridinval.celery.install(); where tasks "
        "run eagerly (task_always_eager, tests), call the integration's open_process_cache() "
        "first; elsewhere, build and pass a HybridCache explicitly"
    )


class CeleryIntegration:
    """Connects one Celery app's worker signals to a per-process cache lifecycle.

    Shaped like Celery's Django fixup: :meth:`install` connects the ``on_<signal>`` methods and
    returns ``self``. Every handler is idempotent (signals can arrive twice: solo sends both
    ``worker_init`` and ``worker_process_init``; ``worker_ready`` follows ``worker_init``).
    """

    def __init__(
        self, app: Any, cache_factory: CacheFactory, *, eager_subscribe: bool = True
    ) -> None:
        self.app = app
        self.cache_factory = cache_factory
        self.eager_subscribe = eager_subscribe
        # None: no worker_init seen in this process lineage (e.g. a spawned child); True/False:
        # whether the worker that sent it runs tasks in forked children.
        self._forking_pool: bool | None = None
        self._foreign_worker = False
        self._installed = False
        self._unannounced: tuple[int, str] | None = None
        # A token, not id(self): dispatch_uid must not collide with a collected integration's.
        self._uid = f"hybridinval.celery:{uuid.uuid4().hex}"

    # -- wiring -------------------------------------------------------------------------------

    def install(self) -> CeleryIntegration:
        """Connect the signal handlers (strongly referenced, so the caller may drop ``self``)."""
        from celery import signals

        if self._installed:
            return self
        for name in self._SIGNALS:
            getattr(signals, name).connect(
                getattr(self, f"on_{name}"), weak=False, dispatch_uid=(self._uid, name)
            )
        self._installed = True
        return self

    def uninstall(self) -> None:
        """Disconnect the handlers (the process's cache, if any, stays open)."""
        from celery import signals

        for name in self._SIGNALS:
            getattr(signals, name).disconnect(dispatch_uid=(self._uid, name))
        self._installed = False

    _SIGNALS = (
        "worker_init",
        "worker_process_init",
        "worker_ready",
        "worker_process_shutdown",
        "worker_shutdown",
    )

    # -- signal handlers ----------------------------------------------------------------------

    def on_worker_init(self, sender: Any = None, **kwargs: Any) -> None:
        """Main worker process, before the pool starts: open here unless the pool forks."""
        worker_app = getattr(sender, "app", None)
        if worker_app is not None and _unwrap(worker_app) is not _unwrap(self.app):
            # Signals are global: another app's worker in this process is not ours to serve.
            self._foreign_worker = True
            return
        self._forking_pool = _pool_forks(getattr(sender, "pool_cls", None))
        if not self._forking_pool:
            self.open_process_cache(reason="worker_init")

    def on_worker_process_init(self, **kwargs: Any) -> None:
        """A prefork child (or the solo pool's main process) is about to take tasks."""
        if self._foreign_worker:
            return
        self.open_process_cache(reason="worker_process_init")

    def on_worker_ready(self, sender: Any = None, **kwargs: Any) -> None:
        """Safety net for pools that send no ``worker_process_init`` (threads, gevent, eventlet):
        if ``worker_init`` was not seen (integration installed late), open now."""
        if self._unannounced is not None and self._unannounced[0] == os.getpid():
            cache, (_, reason) = self.cache, self._unannounced
            self._unannounced = None
            if cache is not None:
                _log_opened(cache, reason)
        if self._foreign_worker or self._forking_pool:
            return
        worker_app = getattr(sender, "app", None)
        if worker_app is not None and _unwrap(worker_app) is not _unwrap(self.app):
            return
        if self._forking_pool is None:
            pool = getattr(getattr(sender, "controller", None), "pool_cls", None)
            if _pool_forks(pool):
                return
        self.open_process_cache(reason="worker_ready")

    def on_worker_process_shutdown(self, **kwargs: Any) -> None:
        """A prefork child exits normally. Not sent to a child that is killed; its sockets then
        close with the process."""
        self.close_process_cache(reason="worker_process_shutdown")

    def on_worker_shutdown(self, **kwargs: Any) -> None:
        """The main process stops (threads/gevent/solo caches live here)."""
        self.close_process_cache(reason="worker_shutdown")

    # -- the process's cache ------------------------------------------------------------------

    @property
    def cache(self) -> HybridCache | None:
        """This process's cache if this integration opened it, else None."""
        state = _current
        if state is not None and state.pid == os.getpid() and state.integration is self:
            return state.cache
        return None

    def open_process_cache(self, *, reason: str = "explicit") -> HybridCache | None:
        """Open this process's cache if it has none. Idempotent; never raises; blocks only as
        long as the factory does (a slow factory is logged).

        A factory error is logged and kept for :func:`current_cache` to report: raising into
        Celery's signal dispatch would only be logged there too, far from the task that fails.
        """
        global _current, _last_error
        with _lock:
            state = _current
            if state is not None and state.pid == os.getpid():
                return state.cache
            started = time.monotonic()
            try:
                cache = self.cache_factory()
            except Exception as exc:
                _last_error = exc
                log.exception(
                    "hybridinval: cache factory failed in pid %d (%s)", os.getpid(), reason
                )
                return None
            elapsed = time.monotonic() - started
            _current, _last_error = _ProcessCache(cache, self), None
        if elapsed > SLOW_FACTORY_WARNING_S:
            log.warning(
                "hybridinval: cache factory took %.1fs in pid %d; it must not do network "
                "I/O (Celery kills prefork children that take over 4 s to start)",
                elapsed,
                os.getpid(),
            )
        if self.eager_subscribe:
            # Starts the subscriber thread and returns at once: the first task then
            # usually finds L1 in use instead of paying for a blind period.
            cache.start()
        _register_atexit()
        if log.isEnabledFor(logging.INFO):
            _log_opened(cache, reason)
        else:
            # worker_init comes before Celery configures logging: say it again at worker_ready.
            self._unannounced = (os.getpid(), reason)
        return cache

    def close_process_cache(self, *, reason: str = "explicit") -> None:
        """Close this process's cache if this integration opened it. Idempotent."""
        global _current
        with _lock:
            state = _current
            if state is None or state.pid != os.getpid() or state.integration is not self:
                return
            _current = None
        _close(state, reason)


def _log_opened(cache: HybridCache, reason: str) -> None:
    log.info(
        "hybridinval: cache opened in pid %d (instance %s, namespace %s, via %s)",
        os.getpid(),
        cache.instance_id,
        cache.namespace,
        reason,
    )


def _close(state: _ProcessCache, reason: str) -> None:
    try:
        state.cache.close()
    except Exception:  # shutting down: report, never raise into Celery's exit path
        log.exception("hybridinval: closing the cache failed in pid %d", state.pid)
        return
    log.info(
        "hybridinval: cache closed in pid %d (instance %s, via %s)",
        state.pid,
        state.cache.instance_id,
        reason,
    )


def _close_at_exit() -> None:
    global _current
    state = _current
    if state is None or state.pid != os.getpid():
        return
    _current = None
    with contextlib.suppress(Exception):  # logging may already be torn down at exit
        _close(state, "atexit")


def _register_atexit() -> None:
    # Once per process: handlers registered by a parent are inherited through fork, and the
    # handler itself ignores state from another pid.
    global _atexit_pid
    if _atexit_pid != os.getpid():
        _atexit_pid = os.getpid()
        atexit.register(_close_at_exit)


def _pool_forks(pool_cls: Any) -> bool:
    """Whether a worker with this pool runs tasks in forked children (prefork and subclasses).

    ``worker_init`` is sent before the worker resolves ``pool_cls``, so it may still be a name.
    """
    if pool_cls is None:
        return False
    try:
        from celery.concurrency import get_implementation
        from celery.concurrency.prefork import TaskPool as PreforkPool

        resolved = get_implementation(pool_cls)
    except Exception:  # an unknown pool: assume it runs tasks here, the safe choice for readers
        log.debug("hybridinval: cannot resolve pool %r", pool_cls, exc_info=True)
        return False
    return isinstance(resolved, type) and issubclass(resolved, PreforkPool)


def _unwrap(app: Any) -> Any:
    # current_app and friends are Proxy objects; compare the apps behind them.
    get_current = getattr(app, "_get_current_object", None)
    return get_current() if callable(get_current) else app
