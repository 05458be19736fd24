"""Tasks of the example deployment: they read through the cache and write through sessions.

``update_user`` shows the pattern for follow-up work: ``refresh_card`` is handed to
``enqueue_on_commit``, so it is sent only after the update committed and its invalidations were
published (the task can never read the old user) and never if the transaction rolls back.

This module must never send a task from inside an open transaction by calling ``delay()``
directly: the task could run before the commit, or for a transaction that rolls back.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy.orm import Session

from . import async_store, store
from .celery_app import app, task_async_runtime, task_runtime


def enqueue_refresh(user_id: int) -> Any:
    """An ``on_commit`` callback for :func:`store.update_user` that sends ``refresh_card``."""
    from hybridinval.sqlalchemy import enqueue_on_commit

    def on_commit(session: Session) -> None:
        enqueue_on_commit(session, refresh_card.s(user_id))

    return on_commit


@app.task(name="workers.read_user")
def read_user(user_id: int) -> dict[str, Any]:
    return store.read_user(task_runtime(), user_id)


@app.task(name="workers.read_card")
def read_card(user_id: int) -> dict[str, Any] | None:
    return store.read_card(task_runtime(), user_id)


@app.task(name="workers.update_user")
def update_user(
    user_id: int, name: str | None = None, bio: str | None = None, refresh: bool = True
) -> dict[str, Any] | None:
    return store.update_user(
        task_runtime(),
        user_id,
        name=name,
        bio=bio,
        on_commit=enqueue_refresh(user_id) if refresh else None,
    )


@app.task(name="workers.refresh_card")
def refresh_card(user_id: int) -> dict[str, Any] | None:
    return store.refresh_card(task_runtime(), user_id)


@app.task(name="workers.stats")
def stats() -> dict[str, Any]:
    """The stats of the child that runs this (a broadcast would reach the worker, not each
    child: the demo reads the stats children leave in Redis when they exit)."""
    return task_runtime().stats()


@app.task(name="workers.read_user_async")
def read_user_async(user_id: int) -> dict[str, Any]:
    """:func:`read_user` as asyncio code under ``asyncio.run`` (a task calling into an async
    library): a new event loop per task, on the process's cache through its asyncio face."""
    return asyncio.run(async_store.read_user(task_async_runtime(), user_id))
