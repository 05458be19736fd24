"""gunicorn settings for the example's web app: sync workers, each building its own runtime.

Loaded as a module, so that it belongs to its package wherever that is installed::

    gunicorn -c python:workers.gunicorn_conf workers.web:app     # the repository's deployment
    gunicorn -c python:hybridinval.demo.example.gunicorn_conf \\
        hybridinval.demo.example.web:app                          # the same files, as the demo

``PORT`` (default 8000) and ``WEB_CONCURRENCY`` (default 2) from the environment.

This file must never build a cache or engine in the master: only workers serve requests, and
whatever the master held would be inherited by every fork.
"""

from __future__ import annotations

import os
from typing import Any

if not __package__:
    raise ImportError(
        "load the gunicorn settings as a module of their package: "
        "gunicorn -c python:workers.gunicorn_conf workers.web:app"
    )

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
    from .settings import load

    load()


def worker_exit(server: Any, worker: Any) -> None:
    """A worker stops: leave its stats in Redis and close its cache and engine."""
    from . import store

    store.close_runtime()
