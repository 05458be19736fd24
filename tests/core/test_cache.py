"""HybridCache behaviour against a real Redis: the read path, writes, guards and bad input.

Two HybridCache instances in one test have different instance ids and subscriber threads, so
their messages cross Redis exactly as between processes (the multi-process tests live in
test_multiprocess.py). Races are forced with events placed inside the L2 read or the loader.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from support.inspect import entries, wire_spy
from support.waiting import wait_until

import hybridinval
from hybridinval import (
    BackendUnavailableError,
    CacheClosedError,
    HybridCache,
    PickleSerializer,
    SerializationError,
)
from hybridinval._message import encode_message
from hybridinval.keyspace import Keyspace

CacheFactory = Callable[..., HybridCache]

pytestmark = pytest.mark.both_apis  # the blocking cache, and the asyncio one through AsyncView


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def received(cache: HybridCache, n: int) -> Callable[[], bool]:
    return lambda: cache.stats()["invalidations_received"] >= n


# -- the basic read and write path ------------------------------------------------------------


def test_get_or_set_fills_l2_then_l1(make_cache: CacheFactory) -> None:
    a, b = make_cache(), make_cache(count_hits=True)
    calls: list[int] = []
    assert a.get_or_set("user:1", lambda: calls.append(1) or {"id": 1}) == {"id": 1}
    assert "user:1" in entries(a)
    # b misses L1, hits L2: the loader does not run again.
    assert b.get_or_set("user:1", lambda: calls.append(2) or {"id": 2}) == {"id": 1}
    assert calls == [1]
    assert b.get("user:1") == {"id": 1}
    stats = b.stats()
    assert stats["l2_hits"] == 1 and stats["l1_hits"] == 1 and stats["loads"] == 0
    assert a.stats()["l1_hits"] is None  # not counted unless asked for


def test_counted_hits_cover_every_read_method(make_cache: CacheFactory) -> None:
    cache = make_cache(count_hits=True)
    cache.get_or_set("k", lambda: 1)  # a miss
    assert cache.get("k") == 1 and cache.get_or_set("k", lambda: 2) == 1
    assert cache.get_local("k") == 1 and cache.get_local("absent") is None
    assert cache.get.__doc__ and "L1" in cache.get.__doc__
    assert cache.stats()["l1_hits"] == 3


def test_get_returns_default_and_caches_nothing_on_a_miss(make_cache: CacheFactory) -> None:
    a = make_cache()
    assert a.get("nope") is None
    assert a.get("nope", default=7) == 7
    assert entries(a) == {}


def test_set_evicts_other_processes_and_is_read_back(make_cache: CacheFactory) -> None:
    a, b = make_cache(), make_cache()
    b.get_or_set("k", lambda: "v1")
    assert b.get("k") == "v1"
    a.set("k", "v2")
    assert a.get("k") == "v2"  # read your writes, from a's own L1
    wait_until(lambda: "k" not in entries(b), what="b evicts k")
    assert b.get("k") == "v2"


def test_invalidate_evicts_everywhere_and_clears_l2(
    make_cache: CacheFactory, raw: redis.Redis, namespace: str
) -> None:
    a, b = make_cache(), make_cache()
    for cache in (a, b):
        cache.get_or_set("k", lambda: "v")
    a.invalidate("k")
    assert "k" not in entries(a)  # before invalidate() returned
    assert raw.get(Keyspace(namespace).data("k")) is None
    wait_until(lambda: "k" not in entries(b), what="b evicts k")
    assert b.stats()["keys_evicted_remote"] == 1
    # a hears its own message, and only counts it (see test_own_echo_does_not_cancel...).
    wait_until(lambda: a.stats()["echoes_ignored"] == 1, what="a ignores its own echo")


def test_l1_ttl_expires_entries_in_the_background(make_cache: CacheFactory) -> None:
    a = make_cache(l1_ttl=0.05)
    a.get_or_set("k", lambda: "v")
    assert "k" in entries(a)
    wait_until(lambda: "k" not in entries(a), timeout=5, what="L1 expiry tick")
    assert a.get("k") == "v"  # still in L2


def test_ttl_bounds_l2(make_cache: CacheFactory, raw: redis.Redis, namespace: str) -> None:
    a = make_cache()
    a.get_or_set("short", lambda: 1, ttl=30)
    assert 0 < raw.pttl(Keyspace(namespace).data("short")) <= 30_000


def test_invalidating_1000_keys_is_one_round_trip(
    make_cache: CacheFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = make_cache(), make_cache()
    keys = [f"k{i}" for i in range(1000)]
    for key in keys[:50]:
        b.get_or_set(key, lambda: 1)
    a.get("warm-up")  # a's pooled connection exists (its handshake is not the invalidation's)
    sent = wire_spy(monkeypatch)
    a.invalidate_many(keys)
    monkeypatch.undo()
    assert len(sent) == 1 and b"EVALSHA" in sent[0]
    wait_until(lambda: not entries(b), what="b evicts all 50")
    assert b.stats()["invalidations_received"] == 1  # one batched message


def test_duplicate_keys_are_sent_once(make_cache: CacheFactory) -> None:
    a = make_cache()
    a.invalidate("x", "x", "y")
    assert a.stats()["keys_invalidated"] == 2


# -- single flight ----------------------------------------------------------------------------


def test_fifty_threads_run_the_loader_once(make_cache: CacheFactory) -> None:
    a = make_cache()
    release = threading.Event()
    calls: list[int] = []

    def loader() -> str:
        calls.append(1)
        release.wait(10)
        return "loaded"

    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(a.get_or_set("hot", loader)))
        for _ in range(50)
    ]
    for t in threads:
        t.start()
    wait_until(lambda: a.stats()["single_flight_waits"] >= 49, what="49 waiters")
    release.set()
    for t in threads:
        t.join(10)
    assert calls == [1]
    assert results == ["loaded"] * 50


def test_loader_error_reaches_every_waiter_and_caches_nothing(
    make_cache: CacheFactory, raw: redis.Redis, namespace: str
) -> None:
    a = make_cache()
    release = threading.Event()
    calls: list[int] = []

    def loader() -> str:
        calls.append(1)
        release.wait(10)
        raise LookupError("db says no")

    errors: list[BaseException] = []

    def call() -> None:
        try:
            a.get_or_set("bad", loader)
        except LookupError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(20)]
    for t in threads:
        t.start()
    wait_until(lambda: a.stats()["single_flight_waits"] >= 19, what="19 waiters")
    release.set()
    for t in threads:
        t.join(10)
    assert calls == [1] and len(errors) == 20
    assert "bad" not in entries(a) and raw.get(Keyspace(namespace).data("bad")) is None
    assert a.get_or_set("bad", lambda: "ok") == "ok"  # nothing sticky


def test_get_waiting_on_a_get_or_set_fill_gets_the_value(make_cache: CacheFactory) -> None:
    a = make_cache()
    release = threading.Event()
    out: list[object] = []
    t = threading.Thread(
        target=lambda: out.append(a.get_or_set("k", lambda: release.wait(5) and 1))
    )
    t.start()
    wait_until(lambda: "k" in a._local.fills, what="fill registered")
    g = threading.Thread(target=lambda: out.append(a.get("k")))
    g.start()
    wait_until(lambda: a.stats()["single_flight_waits"] >= 1, what="get waits")
    release.set()
    t.join(5)
    g.join(5)
    assert out == [True, True]


def test_get_or_set_after_a_plain_get_miss_still_loads(make_cache: CacheFactory) -> None:
    a = make_cache()
    gate = threading.Event()
    entered = threading.Event()
    real_get = a.l2.get

    def slow_get(key: str) -> Any:
        entered.set()
        gate.wait(5)
        return real_get(key)

    a.l2.get = slow_get  # type: ignore[method-assign]
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(a.get("k")))
    t.start()
    entered.wait(5)
    loader_out: list[object] = []
    w = threading.Thread(target=lambda: loader_out.append(a.get_or_set("k", lambda: "loaded")))
    w.start()
    wait_until(lambda: a.stats()["single_flight_waits"] >= 1, what="get_or_set joins the get")
    gate.set()
    t.join(5)
    w.join(5)
    assert got == [None] and loader_out == ["loaded"]


# -- fill guards and versioned L2 writes (no stale sets) --------------------------------------


def test_invalidation_during_an_l2_fill_cancels_the_l1_store(make_cache: CacheFactory) -> None:
    """Forced interleaving: a's L2 read returns the old value, then b invalidates, then a's
    fill tries to store in L1. Without the fill guard a would keep serving the old value."""
    a, b = make_cache(), make_cache()
    b.set("k", "old")
    wait_until(lambda: a.stats()["invalidations_received"] >= 1, what="a hears b's set")
    read_done, resume = threading.Event(), threading.Event()
    real_get = a.l2.get

    def get_then_pause(key: str) -> Any:
        result = real_get(key)  # the old value, read before the invalidation
        read_done.set()
        resume.wait(5)
        return result

    a.l2.get = get_then_pause  # type: ignore[method-assign]
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(a.get("k")))
    t.start()
    read_done.wait(5)
    b.invalidate("k")
    wait_until(received(a, 2), what="a hears the invalidation")
    resume.set()
    t.join(5)
    a.l2.get = real_get  # type: ignore[method-assign]
    assert out == ["old"]  # the read began before the invalidation: old is a valid answer
    assert "k" not in entries(a)  # ...but it must not be cached after it
    assert a.stats()["fill_guard_rejections"] >= 1
    assert a.get("k") is None


def test_invalidation_during_a_load_rejects_the_l2_write(
    make_cache: CacheFactory, raw: redis.Redis, namespace: str
) -> None:
    """The loader reads the old row, b invalidates, the loader returns: L2 must not take it."""
    a, b = make_cache(), make_cache()
    loading, resume = threading.Event(), threading.Event()

    def loader() -> str:
        value = "old row"
        loading.set()
        resume.wait(5)
        return value

    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(a.get_or_set("k", loader)))
    t.start()
    loading.wait(5)
    b.invalidate("k")
    resume.set()
    t.join(5)
    assert out == ["old row"]
    assert raw.get(Keyspace(namespace).data("k")) is None
    assert "k" not in entries(a)
    assert a.stats()["l2_cas_rejections"] == 1
    assert a.get_or_set("k", lambda: "new row") == "new row"


def test_cas_is_by_version_not_by_value(make_cache: CacheFactory, raw: redis.Redis) -> None:
    a = make_cache()
    l2 = a.l2
    assert l2.get("v") == (None, None)  # the hit path does not read a missing key's version
    payload, version = l2.get_for_fill("v")
    assert payload is None and version == b""
    assert l2.cas_set("v", b"jx", 60, version)
    assert l2.get("v") == (b"jx", b"")  # written while the key had no version
    a.invalidate("v")
    payload, new_version = l2.get_for_fill("v")
    assert payload is None and new_version not in (b"", version)
    assert not l2.cas_set("v", b"jstale", 60, version)  # the fill that read the old version
    assert l2.cas_set("v", b"jfresh", 60, new_version)
    assert l2.get("v") == (b"jfresh", new_version) == l2.get_for_fill("v")


def test_a_value_set_between_the_miss_and_the_version_read_is_served_not_overwritten(
    make_cache: CacheFactory, raw: redis.Redis, namespace: str
) -> None:
    """Forced interleaving: a's GET misses, b sets the key, then a reads the version to load
    under. Reading the version alone would make a load and overwrite b's value."""
    a, b = make_cache(), make_cache()
    real_get = a.l2.get

    def miss_then_b_sets(key: str) -> Any:
        result = real_get(key)
        b.set(key, "from b")
        return result

    a.l2.get = miss_then_b_sets  # type: ignore[method-assign]
    loads: list[str] = []
    assert a.get_or_set("k", lambda: loads.append("ran") or "loaded") == "from b"
    assert loads == [] and a.stats()["l2_hits"] == 1
    assert raw.get(Keyspace(namespace).data("k"))[16:] == b'j"from b"'


def test_an_l2_hit_is_one_get_and_carries_its_version(
    make_cache: CacheFactory, raw: redis.Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = make_cache(l1_enabled=False), make_cache()
    b.set("k", {"v": 1})
    version = raw.get(Keyspace(namespace).version("k"))
    assert version is not None and len(version) == 16
    assert raw.get(Keyspace(namespace).data("k")) == version + b'j{"v":1}'
    a.get("warm-up")  # a's pooled connection exists
    sent = wire_spy(monkeypatch)
    commands = lambda: [command.split(b"\r\n")[2] for command in sent]  # noqa: E731
    assert a.get("k") == {"v": 1} and commands() == [b"GET"]
    assert a.get("absent") is None and commands() == [b"GET"] * 2  # a plain miss: one GET
    assert a.get_or_set("absent", lambda: 2) == 2
    assert commands()[2:4] == [b"GET", b"MGET"]  # a miss that loads reads the version too


def test_long_fill_skips_l2_rather_than_trust_an_expired_version(
    make_cache: CacheFactory, raw: redis.Redis, namespace: str
) -> None:
    a = make_cache(version_ttl=0.2)
    import time

    a.get_or_set("slow", lambda: time.sleep(0.15) or "v")
    assert raw.get(Keyspace(namespace).data("slow")) is None
    assert a.stats()["l2_cas_rejections"] == 1


def test_a_get_arriving_after_an_invalidation_does_not_join_the_old_fill(
    make_cache: CacheFactory,
) -> None:
    a, b = make_cache(), make_cache()
    loading, resume = threading.Event(), threading.Event()
    calls: list[str] = []

    def old_loader() -> str:
        calls.append("old")
        loading.set()
        resume.wait(5)
        return "old"

    first: list[object] = []
    t = threading.Thread(target=lambda: first.append(a.get_or_set("k", old_loader)))
    t.start()
    loading.wait(5)
    b.invalidate("k")
    wait_until(received(a, 1), what="a hears it")
    # This read starts after the invalidation: it must run a new load, not wait for "old".
    assert a.get_or_set("k", lambda: calls.append("new") or "new") == "new"
    resume.set()
    t.join(5)
    assert calls == ["old", "new"] and first == ["old"]


# -- messages: echoes, duplicates, reordering, malformed ----------------------------------------


def test_duplicated_and_reordered_messages_converge(make_cache: CacheFactory) -> None:
    a = make_cache()
    for key in ("x", "y"):
        a.get_or_set(key, lambda: 1)
    m1 = encode_message("other", 1, ["x"])
    m2 = encode_message("other", 2, ["y"])
    for payload in (m2, m1, m2, m1):
        a._coherence.on_message(payload)
    assert entries(a) == {}
    assert a.stats()["invalidations_received"] == 4


def test_own_echo_does_not_cancel_own_fresh_fill(make_cache: CacheFactory) -> None:
    a = make_cache()
    a.invalidate("k")  # its echo may still be on the way
    a.get_or_set("k", lambda: "fresh")
    a._coherence.on_message(encode_message(a.instance_id, 999, ["k"]))
    assert a.get("k") == "fresh" and "k" in entries(a)
    assert a.stats()["echoes_ignored"] >= 1


def test_message_from_a_newer_schema_flushes_everything(make_cache: CacheFactory) -> None:
    a = make_cache()
    a.get_or_set("k", lambda: 1)
    a._coherence.on_message(b'{"v":99,"i":"future","s":1,"t":0,"something":"new"}')
    assert entries(a) == {}


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[1,2]", b'{"v":"1"}', b'{"v":1,"i":5}', b'{"v":1,"i":"x","k":[1]}', b"\xff"],
)
def test_malformed_messages_are_counted_and_survived(
    make_cache: CacheFactory,
    raw: redis.Redis,
    namespace: str,
    payload: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = make_cache(), make_cache()
    a.get_or_set("k", lambda: 1)
    with caplog.at_level(logging.WARNING, logger="hybridinval"):
        raw.publish(Keyspace(namespace).channel, payload)
        wait_until(lambda: a.stats()["messages_malformed"] == 1, what="malformed counted")
        # Counted, then logged, on the subscriber thread: wait for the log line too.
        wait_until(lambda: "malformed" in caplog.text, what="malformed logged")
    assert a.subscribed and "k" in entries(a)
    b.invalidate("k")  # the subscriber thread is still alive and working
    wait_until(lambda: "k" not in entries(a), what="later message still applied")


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [1, b"bytes", None, ("t",)])
def test_non_str_keys_are_a_type_error_naming_the_key(
    make_cache: CacheFactory, key: object
) -> None:
    a = make_cache()
    for call in (
        lambda: a.get(key),  # type: ignore[arg-type]
        lambda: a.get_or_set(key, lambda: 1),  # type: ignore[arg-type]
        lambda: a.set(key, 1),  # type: ignore[arg-type]
        lambda: a.invalidate(key),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match=repr(key).replace("(", r"\(").replace(")", r"\)")):
            call()


def test_unhashable_key_is_a_type_error(make_cache: CacheFactory) -> None:
    a = make_cache()
    with pytest.raises(TypeError):
        a.get(["list"])  # type: ignore[arg-type]


def test_empty_and_overlong_keys_are_value_errors(make_cache: CacheFactory) -> None:
    a = make_cache()
    with pytest.raises(ValueError, match="empty"):
        a.get("")
    long_key = "x" * (hybridinval.MAX_KEY_LENGTH + 1)
    with pytest.raises(ValueError, match=f"{hybridinval.MAX_KEY_LENGTH + 1} characters"):
        a.invalidate(long_key)
    a.get("x" * hybridinval.MAX_KEY_LENGTH)  # the limit itself is fine


def test_unserializable_value_names_the_key(make_cache: CacheFactory) -> None:
    a = make_cache()
    with pytest.raises(SerializationError, match="'obj:1'") as info:
        a.set("obj:1", {"when": object()})
    assert info.value.key == "obj:1"
    with pytest.raises(SerializationError, match="'obj:2'"):
        a.get_or_set("obj:2", lambda: {1, 2})
    assert "obj:2" not in entries(a)


def test_corrupt_l2_payload_is_a_logged_counted_replaced_miss(
    make_cache: CacheFactory,
    raw: redis.Redis,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = make_cache()
    raw.set(Keyspace(namespace).data("k"), b"\x80garbage")
    with caplog.at_level(logging.WARNING, logger="hybridinval"):
        assert a.get_or_set("k", lambda: {"ok": True}) == {"ok": True}
    assert "corrupt L2 payload for 'k'" in caplog.text
    assert a.stats()["l2_corrupt"] == 1
    assert raw.get(Keyspace(namespace).data("k")) == b"-" * 16 + b'j{"ok":true}'  # replaced


def test_default_serializer_does_not_unpickle_a_planted_payload(
    make_cache: CacheFactory, raw: redis.Redis, namespace: str
) -> None:
    a = make_cache()
    planted = PickleSerializer(b"attacker-knows-no-secret").dumps({"evil": 1})
    raw.set(Keyspace(namespace).data("k"), planted)
    assert a.get("k") is None
    assert a.stats()["l2_corrupt"] == 1


def test_pickle_is_opt_in_and_works(make_cache: CacheFactory) -> None:
    a = make_cache(serializer="pickle", serializer_secret=b"s" * 32)
    b = make_cache(serializer="pickle", serializer_secret=b"s" * 32)
    a.set("t", (1, frozenset({2})))
    assert b.get("t") == (1, frozenset({2}))


def test_bad_configuration_is_refused(redis_url: str) -> None:
    with pytest.raises(ValueError, match="namespace"):
        HybridCache.from_url(redis_url, namespace="has space")
    with pytest.raises(ValueError, match="ttl"):
        HybridCache.from_url(redis_url, l1_ttl=0)


def test_closed_cache_refuses_work(make_cache: CacheFactory) -> None:
    a = make_cache()
    a.close()
    a.close()  # idempotent
    with pytest.raises(CacheClosedError):
        a.get_or_set("k", lambda: 1)


def test_context_manager_closes(redis_url: str, namespace: str) -> None:
    with HybridCache.from_url(redis_url, namespace=namespace) as cache:
        cache.get_or_set("k", lambda: 1)
    with pytest.raises(CacheClosedError):
        cache.set("k", 2)


def test_stats_has_the_documented_counters(make_cache: CacheFactory) -> None:
    stats = make_cache().stats()
    for name in (
        "l1_hits",
        "l1_misses",
        "l2_hits",
        "l2_misses",
        "invalidations_sent",
        "invalidations_received",
        "flushes",
        "fill_guard_rejections",
        "lag_p50_us",
        "lag_p99_us",
        "publish_failures",
        "subscribed",
        "instance_id",
        "lease_waits",
        "lease_flushes",
    ):
        assert name in stats


def test_lag_is_measured(make_cache: CacheFactory) -> None:
    a, b = make_cache(), make_cache()
    for i in range(20):
        a.invalidate(f"k{i}")
    wait_until(received(b, 20), what="20 messages")
    stats = b.stats()
    assert stats["lag_samples"] == 20
    assert 0 <= stats["lag_p50_us"] <= stats["lag_p99_us"] <= stats["lag_max_us"]


def test_backend_errors_are_typed(redis_url: str, namespace: str) -> None:
    cache = HybridCache.from_url("redis://127.0.0.1:1/0", namespace=namespace)
    try:
        with pytest.raises(BackendUnavailableError):
            cache.set("k", 1)
        with pytest.raises(BackendUnavailableError):
            cache.invalidate("k")
    finally:
        cache.close()
