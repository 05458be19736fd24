"""gunicorn settings for ``workers.web:app``: sync workers, each building its own runtime.

``gunicorn -c workers/gunicorn_conf.py workers.web:app``; ``PORT`` (default 8000) and
``WEB_CONCURRENCY`` (default 2) from the environment.

This file must never build a cache or engine in the master: only workers serve requests, and
whatever the master held would be inherited by every fork.
"""

from __future__ import annotations

import os
from typing import Any

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "sync"
timeout = 30
graceful_timeout = 10
accesslog = os.environ.get("ACCESS_LOG") or None


def on_starting(server: Any) -> None:
    """In the master, before forking: resolve settings once, so that without
    ``HYBRIDINVAL_REDIS_URL`` the master starts the embedded Redis and every worker inherits its
    URL."""
    from workers.settings import load

    load()


def worker_exit(server: Any, worker: Any) -> None:
    """A worker stops: leave its stats in Redis and close its cache and engine."""
    from workers import store

    store.close_runtime()
