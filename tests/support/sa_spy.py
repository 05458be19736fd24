"""A spy on ``HybridCache.invalidate_committed``: what the unit of work published, and when."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hybridinval import AsyncHybridCache, HybridCache


class Publishes:
    """Records every ``invalidate_committed`` call of one cache (either kind), then lets it
    through."""

    def __init__(self, cache: HybridCache | AsyncHybridCache) -> None:
        self.calls: list[list[str]] = []
        self.before_each: list[Callable[[], None]] = []  # run at publish time, first
        original: Any = cache.invalidate_committed

        def record(keys: Any) -> list[str]:
            batch = list(keys)
            for hook in self.before_each:
                hook()
            self.calls.append(batch)
            return batch

        def spy(keys: Any, **options: Any) -> bool:
            return original(record(keys), **options)

        async def async_spy(keys: Any, **options: Any) -> bool:
            return await original(record(keys), **options)

        is_async = isinstance(cache, AsyncHybridCache)
        cache.invalidate_committed = async_spy if is_async else spy  # type: ignore[method-assign]

    @property
    def keys(self) -> set[str]:
        return {k for call in self.calls for k in call}

    def clear(self) -> None:
        self.calls.clear()


def record_invalidations(cache: HybridCache) -> list[list[str]]:
    """The batches ``cache.invalidate_many`` sends from now on (one Redis round trip each),
    in order; recorded once Redis took them."""
    sent: list[list[str]] = []
    invalidate = cache.invalidate_many

    def recording(keys: Any) -> None:
        batch = list(keys)
        invalidate(batch)
        sent.append(batch)

    cache.invalidate_many = recording  # type: ignore[method-assign]
    return sent
