"""Looking inside a cache built on the default seams (what the tests assert about)."""

from __future__ import annotations

from typing import Any

from hybridinval import HybridCache, MemoryL1, RedisL2


def entries(cache: HybridCache) -> dict[str, list[Any]]:
    """The cache's MemoryL1 map: ``key -> [value, expires_at, referenced, version]``."""
    l1 = cache.l1
    assert isinstance(l1, MemoryL1), f"{type(l1).__name__} has no map to look into"
    return l1.entries


def redis_l2(cache: HybridCache) -> RedisL2:
    l2 = cache.l2
    assert isinstance(l2, RedisL2), f"{type(l2).__name__} is not a RedisL2"
    return l2
