"""Blind means bypass: real faults on the subscriber's connection, and Redis going away.

Each test runs a private redis-server (safe to kill) behind a TCP proxy the test controls. The
cache under test talks to Redis only through the proxy; a second, healthy cache (the "writer")
talks to the server directly, so its messages keep flowing while the first one is cut off.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from support import RedisServer, TcpProxy
from support.async_view import view_of
from support.caches import subscribed_caches
from support.inspect import entries
from support.waiting import wait_until

from hybridinval import BackendUnavailableError, HybridCache
from hybridinval.keyspace import Keyspace

FAST = {"health_check_interval": 0.1, "health_check_timeout": 0.2, "socket_timeout": 0.3}


pytestmark = pytest.mark.both_apis  # every fault, on the blocking and the asyncio paths


@pytest.fixture
def make_cache(namespace: str, api: str) -> Iterator[Callable[..., HybridCache]]:
    with subscribed_caches(
        namespace, wrap=lambda cache: view_of(cache, api), defaults=FAST
    ) as make:
        yield make


def fill(cache: HybridCache, key: str, value: object) -> None:
    cache.get_or_set(key, lambda: value)
    assert key in entries(cache)


def pause_first_restore(cache: HybridCache) -> tuple[threading.Event, threading.Event]:
    """Make the cache's first L1 restore pause right after it read the L2 versions. Returns
    (paused, resume); later restores run through."""
    paused, resume = threading.Event(), threading.Event()
    real_versions = cache.l2.versions

    def versions(keys: Any) -> list[bytes]:
        result = real_versions(keys)
        if not paused.is_set():
            paused.set()
            resume.wait(10)
        return result

    cache.l2.versions = versions  # type: ignore[method-assign]
    return paused, resume


def cut_off(proxy: TcpProxy, cache: HybridCache) -> None:
    """Cut the cache's connections through ``proxy`` and refuse new ones until blind."""
    proxy.refuse()
    proxy.cut()
    wait_until(lambda: not cache.subscribed, what="blind")


def blind_count(cache: HybridCache) -> int:
    return int(cache.stats()["blind_periods"])


def test_cut_connection_flushes_l1_and_bypasses_until_resubscribed(
    make_cache: Callable[..., HybridCache], redis_server: RedisServer, tcp_proxy: TcpProxy
) -> None:
    reader = make_cache(tcp_proxy.url)
    writer = make_cache(redis_server.url)
    fill(reader, "k", "v1")
    cut_off(tcp_proxy, reader)  # no way back in until accept_again()
    assert entries(reader) == {}
    # While blind: reads work (L2 unreachable through the proxy, so the loader serves them)
    # and nothing is stored in L1.
    assert reader.get_or_set("k", lambda: "from-loader") == "from-loader"
    assert entries(reader) == {}
    writer.set("k", "v2")  # published while the reader cannot hear it
    tcp_proxy.accept_again()
    wait_until(lambda: reader.subscribed, what="reader resubscribes")
    assert reader.get("k") == "v2"
    assert blind_count(reader) == 1


def test_half_open_connection_is_detected_by_health_check(
    make_cache: Callable[..., HybridCache], redis_server: RedisServer, tcp_proxy: TcpProxy
) -> None:
    """A black-holed socket raises no error at all; only the missing PONG reveals it."""
    reader = make_cache(tcp_proxy.url)
    writer = make_cache(redis_server.url)
    fill(reader, "k", "v1")
    tcp_proxy.blackhole()
    writer.set("k", "v2")  # this message is lost for the reader
    wait_until(lambda: not reader.subscribed, what="missed PONG turns the reader blind")
    assert "k" not in entries(reader)
    assert reader.get("k") != "v1"  # never the stale L1 value (L2 is unreachable: default)
    tcp_proxy.heal()
    wait_until(lambda: reader.subscribed, timeout=10, what="reader reconnects after heal")
    assert reader.get("k") == "v2"


def test_client_kill_type_pubsub(
    make_cache: Callable[..., HybridCache], redis_server: RedisServer
) -> None:
    reader = make_cache(redis_server.url)
    fill(reader, "k", "v1")
    admin = redis.Redis.from_url(redis_server.url)
    killed = admin.client_kill_filter(_type="pubsub")
    assert killed >= 1
    wait_until(lambda: blind_count(reader) == 1, what="reader goes blind on EOF")
    assert "k" not in entries(reader)
    wait_until(lambda: reader.subscribed, what="reader resubscribes")
    fill(reader, "k", "v1")  # L1 is in use again
    admin.close()


def test_redis_closing_a_slow_subscriber_for_its_output_buffer(
    make_cache: Callable[..., HybridCache],
    redis_server_factory: Callable[..., RedisServer],
) -> None:
    server = redis_server_factory("--client-output-buffer-limit", "pubsub 256kb 0 0")
    reader = make_cache(server.url)
    writer = make_cache(server.url)
    fill(reader, "k", "v1")
    admin = redis.Redis.from_url(server.url)

    def subscribers() -> int:
        return len(admin.client_list(_type="pubsub"))

    assert subscribers() == 2
    # Stall the reader's subscriber thread inside its message handler (it needs the cache lock),
    # so the kernel's socket buffers and then Redis's output buffer for it fill up.
    big_keys = [f"key-{i:04d}-" + "x" * 200 for i in range(200)]  # ~45 KB per message
    with reader._local.lock:
        writer.invalidate("first")
        for _ in range(1000):
            writer.invalidate_many(big_keys)
            if subscribers() == 1:
                break
        assert subscribers() == 1, "Redis did not drop the stalled subscriber"
    admin.close()
    wait_until(lambda: blind_count(reader) == 1, what="reader goes blind")
    assert "k" not in entries(reader)
    wait_until(lambda: reader.subscribed, what="reader resubscribes")


def test_redis_down_then_back(
    make_cache: Callable[..., HybridCache], redis_server: RedisServer
) -> None:
    cache = make_cache(redis_server.url)
    fill(cache, "k", "v1")
    redis_server.kill()
    wait_until(lambda: not cache.subscribed, what="cache goes blind")
    assert entries(cache) == {}
    # Reads still work through the loader, and nothing lands in L1 while blind.
    assert cache.get_or_set("k", lambda: "loader") == "loader"
    assert cache.get_or_set("other", lambda: 42) == 42
    assert entries(cache) == {}
    assert cache.stats()["l2_errors"] >= 2
    with pytest.raises(BackendUnavailableError):
        cache.set("k", "v")
    with pytest.raises(BackendUnavailableError):
        cache.invalidate("k")
    redis_server.start()  # same port, empty (no persistence)
    wait_until(lambda: cache.subscribed, timeout=10, what="subscriber recovers by itself")
    assert cache.get_or_set("k", lambda: "fresh") == "fresh"
    assert "k" in entries(cache)
    cache.set("k", "after")  # writes work again


def test_fill_begun_while_blind_cannot_store_after_resubscribe(
    make_cache: Callable[..., HybridCache], redis_server: RedisServer, tcp_proxy: TcpProxy
) -> None:
    reader = make_cache(tcp_proxy.url)
    cut_off(tcp_proxy, reader)  # no way back in until accept_again()
    loading, resume = threading.Event(), threading.Event()

    def loader() -> str:
        loading.set()
        resume.wait(10)
        return "read while blind"

    t = threading.Thread(target=lambda: reader.get_or_set("k", loader))
    t.start()
    loading.wait(5)
    tcp_proxy.accept_again()
    wait_until(lambda: reader.subscribed, what="resubscribed")
    resume.set()
    t.join(10)
    assert "k" not in entries(reader)
    assert reader.stats()["fill_guard_rejections"] >= 1


def test_publish_failure_after_commit_is_retried_in_background(
    make_cache: Callable[..., HybridCache], redis_server: RedisServer, tcp_proxy: TcpProxy
) -> None:
    writer = make_cache(tcp_proxy.url)
    reader = make_cache(redis_server.url)
    fill(reader, "k", "old")
    fill(writer, "k", "old")
    tcp_proxy.refuse()
    tcp_proxy.cut()
    assert writer.invalidate_committed(["k"]) is False  # never raises
    assert "k" not in entries(writer) and writer.stats()["publish_failures"] == 1
    assert writer.pending_retries() == 1
    assert "k" in entries(reader)  # not told yet
    tcp_proxy.accept_again()
    wait_until(lambda: "k" not in entries(reader), timeout=10, what="retry lands")
    wait_until(lambda: writer.pending_retries() == 0, what="retry queue drained")
    assert writer.stats()["publish_retries_succeeded"] >= 1


def test_scripts_survive_a_script_cache_flush(
    make_cache: Callable[..., HybridCache], redis_server: RedisServer
) -> None:
    cache = make_cache(redis_server.url)
    cache.set("k", "v1")
    admin = redis.Redis.from_url(redis_server.url)
    admin.script_flush()  # as after a restart or failover: EVALSHA now answers NOSCRIPT
    cache.set("k", "v2")
    admin.script_flush()
    cache.invalidate("k")
    admin.script_flush()
    assert cache.get_or_set("k", lambda: "v3") == "v3"
    assert admin.get(Keyspace(cache.namespace).data("k"))[16:] == b'j"v3"'
    admin.close()


def test_entries_unchanged_in_l2_survive_a_backplane_gap(
    make_cache: Callable[..., HybridCache], redis_server: RedisServer, tcp_proxy: TcpProxy
) -> None:
    reader = make_cache(tcp_proxy.url)
    writer = make_cache(redis_server.url)
    writer.set("same", "same-v1")
    writer.set("changed", "changed-v1")
    # Let the reader hear both sets first, or they would (rightly) cancel its fills below.
    wait_until(lambda: reader.stats()["invalidations_received"] == 2, what="sets heard")
    fill(reader, "same", "unused")  # an L2 hit: stored with the version it was read under
    fill(reader, "changed", "unused")
    fill(reader, "loaded", "loaded-v1")  # a loader fill: stored with the version it CAS'd
    cut_off(tcp_proxy, reader)  # no way back in until accept_again()
    assert entries(reader) == {}  # never served while blind
    writer.set("changed", "changed-v2")  # missed by the reader
    tcp_proxy.accept_again()
    wait_until(lambda: reader.subscribed, what="resubscribed")
    wait_until(lambda: reader.stats()["l1_restored"] == 2, what="restore done")
    assert set(entries(reader)) == {"same", "loaded"}
    assert reader.get("same") == "same-v1" and reader.get("loaded") == "loaded-v1"
    assert reader.get("changed") == "changed-v2"


def test_an_invalidation_during_the_restore_wins(
    make_cache: Callable[..., HybridCache], redis_server: RedisServer, tcp_proxy: TcpProxy
) -> None:
    """Forced interleaving: the restore has read the old version; then this process invalidates
    the key (its own echo is ignored, so only the cancellation can stop the restore)."""
    reader = make_cache(tcp_proxy.url)
    fill(reader, "k", "old")
    read_versions, resume = pause_first_restore(reader)
    cut_off(tcp_proxy, reader)
    tcp_proxy.accept_again()
    assert read_versions.wait(10)
    reader.invalidate("k")
    resume.set()
    wait_until(lambda: reader._local.restoring is None and reader.subscribed, what="restore done")
    assert "k" not in entries(reader)
    assert reader.stats()["l1_restored"] == 0


def test_a_gap_that_recurs_before_the_restore_ran_still_restores(
    make_cache: Callable[..., HybridCache], redis_server: RedisServer, tcp_proxy: TcpProxy
) -> None:
    """A flapping network: the connection drops again while the first restore is in flight.
    The entries set aside must survive for the next restore, not vanish with the first."""
    reader = make_cache(tcp_proxy.url)
    writer = make_cache(redis_server.url)
    fill(reader, "same", "same-v1")
    fill(reader, "changed", "changed-v1")
    in_restore, resume = pause_first_restore(reader)
    cut_off(tcp_proxy, reader)
    tcp_proxy.accept_again()
    assert in_restore.wait(10)
    cut_off(tcp_proxy, reader)  # second gap, before the first restore stored anything
    assert blind_count(reader) == 2
    writer.set("changed", "changed-v2")  # missed by the reader
    resume.set()  # the first restore finds its epoch gone and stores nothing
    tcp_proxy.accept_again()
    wait_until(lambda: reader.stats()["l1_restored"] == 1, what="second restore")
    assert set(entries(reader)) == {"same"}
    assert reader.get("same") == "same-v1" and reader.get("changed") == "changed-v2"
    assert reader._local.quarantine == {}  # released once a restore has dealt with it


def test_a_restarted_redis_proves_nothing_so_l1_is_dropped(
    make_cache: Callable[..., HybridCache], redis_server: RedisServer
) -> None:
    cache = make_cache(redis_server.url)
    fill(cache, "k", "v1")
    redis_server.kill()  # no persistence: every version is gone with it
    wait_until(lambda: not cache.subscribed, what="blind")
    redis_server.start()
    wait_until(lambda: cache.subscribed, timeout=10, what="resubscribed")
    wait_until(lambda: cache.stats()["l1_quarantine_dropped"] == 1, what="quarantine dropped")
    assert entries(cache) == {} and cache.stats()["l1_restored"] == 0
