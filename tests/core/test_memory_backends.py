"""The cache's guarantees on seams other than Redis: hybridinval.testing's in-memory L2 and
transport, an L1 that is not MemoryL1, and a RedisL2 under a non-Redis transport."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from support.inspect import entries
from support.waiting import wait_until

from hybridinval import HybridCache, MemoryL1, RedisL2
from hybridinval._l1 import Entry
from hybridinval._l2 import redis_client
from hybridinval.testing import MemoryHub, MemoryL2, MemoryTransport

Factory = Callable[..., HybridCache]


@pytest.fixture
def memory() -> Iterator[tuple[MemoryL2, MemoryHub, Factory]]:
    l2, hub = MemoryL2(), MemoryHub()
    caches: list[HybridCache] = []

    def make(**options: Any) -> HybridCache:
        cache = HybridCache(l2=l2, transport=hub.transport(), **options)
        caches.append(cache)
        assert cache.wait_until_subscribed(10)
        return cache

    yield l2, hub, make
    for cache in caches:
        cache.close()


def test_caches_on_one_memory_l2_and_hub_see_each_others_invalidations(
    memory: tuple[MemoryL2, MemoryHub, Factory],
) -> None:
    _, _, make = memory
    a, b = make(), make()
    a.set("k", "v1")
    # set()'s own message may reach b after b began to read, and would then (rightly) cancel
    # b's fill: wait for it first.
    wait_until(lambda: b.stats()["invalidations_received"] == 1, what="b heard the set")
    assert b.get("k") == "v1" and "k" in entries(b)
    a.invalidate("k")
    wait_until(lambda: "k" not in entries(b), what="b evicts k")
    assert b.get_or_set("k", lambda: "v2") == "v2"
    assert a.stats()["echoes_ignored"] >= 1 and b.stats()["invalidations_received"] == 2


def test_the_fill_guard_holds_on_memory_seams(memory: tuple[MemoryL2, MemoryHub, Factory]) -> None:
    _, _, make = memory
    a, b = make(), make()
    loading, invalidated = threading.Event(), threading.Event()

    def slow_loader() -> str:
        loading.set()
        assert invalidated.wait(5)
        return "read-before-the-invalidation"

    reader = threading.Thread(target=lambda: b.get_or_set("k", slow_loader))
    reader.start()
    assert loading.wait(5)
    a.invalidate("k")
    wait_until(lambda: b.stats()["invalidations_received"] >= 1, what="b heard it")
    invalidated.set()
    reader.join(5)
    assert "k" not in entries(b)
    assert b.stats()["fill_guard_rejections"] + b.stats()["l2_cas_rejections"] >= 1
    assert b.get_or_set("k", lambda: "fresh") == "fresh"


def test_a_cut_transport_bypasses_l1_and_restores_what_l2_proves_unchanged(
    memory: tuple[MemoryL2, MemoryHub, Factory],
) -> None:
    _, _, make = memory
    a, b = make(), make()
    transport = b.transport
    assert isinstance(transport, MemoryTransport)
    b.get_or_set("same", lambda: "same-v1")
    b.get_or_set("changed", lambda: "changed-v1")
    transport.cut()
    wait_until(lambda: not b.subscribed, what="blind")
    assert entries(b) == {} and b.stats()["blind_periods"] == 1
    a.set("changed", "changed-v2")  # b cannot hear this
    assert b.get("changed") == "changed-v2", "blind: read from L2, not L1"
    transport.heal()
    assert b.wait_until_subscribed(10)
    wait_until(lambda: b.stats()["l1_restored"] == 1, what="restore")
    assert set(entries(b)) == {"same"}
    assert b.get("same") == "same-v1" and b.get("changed") == "changed-v2"


def test_a_flushed_l2_restores_nothing(memory: tuple[MemoryL2, MemoryHub, Factory]) -> None:
    l2, _, make = memory
    b = make()
    b.get_or_set("k", lambda: 1)
    assert isinstance(b.transport, MemoryTransport)
    b.transport.cut()
    wait_until(lambda: not b.subscribed, what="blind")
    l2.flush()  # a restarted server: its versions prove nothing
    b.transport.heal()
    assert b.wait_until_subscribed(10)
    wait_until(lambda: b.stats()["l1_quarantine_dropped"] == 1, what="dropped")
    assert entries(b) == {}


def test_a_failed_committed_publish_flushes_and_is_retried(
    memory: tuple[MemoryL2, MemoryHub, Factory],
) -> None:
    l2, _, make = memory
    a, b = make(), make()
    b.get_or_set("k", lambda: "old")
    a.get_or_set("other", lambda: 1)
    l2.fail()
    assert a.invalidate_committed(["k"]) is False
    assert entries(a) == {} and a.stats()["publish_failures"] == 1
    assert a.stats()["pending_publishes"] == 1 and a.pending_retries() == 1
    l2.recover()
    wait_until(lambda: a.pending_retries() == 0, what="retry")
    wait_until(lambda: "k" not in entries(b), what="b evicts after the retry")
    assert a.stats()["publish_retries_succeeded"] == 1


def test_redis_l2_under_a_foreign_transport_publishes_through_it(
    redis_url: str, namespace: str
) -> None:
    """The transport decides whether a message can ride L2's script: a RedisL2 with a
    transport that is not Redis Pub/Sub must hand every message to transport.publish."""
    hub = MemoryHub()
    caches = [
        HybridCache(
            l2=RedisL2(redis_client(redis_url), namespace),
            transport=hub.transport(),
            namespace=namespace,
        )
        for _ in range(2)
    ]
    a, b = caches
    try:
        assert a.wait_until_subscribed(10) and b.wait_until_subscribed(10)
        b.get_or_set("k", lambda: "old")
        a.set("k", "new")
        wait_until(lambda: "k" not in entries(b), what="b evicts after set()")
        assert b.get("k") == "new"
        wait_until(lambda: "k" in entries(b), what="b holds the new value")
        a.invalidate("k")
        wait_until(lambda: "k" not in entries(b), what="b evicts after invalidate()")
        assert b.get_or_set("k", lambda: "loaded") == "loaded"
    finally:
        for cache in caches:
            cache.close()


class DictL1:
    """An L1 that is not a MemoryL1: read through lookup(), never through a shared map."""

    def __init__(self) -> None:
        self.inner = MemoryL1()
        self.lookups = 0

    def __len__(self) -> int:
        return len(self.inner)

    def lookup(self, key: str) -> Entry | None:
        self.lookups += 1
        return self.inner.lookup(key)

    def store(self, key: str, value: Any, expires_at: float, version: bytes | None = None) -> None:
        self.inner.store(key, value, expires_at, version)

    def evict_many(self, keys: Iterable[str]) -> int:
        return self.inner.evict_many(keys)

    def clear(self) -> int:
        return self.inner.clear()

    def expire(self, now: float) -> int:
        return self.inner.expire(now)

    def snapshot(self) -> dict[str, Entry]:
        return self.inner.snapshot()


def test_any_l1_store_serves_hits_and_is_evicted(
    memory: tuple[MemoryL2, MemoryHub, Factory],
) -> None:
    l2, hub, make = memory
    a = make()
    l1 = DictL1()
    b = HybridCache(l2=l2, transport=hub.transport(), l1=l1, count_hits=True)
    try:
        assert b.wait_until_subscribed(10) and not b.accelerated
        assert b.get_or_set("k", lambda: "v1") == "v1"
        calls = l2.calls
        assert b.get("k") == "v1" and b.get_local("k") == "v1"
        assert b.get_or_set("k", lambda: "never") == "v1"
        assert l2.calls == calls, "hits never reached L2"
        assert b.stats()["l1_hits"] == 3 and l1.lookups >= 3
        a.invalidate("k")
        wait_until(lambda: l1.inner.lookup("k") is None, what="evicted")
        assert b.get("k") is None and b.get("k", "dflt") == "dflt"
        with pytest.raises(TypeError, match="cache key must be a str"):
            b.get_local(5)  # type: ignore[arg-type]
    finally:
        b.close()


def test_the_retry_thread_survives_close_and_unexpected_errors(
    memory: tuple[MemoryL2, MemoryHub, Factory], monkeypatch: pytest.MonkeyPatch
) -> None:
    l2, _, make = memory
    escaped: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    a, b = make(), make()
    b.get_or_set("k", lambda: "old")
    real = l2.invalidate_many
    calls: list[int] = []

    def flaky(keys: Any, notify: Any = None) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug in a store, not an outage")
        real(keys, notify)

    monkeypatch.setattr(l2, "invalidate_many", flaky)
    l2.fail()
    assert a.invalidate_committed(["k"]) is False  # the first call: the store is down
    l2.recover()  # the retry's first attempt meets the bug, its second succeeds
    wait_until(lambda: a.pending_retries() == 0, what="retried past the bug")
    wait_until(lambda: "k" not in entries(b), what="b evicted")
    # Closing with a retry pending (the store down again) ends the thread quietly.
    l2.fail()
    assert a.invalidate_committed(["k2"]) is False
    a.close()
    l2.recover()
    wait_until(
        lambda: not any(t.name == "hybridinval-retry" for t in threading.enumerate()),
        what="retry thread ended",
    )
    assert escaped == []
