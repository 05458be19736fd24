"""The L1 hit path, in C and in Python: one behaviour, two implementations.

``hybridinval._speedups`` answers the calls the Python methods would answer from L1 without a
lock (lease held, key present) and hands every other call to the Python method, arguments
untouched. Each test here runs on both paths (the ``hit_path`` fixture), so a difference
between them fails one of the two runs.
"""

from __future__ import annotations

import gc
import inspect
import time
import weakref
from collections.abc import Callable
from typing import Any

import pytest
from support.inspect import entries
from support.waiting import wait_until

import hybridinval._hitpath as cache_module
from hybridinval import HybridCache
from hybridinval.errors import CacheClosedError

CacheFactory = Callable[..., HybridCache]


def test_the_path_in_use_is_the_one_asked_for(make_cache: CacheFactory, hit_path: str) -> None:
    cache = make_cache()
    assert cache.accelerated is (hit_path == "c")
    assert type(cache.get).__name__ == ("HitPath" if hit_path == "c" else "method")


def test_hits_misses_and_defaults(make_cache: CacheFactory, hit_path: str) -> None:
    cache, writer = make_cache(), make_cache()
    assert cache.get("k") is None and cache.get("k", "dflt") == "dflt"
    assert cache.get_local("k") is None and cache.get_local("k", 0) == 0
    assert cache.get_or_set("k", lambda: {"v": 1}) == {"v": 1}
    value = cache.get("k")
    assert value == {"v": 1} and cache.get("k") is value  # stored, not copied
    assert cache.get_local("k") is value and cache.get_or_set("k", lambda: "no") is value
    # Keyword arguments take the Python method and mean the same there.
    assert cache.get(key="k") is value and cache.get_local(key="k", default=1) is value
    assert cache.get(key="absent", default=2) == 2
    assert cache.get_or_set("k", loader=lambda: "no", ttl=5) is value
    # L2 hit through the miss path: another process's value (read once its invalidation has
    # arrived, or the fill guard rightly keeps the value out of L1).
    writer.set("w", [1, 2])
    wait_until(lambda: cache.stats()["invalidations_received"] >= 1, what="the set's message")
    assert cache.get("w") == [1, 2] and "w" in entries(cache)


def test_a_hit_sets_the_reference_bit(make_cache: CacheFactory, hit_path: str) -> None:
    cache = make_cache()
    cache.get_or_set("k", lambda: 1)
    for read in (cache.get, cache.get_local, lambda key: cache.get_or_set(key, lambda: 2)):
        entries(cache)["k"][2] = 0
        assert read("k") == 1
        assert entries(cache)["k"][2] == 1


@pytest.mark.parametrize("bad", [b"bytes", 5, None, ("a", "b"), ["list"], {"d": 1}, ""])
def test_bad_keys_get_the_typed_errors_of_the_python_path(
    make_cache: CacheFactory, hit_path: str, bad: object
) -> None:
    cache = make_cache()
    error = ValueError if bad == "" else TypeError
    for read in (cache.get, cache.get_local, lambda key: cache.get_or_set(key, lambda: 1)):
        with pytest.raises(error, match="cache key"):
            read(bad)  # type: ignore[arg-type]  # the bad input is the point


def test_an_invalidation_is_seen_by_the_next_hit(make_cache: CacheFactory, hit_path: str) -> None:
    cache = make_cache()
    cache.get_or_set("k", lambda: "old")
    cache.invalidate("k")
    assert cache.get("k") is None and cache.get_local("k") is None
    assert cache.get_or_set("k", lambda: "new") == "new"


def test_an_expired_lease_goes_to_the_python_method(
    make_cache: CacheFactory, hit_path: str
) -> None:
    """The C path must not answer once the lease has run out, even for a key it holds: the
    Python method renews the lease first (a renewal that succeeds at once is not a wait)."""
    cache = make_cache(l1_lease=0.001)
    cache.get_or_set("k", lambda: 1)
    calls: list[str] = []
    original = cache._renew_lease

    def counted() -> None:
        calls.append("renew")
        original()

    cache._renew_lease = counted  # type: ignore[method-assign]
    cache._lease.until = time.monotonic() + 60
    assert cache.get("k") == 1 and calls == []  # under the lease: no renewal
    cache._lease.until = time.monotonic() - 1
    assert cache.get("k") == 1 and calls == ["renew"]
    assert cache._lease.until > time.monotonic()  # renewed, shared by every hit method
    cache._lease.until = 0.0
    assert cache.get_local("k") == 1 and calls == ["renew", "renew"]
    cache._lease.until = 0.0
    assert cache.get_or_set("k", lambda: 2) == 1 and len(calls) == 3


def test_without_a_lease_hits_never_renew(make_cache: CacheFactory, hit_path: str) -> None:
    cache = make_cache(l1_lease=None)
    cache.get_or_set("k", lambda: 1)
    cache._renew_lease = None  # type: ignore[assignment,method-assign]  # would raise if called
    assert cache._lease.until == float("inf")
    assert cache.get("k") == 1 and cache.get_local("k") == 1


@pytest.mark.parametrize("count_hits", [False, True])
def test_a_subclass_override_is_not_shadowed(
    redis_url: str, namespace: str, hit_path: str, count_hits: bool
) -> None:
    class Audited(HybridCache):
        seen: list[str]

        def get(self, key: str, default: Any = None) -> Any:
            self.seen.append(key)
            return ("audited", super().get(key, default))

    with Audited.from_url(redis_url, namespace=namespace, count_hits=count_hits) as cache:
        cache.seen = []
        assert cache.wait_until_subscribed(10)
        cache.get_or_set("k", lambda: 1)  # not overridden: may be the C path
        assert cache.get("k") == ("audited", 1) and cache.seen == ["k"]
        assert cache.get_local("k") == 1
        assert cache.stats()["l1_hits"] == (2 if count_hits else None)  # counted, if asked


def test_count_hits_counts_on_either_path(make_cache: CacheFactory, hit_path: str) -> None:
    cache = make_cache(count_hits=True)
    assert cache.accelerated is (hit_path == "c")  # the C path counts for free
    cache.get_or_set("k", lambda: 1)  # a miss
    for _ in range(3):
        cache.get("k")
    cache.get_local("k")
    cache.get_or_set("k", lambda: 2)
    assert cache.stats()["l1_hits"] == 5
    # Hits the Python method answers (the lease had run out) count too.
    for read in (cache.get, cache.get_local):
        cache._lease.until = 0.0
        assert read("k") == 1
    assert cache.stats()["l1_hits"] == 7
    assert cache.get("absent") is None and cache.stats()["l1_hits"] == 7
    with pytest.raises(TypeError, match="cache key"):
        cache.get(["unhashable"])  # type: ignore[arg-type]


def test_hits_are_not_counted_unless_asked(make_cache: CacheFactory, hit_path: str) -> None:
    cache = make_cache()
    cache.get_or_set("k", lambda: 1)
    assert cache.get("k") == 1 and cache.stats()["l1_hits"] is None


def test_introspection_shows_the_python_method(make_cache: CacheFactory, hit_path: str) -> None:
    cache = make_cache()
    for name in ("get", "get_or_set", "get_local"):
        method = getattr(cache, name)
        assert method.__doc__ == getattr(HybridCache, name).__doc__
        assert inspect.signature(method) == inspect.signature(
            getattr(HybridCache, name).__get__(cache)
        )


def test_a_closed_cache_refuses_reads(make_cache: CacheFactory, hit_path: str) -> None:
    cache = make_cache()
    cache.get_or_set("k", lambda: 1)
    cache.close()
    with pytest.raises(CacheClosedError):
        cache.get("k")
    assert cache.get_local("k") is None  # L1 was flushed


def test_a_dropped_cache_is_collected(redis_url: str, namespace: str, hit_path: str) -> None:
    """The hit path refers back to its cache (through the Python method); the cycle must not
    keep a closed, dropped cache alive. (A restore thread that close() cut short may hold the
    cache a moment longer, hence the wait; a leak never ends.)"""
    cache = HybridCache.from_url(redis_url, namespace=namespace)
    assert cache.wait_until_subscribed(10)
    cache.get_or_set("k", lambda: 1)
    assert cache.get("k") == 1
    ref = weakref.ref(cache)
    cache.close()
    del cache
    wait_until(lambda: gc.collect() >= 0 and ref() is None, what="the cache collected")
    assert ref() is None


def test_the_c_clock_is_the_one_time_monotonic_reads(speedups: Any) -> None:
    for _ in range(1000):
        before = time.monotonic()
        reading = speedups.monotonic()
        after = time.monotonic()
        assert before <= reading <= after


def test_pure_python_can_be_forced_by_environment(
    monkeypatch: pytest.MonkeyPatch, speedups: Any
) -> None:
    monkeypatch.setenv("HYBRIDINVAL_PURE_PYTHON", "1")
    assert cache_module.load_speedups() is None
    monkeypatch.delenv("HYBRIDINVAL_PURE_PYTHON")
    assert cache_module.load_speedups() is not None


def test_a_foreign_clock_disables_the_c_path(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, speedups: Any
) -> None:
    monkeypatch.setattr(speedups, "monotonic", lambda: time.monotonic() + 3600.0)
    assert cache_module.load_speedups() is None
    assert "different clock" in caplog.text
