"""The Celery integration in real ``celery worker`` subprocesses (prefork, solo, threads, gevent).

Each test runs its own worker on a private Redis broker and a unique queue and cache namespace,
and stops it (warm shutdown, then SIGKILL of the process group it created) also on failure.
Tasks report the pid and the cache instance id that served them, so the tests see which process
did what.
"""

from __future__ import annotations

import importlib.util
import re
import time
from typing import Any

import pytest
import redis
from celery import Celery
from support import TcpProxy, celery_fixtures
from support.celery_fixtures import (
    StartWorker,
    cache_connections,
    closed,
    opened,
    probes,
    run,
    tagged,
)
from support.celery_worker import pid_alive
from support.waiting import wait_until

from hybridinval import HybridCache
from hybridinval.keyspace import Keyspace

pytestmark = pytest.mark.slow  # real Celery workers

# The shared fixtures, made visible to pytest in this module.
broker = celery_fixtures.broker
client = celery_fixtures.client
start_worker = celery_fixtures.start_worker


# -- 1. prefork: one cache per child, opened without blocking ---------------------------------


def test_prefork_children_start_while_cache_redis_is_down_and_recover(
    start_worker: StartWorker, client: Celery, tcp_proxy: TcpProxy, namespace: str
) -> None:
    """Every child (including replacements from --max-tasks-per-child) opens its own cache in
    worker_process_init without network I/O, so it starts although the cache's Redis refuses
    connections (Celery kills a child whose init takes over 4 s), and its subscriber recovers
    by itself when Redis comes back."""
    tcp_proxy.refuse()
    worker = start_worker(
        tagged(tcp_proxy.url, namespace), extra_args=["--max-tasks-per-child", "1"]
    )

    down = run(client, worker, probes(4, sleep=0.1))
    pids = {r["pid"] for r in down}
    assert len(pids) == 4, "with --max-tasks-per-child=1 every task runs in a new child"
    assert len({r["instance_id"] for r in down}) == 4, "each child has its own cache"
    assert all(r["ppid"] == worker.pid and r["pid"] != worker.pid for r in down)
    # Redis unreachable: no L1 (blind), and reads fall through to the loader in the child.
    assert not any(r["subscribed"] or r["l1_has_key"] for r in down)
    assert all(r["value"] == f"loaded-by-{r['pid']}" for r in down)
    assert all(r["sub_threads"] == 1 for r in down)

    # Let the pool replace the last two children while Redis still refuses.
    wait_until(lambda: len(opened(worker)) >= 6, timeout=20, what="replacement children start")
    healed_at = time.time()
    tcp_proxy.accept_again()
    # The two children alive now were forked (and opened their caches) while Redis refused.
    up = run(client, worker, probes(2, wait_subscribed=15, sleep=0.2))
    assert all(r["subscribed"] and r["l1_has_key"] for r in up), up
    assert any(r["opened_at"] < healed_at for r in up), "a child born blind recovered"
    assert not pids & {r["pid"] for r in up}

    # No cache was ever opened in the parent, and only worker_process_init opened any.
    assert all(
        pid != worker.pid and via == "worker_process_init" for pid, _, via in opened(worker)
    ), opened(worker)


def test_a_blocking_cache_factory_gets_replacement_children_killed(
    start_worker: StartWorker, client: Celery, redis_url: str, namespace: str
) -> None:
    """The canary for the test above: Celery really does kill a replacement child whose
    worker_process_init takes over 4 s (so a factory that waited for Redis would never serve)."""
    worker = start_worker(
        tagged(redis_url, namespace),
        extra_args=["--max-tasks-per-child", "1"],
        env={"HI_TEST_FACTORY_SLEEP": "4.5"},
    )
    client.send_task("hi_test.probe", ("k",))
    client.send_task("hi_test.probe", ("k",))
    wait_until(
        lambda: "Timed out waiting for UP message" in worker.log_text(),
        timeout=40,
        what="Celery kills a child that takes over 4 s to start",
    )
    assert "cache factory took" in worker.log_text(), "the slow factory is logged"


# -- 2. other pools: one cache per process, opened once ---------------------------------------


POOLS = ["solo", "threads"]
if importlib.util.find_spec("gevent") is not None:
    POOLS.append("gevent")


@pytest.mark.parametrize("pool", POOLS)
def test_non_forking_pools_run_one_cache_in_the_worker_process(
    pool: str, start_worker: StartWorker, client: Celery, redis_url: str, namespace: str
) -> None:
    worker = start_worker(tagged(redis_url, namespace), pool=pool, concurrency=2)
    results = run(client, worker, probes(6, wait_subscribed=10, sleep=0.05))
    assert {r["pid"] for r in results} == {worker.pid}, "tasks run in the main process"
    assert len({r["instance_id"] for r in results}) == 1
    assert all(r["subscribed"] for r in results)
    assert {r["sub_threads"] for r in results} == {1}
    # Opened exactly once (solo also sends worker_process_init; worker_ready follows init).
    assert len(opened(worker)) == 1 and opened(worker)[0][0] == worker.pid, opened(worker)

    # The process's subscriber works: an invalidation from here evicts its L1.
    with HybridCache.from_url(redis_url, namespace=namespace) as writer:
        writer.set("k", "from-test")
    time.sleep(0.05)  # δ: bounded staleness bounds it after the write returns, no tighter
    after = run(client, worker, probes(1))[0]
    assert after["value"] == "from-test" and after["invalidations_received"] >= 1

    instance = results[0]["instance_id"]
    assert worker.stop() == 0, worker.log_tail()
    assert closed(worker).get(instance) in {"worker_shutdown", "atexit"}, worker.log_tail()
    assert worker.members() == []


# -- 5. shutdown: nothing leaks across child cycles -------------------------------------------


def test_child_cycles_and_warm_shutdown_leak_no_connections_or_threads(
    start_worker: StartWorker, client: Celery, redis_url: str, namespace: str
) -> None:
    """Many --max-tasks-per-child=1 cycles: each child closes its subscriber and connections in
    worker_process_shutdown, connections on Redis stay bounded by the live children, and a warm
    shutdown leaves no process, connection or subscription behind."""
    cache_url = tagged(redis_url, namespace)
    parent_tag = f"{namespace}-parent"
    worker = start_worker(
        cache_url,
        extra_args=["--max-tasks-per-child", "1"],
        env={"HI_TEST_PARENT_CACHE_URL": tagged(redis_url, parent_tag)},
    )
    channel = Keyspace(namespace).channel
    seen: list[dict[str, Any]] = []
    peak = 0
    with redis.Redis.from_url(redis_url) as admin:
        for _ in range(5):
            seen += run(client, worker, probes(2, wait_subscribed=10))
            peak = max(peak, cache_connections(redis_url, namespace))
            subscribers = dict(admin.pubsub_numsub(channel))[channel.encode()]
            # Two children and the parent's own module-level cache.
            assert subscribers <= 3, f"{subscribers} subscribers for 2 children and the parent"
        instances = {r["instance_id"] for r in seen}
        assert len(instances) == 10 and all(r["subscribed"] for r in seen)
        assert {r["sub_threads"] for r in seen} == {1}
        # Two live children, each one subscriber connection and at most two pooled L2
        # connections: a task's read may overlap the read of the server's incarnation that
        # follows the subscription (seen: subscribe, info, get). A connection leaked per
        # child would exceed this bound within the five cycles; after shutdown the count is 0.
        assert peak <= 6, f"{peak} cache connections with 2 children"
        # The parent's own cache: reset in every child (new identity, not the task's cache, no
        # thread, no connection), still one subscriber in the parent only.
        parent_instance = re.findall(r"parent cache instance (\w+)", worker.log_text())
        assert len(parent_instance) == 1
        in_children = {r["parent_cache_instance"] for r in seen}
        assert parent_instance[0] not in in_children and len(in_children) == len(seen)
        assert not any(r["parent_cache_is_current"] for r in seen)
        # Its subscriber, and the L2 connection on which it records the server's incarnation
        # when it subscribes (to know, after a gap, whether L2's versions can be trusted).
        assert cache_connections(redis_url, parent_tag) == 2

        # Every replaced child closed its cache on its way out.
        wait_until(
            lambda: instances <= set(closed(worker)),
            timeout=15,
            what="every replaced child logs its cache closed",
        )
        assert set(closed(worker).values()) == {"worker_process_shutdown"}

        children = [pid for pid in worker.members() if pid != worker.pid]
        assert worker.stop() == 0, worker.log_tail()
        assert not any(pid_alive(pid) for pid in children)
        wait_until(
            lambda: cache_connections(redis_url, namespace) == 0,
            timeout=10,
            what="no cache connection outlives the worker",
        )
        assert dict(admin.pubsub_numsub(channel))[channel.encode()] == 0
    assert "Traceback" not in worker.log_text(), worker.log_tail()
