"""The Celery app of the example deployment: ``celery -A workers.celery_app worker``.

Its tasks have explicit names (``workers.read_user``, ...), the same whether the package is
imported as ``workers`` (this repository) or as ``hybridinval.demo.example`` (the demo).

Every process that runs tasks gets its own cache from :func:`hybridinval.celery.install` (each
prefork child, built in ``worker_process_init`` without network I/O); the tasks' runtime
(:mod:`workers.store`) uses that cache. A child that exits cleanly leaves its stats in Redis for
the demo's table.

This module must never build a cache or an engine at import: it is imported by the worker's
main process (which forks children) and by web processes that only send tasks.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals

from hybridinval import AsyncHybridCache, HybridCache
from hybridinval import celery as hybrid_celery

from . import async_store, store
from .settings import load

settings = load()

app = Celery(
    "workers",
    broker=settings.broker_url,
    backend=settings.broker_url,
    include=[f"{__package__}.tasks"],  # workers.tasks, or the demo's copy of the same module
)
app.conf.update(
    task_default_queue=f"{settings.namespace}.tasks",
    worker_prefetch_multiplier=1,
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
)


def make_cache() -> HybridCache:
    """Called once in each task-running process; must not (and does not) touch the network."""
    current = load()
    return HybridCache.from_url(current.redis_url, **current.cache_options(), count_hits=True)


integration = hybrid_celery.install(app, make_cache)


def task_runtime() -> store.Runtime:
    """This process's runtime, on the cache the integration opened for it."""
    return store.runtime("task", cache=hybrid_celery.current_cache)


_async_runtime: dict[int, async_store.AsyncRuntime] = {}


def task_async_runtime() -> async_store.AsyncRuntime:
    """This process's runtime for tasks that run asyncio code (``asyncio.run`` inside a task):
    the process's cache seen through :meth:`AsyncHybridCache.wrap` (one L1, one subscriber), and
    an async engine without a pool, since each ``asyncio.run`` is a new event loop and a pooled
    connection belongs to the loop that opened it. Built on first use in each child."""
    from sqlalchemy.pool import NullPool

    pid = os.getpid()
    rt = _async_runtime.get(pid)
    if rt is None:
        cache = AsyncHybridCache.wrap(hybrid_celery.current_cache())
        rt = async_store.build_runtime(load(), "task", cache, poolclass=NullPool)
        _async_runtime.clear()  # a parent's, inherited through fork
        _async_runtime[pid] = rt
    return rt


def _open_runtime(**kwargs: Any) -> None:
    # Right after the integration opened this process's cache (its handler was connected
    # first). Building a runtime does no network I/O; it makes every child report its stats,
    # also one that never ran a task.
    if integration.cache is not None:
        task_runtime()


def _close_runtime(**kwargs: Any) -> None:
    # After the integration's own handler (connected first): the stats survive the cache's close.
    store.close_runtime()


signals.worker_process_init.connect(_open_runtime, weak=False)  # prefork children, solo
signals.worker_ready.connect(_open_runtime, weak=False)  # threads, gevent (no-op if open)
signals.worker_process_shutdown.connect(_close_runtime, weak=False)  # prefork children
signals.worker_shutdown.connect(_close_runtime, weak=False)  # the main process (other pools)
