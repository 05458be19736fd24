"""The FastAPI service of the example: :mod:`.web`'s JSON API in ``async def`` endpoints, on
``AsyncSession`` and :class:`~hybridinval.AsyncHybridCache`, run by uvicorn.

Why a second web app: asyncio services are half of new Python backends, and they share the
database, the cache namespace and the Celery worker with the sync ones. Each uvicorn worker
process builds its runtime in the lifespan (after the fork), so it has its own L1 and subscriber
thread; its reads and commits never block the event loop on Redis::

    uvicorn workers.api:app --workers 2
    gunicorn -k uvicorn_worker.UvicornWorker -w 2 workers.api:app   # pip install uvicorn-worker

Endpoints as :mod:`.web`'s (``GET/PUT /users/{id}``, ``POST /users``, ``GET
/users/{id}/card``, ``GET /_stats``, ``GET /healthz``); an update sends ``refresh_card`` to the
Celery worker with ``enqueue_on_commit``. The process's stats are left in Redis at shutdown.

This module must never build a runtime at import (a master process imports it before forking),
and never send a task before the commit it depends on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Body, FastAPI, HTTPException, Request

from . import async_store


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    rt = await async_store.open_runtime()
    app.state.rt = rt
    try:
        yield
    finally:
        await async_store.close_runtime(rt)


app = FastAPI(title="hybridinval example (asyncio)", lifespan=lifespan)


def _rt(request: Request) -> async_store.AsyncRuntime:
    rt: async_store.AsyncRuntime = request.app.state.rt
    return rt


@app.get("/healthz")
async def healthz() -> dict[str, bool]:
    return {"ok": True}


@app.get("/users/{user_id}")
async def get_user(user_id: int, request: Request) -> dict[str, Any]:
    result = await async_store.read_user(_rt(request), user_id)
    if result["user"] is None:
        raise HTTPException(404)
    return result


@app.post("/users", status_code=201)
async def create_user(request: Request, body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
    try:
        user_id, name, email = int(body["id"]), str(body["name"]), str(body["email"])
    except (KeyError, TypeError, ValueError) as exc:
        raise HTTPException(400) from exc
    return await async_store.create_user(_rt(request), user_id, name, email)


@app.put("/users/{user_id}")
async def update_user(
    user_id: int,
    request: Request,
    body: dict[str, Any] = Body(...),  # noqa: B008
) -> dict[str, Any]:
    from .tasks import enqueue_refresh

    name, bio = body.get("name"), body.get("bio")
    if (name is not None and not isinstance(name, str)) or (
        bio is not None and not isinstance(bio, str)
    ):
        raise HTTPException(400)
    refresh = bool(body.get("refresh", True))
    result = await async_store.update_user(
        _rt(request),
        user_id,
        name=name,
        bio=bio,
        on_commit=enqueue_refresh(user_id) if refresh else None,
    )
    if result is None:
        raise HTTPException(404)
    return result


@app.get("/users/{user_id}/card")
async def get_card(user_id: int, request: Request) -> dict[str, Any]:
    card = await async_store.read_card(_rt(request), user_id)
    if card is None:
        raise HTTPException(404)
    return card


@app.get("/_stats")
async def stats(request: Request) -> dict[str, Any]:
    return _rt(request).stats()
