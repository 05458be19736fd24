"""The web app of the example deployment: a small JSON API on Flask, run by gunicorn.

Why Flask under gunicorn sync workers: it is how such an app runs in production, and gunicorn's
master imports the config and forks the workers, so every worker process builds its own cache
and engine after the fork (:func:`workers.store.runtime`) and serves one request at a time; L1
is per process, and coherence between processes is exactly what the backplane must provide.
``gunicorn -c python:workers.gunicorn_conf workers.web:app``.

Endpoints (JSON):

* ``GET /users/<id>``: the user through the cache, with the version read, when the read started
  (``started_ns``) and which process and cache instance served it;
* ``POST /users`` ``{"id", "name", "email"}``: create;
* ``PUT /users/<id>`` ``{"name"?, "bio"?}``: update; returns the committed version and when
  ``commit()`` returned (``committed_ns``); sends ``refresh_card`` on commit;
* ``GET /users/<id>/card``: the derived card through the cache;
* ``GET /_stats``: this process's reads, L1 hit ratio, invalidations received, lag;
* ``GET /healthz``.

This module must never cache a value read inside a transaction that changed it (reads use
``cached(session)``), and never send a task before the commit it depends on.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, abort, jsonify, request
from flask.typing import ResponseReturnValue

from . import store

app = Flask(__name__)


def _rt() -> store.Runtime:
    return store.runtime("web")


@app.get("/healthz")
def healthz() -> ResponseReturnValue:
    return jsonify(ok=True)


@app.get("/users/<int:user_id>")
def get_user(user_id: int) -> ResponseReturnValue:
    result = store.read_user(_rt(), user_id)
    if result["user"] is None:
        abort(404)
    return jsonify(result)


@app.post("/users")
def create_user() -> ResponseReturnValue:
    body = _json()
    try:
        user_id, name, email = int(body["id"]), str(body["name"]), str(body["email"])
    except (KeyError, TypeError, ValueError):
        abort(400)
    return jsonify(store.create_user(_rt(), user_id, name, email)), 201


@app.put("/users/<int:user_id>")
def update_user(user_id: int) -> ResponseReturnValue:
    from .tasks import enqueue_refresh

    body = _json()
    name, bio = body.get("name"), body.get("bio")
    if (name is not None and not isinstance(name, str)) or (
        bio is not None and not isinstance(bio, str)
    ):
        abort(400)
    refresh = bool(body.get("refresh", True))
    result = store.update_user(
        _rt(), user_id, name=name, bio=bio, on_commit=enqueue_refresh(user_id) if refresh else None
    )
    if result is None:
        abort(404)
    return jsonify(result)


@app.get("/users/<int:user_id>/card")
def get_card(user_id: int) -> ResponseReturnValue:
    card = store.read_card(_rt(), user_id)
    if card is None:
        abort(404)
    return jsonify(card)


@app.get("/_stats")
def stats() -> ResponseReturnValue:
    return jsonify(_rt().stats())


def _json() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        abort(400)
    return body
