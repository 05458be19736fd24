"""The Celery app that the worker-process tests run (``celery -A support.celery_app worker``).

Configured only from the environment, read when a worker imports it:

* ``HI_TEST_BROKER_URL``: broker and result backend (a test's private Redis);
* ``HI_TEST_QUEUE``: the queue this test's worker consumes;
* ``HI_TEST_CACHE_URL`` / ``HI_TEST_NAMESPACE``: the cache's Redis and namespace;
* ``HI_TEST_DATABASE_URL``: the database the ``read_item`` task reads through the cache;
* ``HI_TEST_FACTORY_SLEEP``: seconds the cache factory sleeps (to show the 4 s limit bites);
* ``HI_TEST_PARENT_CACHE_URL``: also build a module-level cache at import, in the main process,
  before the pool forks (children must not use it as theirs).

Tasks report which process served them (pid, the cache's instance id) so tests can tell
children apart. The test process imports this module only for the model and task names.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from celery import Celery
from sqlalchemy import Integer, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from hybridinval import HybridCache
from hybridinval import celery as hybrid_celery
from hybridinval import sqlalchemy as hybrid_sa
from hybridinval.sqlalchemy import cached, track
from support.inspect import entries

app = Celery("hi_test")
app.conf.update(
    broker_url=os.environ.get("HI_TEST_BROKER_URL"),
    result_backend=os.environ.get("HI_TEST_BROKER_URL"),
    task_default_queue=os.environ.get("HI_TEST_QUEUE", "celery"),
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_redirect_stdouts=False,
    result_expires=600,
)

FAST: dict[str, Any] = {
    "health_check_interval": 0.1,
    "health_check_timeout": 0.3,
    "socket_timeout": 0.5,
}


class Base(DeclarativeBase):
    pass


class Item(Base):
    """A row with a version bumped on every committed update (see the freshness tests)."""

    __tablename__ = "hi_test_item"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    version: Mapped[int] = mapped_column(Integer, default=0)


def item_key(item_id: int) -> str:
    return f"item:{item_id}"


track(Item, keys=["item:{id}"])


def make_cache() -> HybridCache:
    delay = float(os.environ.get("HI_TEST_FACTORY_SLEEP", "0") or 0)
    if delay:
        time.sleep(delay)  # a misbehaving factory, for the test that shows the limit bites
    return HybridCache.from_url(
        os.environ["HI_TEST_CACHE_URL"],
        namespace=os.environ["HI_TEST_NAMESPACE"],
        count_hits=True,
        **FAST,
    )


integration = hybrid_celery.install(app, make_cache)

# An app that also keeps a module-level cache (say, shared with web code) builds it at import, in
# the worker's main process, before the pool forks: children must not inherit it as their own.
parent_cache: HybridCache | None = None
if os.environ.get("HI_TEST_PARENT_CACHE_URL"):
    parent_cache = HybridCache.from_url(
        os.environ["HI_TEST_PARENT_CACHE_URL"], namespace=os.environ["HI_TEST_NAMESPACE"], **FAST
    )
    parent_cache.wait_until_subscribed(10)  # its subscriber thread really runs before the fork
    logging.getLogger("hi_test").warning(
        "parent cache instance %s in pid %d", parent_cache.instance_id, os.getpid()
    )

_sessions: dict[int, sessionmaker[Session]] = {}
_sessions_lock = threading.Lock()


def session_factory() -> sessionmaker[Session]:
    """One engine and session factory per process, bound to this process's cache."""
    pid = os.getpid()
    with _sessions_lock:
        factory = _sessions.get(pid)
        if factory is None:
            engine = create_engine(os.environ["HI_TEST_DATABASE_URL"])
            factory = sessionmaker(engine)
            hybrid_sa.install(factory, hybrid_celery.current_cache())
            _sessions[pid] = factory
        return factory


def _whoami(cache: HybridCache) -> dict[str, Any]:
    stats = cache.stats()
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "instance_id": cache.instance_id,
        "subscribed": cache.subscribed,
        "l1_hits": stats["l1_hits"],
        "invalidations_received": stats["invalidations_received"],
        "opened_at": integration_opened_at(),
        "sub_threads": sum(
            1 for t in threading.enumerate() if t.name.startswith("hybridinval-sub")
        ),
        "threads": threading.active_count(),
    }


def integration_opened_at() -> float | None:
    state = hybrid_celery._current
    return state.opened_at if state is not None else None


@app.task(name="hi_test.probe")
def probe(key: str, wait_subscribed: float = 0.0, sleep: float = 0.0) -> dict[str, Any]:
    """Read ``key`` through this process's cache (the loader names the process)."""
    cache = hybrid_celery.current_cache()
    if wait_subscribed:
        cache.wait_until_subscribed(wait_subscribed)
    if sleep:
        time.sleep(sleep)
    value = cache.get_or_set(key, lambda: f"loaded-by-{os.getpid()}")
    out = _whoami(cache)
    out["value"] = value
    out["l1_has_key"] = key in entries(cache)
    out["parent_cache_instance"] = parent_cache.instance_id if parent_cache else None
    out["parent_cache_is_current"] = parent_cache is cache
    return out


@app.task(name="hi_test.read_item")
def read_item(item_id: int, sleep: float = 0.0) -> dict[str, Any]:
    """Read an item through ``cached(session, cache)``: L1, then L2, then the database."""
    if sleep:
        time.sleep(sleep)
    cache = hybrid_celery.current_cache()
    with session_factory()() as session:

        def load() -> dict[str, Any] | None:
            item = session.get(Item, item_id)
            return None if item is None else {"name": item.name, "version": item.version}

        started_ns = time.time_ns()
        value = cached(session, cache).get_or_set(item_key(item_id), load)
    out = _whoami(cache)
    out["value"] = value
    out["started_ns"] = started_ns
    return out


@app.task(name="hi_test.whoami")
def whoami() -> dict[str, Any]:
    return _whoami(hybrid_celery.current_cache())
