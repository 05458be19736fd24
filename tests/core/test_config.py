"""One configuration (CacheConfig) for the constructor and from_url, and what Redis keeps."""

from __future__ import annotations

import dataclasses

import pytest
import redis

from hybridinval import CacheConfig, HybridCache, Keyspace
from hybridinval.testing import MemoryHub, MemoryL2


def test_from_url_and_the_constructor_take_the_same_config(redis_url: str, namespace: str) -> None:
    config = CacheConfig(namespace=namespace, l1_ttl=5.0, l2_ttl=50.0, version_ttl=30.0)
    with HybridCache.from_url(redis_url, config=config) as a:
        assert a.config == config and a.namespace == namespace and a.l1_ttl == 5.0
        assert a.l2.version_ttl == 30.0, "from_url builds the L2 from the config"
    with HybridCache(l2=MemoryL2(), transport=MemoryHub().transport(), config=config) as b:
        assert b.config == config
    # keyword options override the config's, on both
    with HybridCache.from_url(redis_url, config=config, l1_ttl=7.0) as c:
        assert c.config == dataclasses.replace(config, l1_ttl=7.0)
    with HybridCache(l2=MemoryL2(), transport=MemoryHub().transport(), l2_ttl=9.0) as d:
        assert d.config == CacheConfig(l2_ttl=9.0)


def test_an_unknown_option_is_named(redis_url: str) -> None:
    with pytest.raises(TypeError, match=r"unknown cache option.*'l1_tll'.*l1_ttl"):
        HybridCache.from_url(redis_url, l1_tll=5)
    with pytest.raises(TypeError, match="'piggyback_publish'"):
        HybridCache(l2=MemoryL2(), transport=MemoryHub().transport(), piggyback_publish=False)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("l1_ttl", 0, "l1_ttl must be a number > 0, got 0"),
        ("l2_ttl", -1, "l2_ttl must be a number > 0"),
        ("version_ttl", "600", "version_ttl must be a number > 0, got '600'"),
        ("l1_max_entries", 0, "l1_max_entries must be an int >= 1"),
        ("l1_lease", 0, "l1_lease must be a number > 0"),
        ("l1_lease_wait", -1, "l1_lease_wait must be >= 0"),
        ("health_check_timeout", 0, "health_check_timeout must be a number > 0"),
        ("namespace", "a b", "namespace must be"),
    ],
)
def test_bad_values_are_refused_by_name(option: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CacheConfig(**{option: value})  # type: ignore[arg-type]


def test_the_incarnation_marker_expires(redis_url: str, namespace: str) -> None:
    """Nothing the library writes lives forever: the marker is refreshed, never immortal."""
    with HybridCache.from_url(redis_url, namespace=namespace, version_ttl=20.0) as cache:
        incarnation = cache.l2.incarnation()
        assert incarnation == cache.l2.incarnation()
        cache.set("k", 1)
    marker = Keyspace(namespace).incarnation
    with redis.Redis.from_url(redis_url) as raw:
        ttl = raw.pttl(marker)
        assert 0 < ttl <= 40_000
        for name in raw.scan_iter(Keyspace(namespace).pattern):
            assert raw.pttl(name) > 0, f"{name!r} never expires"


def test_stats_returns_exactly_the_fields_of_cache_stats() -> None:
    from typing import get_type_hints

    from hybridinval import CacheStats

    with HybridCache(l2=MemoryL2(), transport=MemoryHub().transport()) as cache:
        cache.get_or_set("k", lambda: 1)
        stats = cache.stats()
    hints = get_type_hints(CacheStats)
    assert set(stats) == set(hints)
    for name, value in stats.items():
        if value is not None:
            expected = hints[name]
            assert isinstance(value, getattr(expected, "__args__", (expected,))[0]), name
