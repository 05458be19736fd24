"""The example deployment: a web app and a Celery worker sharing one cache, kept coherent.

Read the modules in this order:

``settings``
    Configuration from the environment (``HYBRIDINVAL_DATABASE_URL``, ``HYBRIDINVAL_REDIS_URL``,
    ``HYBRIDINVAL_BROKER_URL``, ``HYBRIDINVAL_NAMESPACE``). With nothing set it runs anywhere: a
    SQLite file and an embedded Redis that the first process starts and exports to the processes
    it starts.
``models``
    ``User`` (a profile, with a version bumped on every committed update) and ``Card`` (derived
    from a user by a task), both tracked: their commits publish ``user:{id}`` / ``card:{user_id}``.
``store``
    The reads (through ``cached(session)``) and writes (through sessions) that web handlers and
    tasks share. Each process gets its own engine and cache (``runtime()``), built after fork.
``web``
    A Flask JSON API served by gunicorn sync workers (``gunicorn -c
    python:workers.gunicorn_conf workers.web:app``): ``GET /users/<id>``, ``PUT /users/<id>``,
    ``GET /_stats``.
``celery_app`` and ``tasks``
    The Celery app with :func:`hybridinval.celery.install`, and tasks that read through the
    cache and write through sessions. A write sends ``refresh_card`` with
    ``enqueue_on_commit``: after the commit and its invalidations, never on rollback.

``alembic/`` at the repository root migrates the schema; ``docker-compose.yml`` runs it all;
``hybridinval demo`` runs it all on one machine and checks that no read was stale.

The demo runs these very files: the wheel ships this package as ``hybridinval.demo.example``
and ``alembic/`` as ``hybridinval.demo.migrations`` (``pyproject.toml``), so the modules import
each other relatively, and name no package but their own (``__package__``). Nothing in the
library imports them; only the demo runs them.

This package must never hold a cache, engine or connection across ``fork`` (every process builds
its own on first use), and never publish or send anything for a transaction that did not commit.
"""
