"""Fixtures and helpers for the tests that run real ``celery worker`` subprocesses.

Each test gets a private Redis broker (no other test's worker can take its tasks), a client app
that sends to the test's own queue, and ``start_worker`` whose workers are all stopped at
teardown, also on failure. Test modules import what they use by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from .celery_worker import CeleryWorker
from .servers import RedisServer

TASK_TIMEOUT = 30.0
StartWorker = Callable[..., CeleryWorker]


@pytest.fixture
def broker(redis_server_factory: Callable[..., RedisServer]) -> RedisServer:
    """A private Redis for the broker and result backend: no other test's worker listens."""
    return redis_server_factory()


@pytest.fixture
def client(broker: RedisServer, namespace: str) -> Iterator[Celery]:
    app = Celery(f"client-{namespace}", broker=broker.url, backend=broker.url, set_as_current=False)
    app.conf.task_default_queue = namespace
    try:
        yield app
    finally:
        app.close()


@pytest.fixture
def start_worker(tmp_path: Path, broker: RedisServer, namespace: str) -> Iterator[StartWorker]:
    workers: list[CeleryWorker] = []

    def start(
        cache_url: str,
        pool: str = "prefork",
        concurrency: int = 2,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> CeleryWorker:
        worker = CeleryWorker(
            "support.celery_app",
            env={
                "HI_TEST_BROKER_URL": broker.url,
                "HI_TEST_QUEUE": namespace,
                "HI_TEST_CACHE_URL": cache_url,
                "HI_TEST_NAMESPACE": namespace,
                **(env or {}),
            },
            log_path=tmp_path / f"worker-{len(workers)}.log",
            pool=pool,
            concurrency=concurrency,
            queues=namespace,
            extra_args=extra_args,
        )
        workers.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in workers:
            worker.close()


def tagged(url: str, namespace: str) -> str:
    """The URL with a client name, so the test can find this cache's connections on Redis."""
    return f"{url}{'&' if '?' in url else '?'}client_name=hi-{namespace}"


def run(
    client: Celery,
    worker: CeleryWorker,
    calls: Sequence[tuple[str, tuple[Any, ...], dict[str, Any]]],
) -> list[dict[str, Any]]:
    """Send every call at once, then collect the results (in order)."""
    pending = [client.send_task(name, args, kwargs) for name, args, kwargs in calls]
    try:
        return [p.get(timeout=TASK_TIMEOUT) for p in pending]
    except Exception as exc:
        raise AssertionError(f"tasks failed: {exc!r}\nworker log:\n{worker.log_tail()}") from exc


def probes(
    n: int, key: str = "k", **kwargs: Any
) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    return [("hi_test.probe", (key,), kwargs)] * n


def cache_connections(url: str, namespace: str) -> int:
    """Connections on the Redis at ``url`` whose client name is this test's cache tag."""
    with redis.Redis.from_url(url) as admin:
        clients = admin.client_list()
    return sum(1 for c in clients if c.get("name") == f"hi-{namespace}")


def opened(worker: CeleryWorker) -> list[tuple[int, str, str]]:
    """(pid, instance id, signal) of every "cache opened" line in the worker's log."""
    pattern = r"cache opened in pid (\d+) \(instance (\w+), namespace \S+, via (\w+)\)"
    return [(int(p), i, s) for p, i, s in re.findall(pattern, worker.log_text())]


def closed(worker: CeleryWorker) -> dict[str, str]:
    """instance id -> the hook that closed it, from the worker's log."""
    pattern = r"cache closed in pid \d+ \(instance (\w+), via (\w+)\)"
    return dict(re.findall(pattern, worker.log_text()))
