"""The example deployment (``workers/``) for real: gunicorn sync workers and a prefork Celery
worker on PostgreSQL (a private schema, migrated with alembic) and Redis.

What a user of the deployment relies on: a read after a write (plus δ) sees the write in every
web process and task; the card derived by ``refresh_card`` follows every committed update, also
updates made by tasks; every process leaves its stats when it stops. The settings' defaults are
checked in-process.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import support.repo  # noqa: F401 - the repository root (workers/) on sys.path
from celery import Celery
from support import RedisServer, free_port
from support.celery_worker import CeleryWorker, Spawned
from support.migrations import alembic, private_schema
from support.waiting import wait_until

from hybridinval.keyspace import Keyspace

pytestmark = pytest.mark.slow  # gunicorn and Celery processes

DELTA_S = 0.05


def http(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def task_caller(celery: Celery, namespace: str, worker: Spawned) -> Callable[..., Any]:
    """Run a task of the example on ``worker`` and return its result (or fail with its log)."""

    def task(task_name: str, *args: Any, **kwargs: Any) -> Any:
        result = celery.send_task(task_name, args, kwargs, queue=f"{namespace}.tasks")
        try:
            return result.get(timeout=30)
        except Exception as exc:
            raise AssertionError(f"{task_name}: {exc!r}\n{worker.log_tail()}") from exc

    return task


@pytest.fixture
def pg_schema_url(postgres_url: str) -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, migrated to head; dropped after."""
    with private_schema(postgres_url, "dep") as url:
        alembic(url, "upgrade", "head")
        yield url


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Spawned]]:
    started: list[Spawned] = []

    def start(kind: Callable[..., Spawned], *args: Any, **kwargs: Any) -> Spawned:
        proc = kind(*args, log_path=tmp_path / f"proc-{len(started)}.log", **kwargs)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.close()


def test_web_and_tasks_stay_coherent_on_postgresql(
    spawn: Callable[..., Spawned],
    pg_schema_url: str,
    redis_url: str,
    namespace: str,
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    broker = redis_server_factory()
    env = {
        "HYBRIDINVAL_DATABASE_URL": pg_schema_url,
        "HYBRIDINVAL_REDIS_URL": redis_url,
        "HYBRIDINVAL_BROKER_URL": broker.url,
        "HYBRIDINVAL_NAMESPACE": namespace,
    }
    port = free_port()
    web = spawn(
        Spawned,
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "python:workers.gunicorn_conf",
            "-b",
            f"127.0.0.1:{port}",
            "-w",
            "2",
            "workers.web:app",
        ],
        env=env,
    )
    worker = spawn(CeleryWorker, "workers.celery_app", env=env, queues=f"{namespace}.tasks")
    base = f"http://127.0.0.1:{port}"
    celery = Celery(
        f"client-{namespace}", broker=broker.url, backend=broker.url, set_as_current=False
    )
    task = task_caller(celery, namespace, worker)
    try:

        def up() -> bool:
            try:
                return bool(http("GET", f"{base}/healthz")["ok"])
            except OSError:
                assert web.alive(), web.log_tail()
                return False

        wait_until(up, timeout=30, what="gunicorn answers")
        created = http("POST", f"{base}/users", {"id": 1, "name": "Ada", "email": "a@x.org"})
        assert created["user"]["version"] == 1

        def read_everywhere(expected: int) -> set[int]:
            """Read through several web processes and both children; all see ``expected``."""
            pids = set()
            for _ in range(8):
                body = http("GET", f"{base}/users/1")
                assert body["user"]["version"] == expected, body
                pids.add(body["pid"])
            for _ in range(4):
                body = task("workers.read_user", 1)
                assert body["user"]["version"] == expected, body
            return pids

        read_everywhere(1)  # fills L1 in the processes that served
        updated = http("PUT", f"{base}/users/1", {"name": "Ada L."})
        assert updated["user"]["version"] == 2 and updated["user"]["name"] == "Ada L."
        time.sleep(DELTA_S)
        web_pids = read_everywhere(2)

        # A task's update is seen by the web processes too.
        by_task = task("workers.update_user", 1, name="Countess")
        assert by_task["user"]["version"] == 3
        time.sleep(DELTA_S)
        web_pids |= read_everywhere(3)

        # refresh_card was sent on each commit (after its invalidations): the card catches up.
        wait_until(
            lambda: http("GET", f"{base}/users/1/card")["user_version"] == 3,
            timeout=15,
            what="the card follows the last committed update",
        )
        assert http("GET", f"{base}/users/1/card")["headline"].startswith("Countess")

        stats = http("GET", f"{base}/_stats")
        assert stats["role"] == "web" and stats["reads"] > 0

        # Stopping: every web worker and every child leaves its stats in Redis.
        assert web.stop() == 0, web.log_tail()
        assert worker.stop() == 0, worker.log_tail()
        # (Imported here: importing the models tracks them, which no other test should see.)
        from workers.store import STATS_TTL_S, stats_key

        with redis.Redis.from_url(redis_url) as client:
            key = stats_key(namespace)
            assert key == Keyspace(namespace).app("process-stats")
            reported = {k.decode(): json.loads(v) for k, v in client.hgetall(key).items()}
            ttl = client.ttl(key)
            client.delete(key)
        assert 0 < ttl <= STATS_TTL_S, "the stats must not live in Redis forever"
        roles = [name.split(":")[0] for name in reported]
        assert roles.count("web") == 2 and roles.count("task") == 2, reported
        assert {f"web:{pid}" for pid in web_pids} <= set(reported)
        assert sum(r["invalidations_received"] for r in reported.values()) > 0
    finally:
        celery.close()


def test_settings_default_to_sqlite_and_an_embedded_redis_shared_with_children(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hybridinval._embedded import EmbeddedRedis
    from workers import settings

    for name in (
        "HYBRIDINVAL_DATABASE_URL",
        "HYBRIDINVAL_REDIS_URL",
        "HYBRIDINVAL_BROKER_URL",
        "HYBRIDINVAL_NAMESPACE",
    ):
        monkeypatch.delenv(name, raising=False)
    loaded = settings.load()
    server = EmbeddedRedis._shared
    try:
        assert server is not None and loaded.redis_url == server.url
        assert os.environ["HYBRIDINVAL_REDIS_URL"] == server.url, (
            "exported for the processes it starts"
        )
        assert loaded.broker_url == loaded.redis_url
        assert loaded.database_url == "sqlite:///workers.db"
        assert loaded.namespace == "workers"
        assert settings.load().redis_url == server.url, "started once"
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
    finally:
        if server is not None:
            server.stop()
    monkeypatch.setenv("HYBRIDINVAL_REDIS_URL", "redis://example.invalid:1/0")
    monkeypatch.setenv("HYBRIDINVAL_BROKER_URL", "redis://broker.invalid:1/0")
    loaded = settings.load()
    assert (loaded.redis_url, loaded.broker_url) == (
        "redis://example.invalid:1/0",
        "redis://broker.invalid:1/0",
    )


def test_asyncio_services_sync_web_and_tasks_stay_coherent(
    spawn: Callable[..., Spawned],
    pg_schema_url: str,
    redis_url: str,
    namespace: str,
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    """The FastAPI service under ``uvicorn --workers 2`` and under gunicorn's UvicornWorker,
    beside the Flask app and a Celery worker whose task runs asyncio code under
    ``asyncio.run``: a write through any of them is read back by all of them."""
    broker = redis_server_factory()
    env = {
        "HYBRIDINVAL_DATABASE_URL": pg_schema_url,
        "HYBRIDINVAL_REDIS_URL": redis_url,
        "HYBRIDINVAL_BROKER_URL": broker.url,
        "HYBRIDINVAL_NAMESPACE": namespace,
    }
    ports = {name: free_port() for name in ("uvicorn", "gunicorn-uvicorn", "flask")}
    servers = {
        "uvicorn": [
            sys.executable, "-m", "uvicorn", "workers.api:app",
            "--host", "127.0.0.1", "--port", str(ports["uvicorn"]), "--workers", "2",
        ],
        "gunicorn-uvicorn": [
            sys.executable, "-m", "gunicorn", "-k", "uvicorn_worker.UvicornWorker",
            "-b", f"127.0.0.1:{ports['gunicorn-uvicorn']}", "-w", "2", "workers.api:app",
        ],
        "flask": [
            sys.executable, "-m", "gunicorn", "-c", "python:workers.gunicorn_conf",
            "-b", f"127.0.0.1:{ports['flask']}", "-w", "1", "workers.web:app",
        ],
    }  # fmt: skip
    procs = {name: spawn(Spawned, argv, env=env) for name, argv in servers.items()}
    worker = spawn(CeleryWorker, "workers.celery_app", env=env, queues=f"{namespace}.tasks")
    bases = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    celery = Celery(
        f"client-{namespace}", broker=broker.url, backend=broker.url, set_as_current=False
    )
    task = task_caller(celery, namespace, worker)
    try:
        for name, base in bases.items():

            def up(base: str = base, name: str = name) -> bool:
                try:
                    return bool(http("GET", f"{base}/healthz")["ok"])
                except OSError:
                    assert procs[name].alive(), procs[name].log_tail()
                    return False

            wait_until(up, timeout=30, what=f"{name} answers")
        created = http("POST", f"{bases['uvicorn']}/users", {"id": 7, "name": "A", "email": "a@x"})
        assert created["user"]["version"] == 1 and created["process"].startswith("api:")

        served: set[str] = set()

        def read_everywhere(expected: int) -> None:
            for base in bases.values():
                for _ in range(6):
                    body = http("GET", f"{base}/users/7")
                    assert body["user"]["version"] == expected, body
                    served.add(body["process"])
            for task_name in ("workers.read_user", "workers.read_user_async") * 2:
                body = task(task_name, 7)
                assert body["user"]["version"] == expected, (task_name, body)

        read_everywhere(1)  # fills L1 in every process that served
        version = 1
        for writer in ("uvicorn", "gunicorn-uvicorn", "flask"):
            version += 1
            updated = http("PUT", f"{bases[writer]}/users/7", {"name": f"by {writer}"})
            assert updated["user"]["version"] == version, updated
            time.sleep(DELTA_S)
            read_everywhere(version)
        version += 1
        assert task("workers.update_user", 7, name="by a task")["user"]["version"] == version
        time.sleep(DELTA_S)
        read_everywhere(version)
        # The API's enqueue_on_commit sent refresh_card after its commits too.
        wait_until(
            lambda: http("GET", f"{bases['uvicorn']}/users/7/card")["user_version"] == version,
            timeout=15,
            what="the card follows the last committed update",
        )
        api_processes = {p for p in served if p.startswith("api:")}
        assert len(api_processes) >= 3, served  # several asyncio processes took part

        for name, proc in procs.items():
            assert proc.stop() == 0, (name, proc.log_tail())
        assert worker.stop() == 0, worker.log_tail()
        from workers.store import stats_key

        with redis.Redis.from_url(redis_url) as client:
            reported = {
                k.decode(): json.loads(v) for k, v in client.hgetall(stats_key(namespace)).items()
            }
            client.delete(stats_key(namespace))
        roles = [name.split(":")[0] for name in reported]
        assert roles.count("api") == 4 and roles.count("web") == 1, reported
        assert api_processes <= set(reported), "every asyncio process left its stats"
        assert all(reported[p]["invalidations_received"] > 0 for p in api_processes), reported
    finally:
        celery.close()
