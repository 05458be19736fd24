"""Caches for fault tests: subscribed, their first incarnation read, closed at the end."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from hybridinval import HybridCache

from .waiting import wait_until

__all__ = ["FAST", "subscribed_caches"]

FAST: dict[str, Any] = {
    "health_check_interval": 0.2,
    "health_check_timeout": 0.3,
    "socket_timeout": 0.5,
}
"""Health checks and timeouts short enough for a fault to show within a test."""


@contextlib.contextmanager
def subscribed_caches(
    namespace: str,
    default_url: str | None = None,
    *,
    wrap: Callable[[HybridCache], Any] = lambda cache: cache,
    defaults: dict[str, Any] | None = None,
) -> Iterator[Callable[..., Any]]:
    """``make(url=default_url, **options)``: a cache with ``defaults`` (:data:`FAST`) under
    ``options``,
    subscribed and with its first incarnation read (the first subscription reads it off the
    delivery thread; a gap that begins before that read proves nothing after it, so tests that
    restore across a gap wait for it). ``wrap`` gives the view a test uses (say, asyncio's)."""
    caches: list[Any] = []
    base = FAST if defaults is None else defaults

    def make(url: str | None = None, **options: Any) -> Any:
        cache = wrap(
            HybridCache.from_url(url or default_url, namespace=namespace, **{**base, **options})
        )
        caches.append(cache)
        assert cache.wait_until_subscribed(10)
        wait_until(lambda: bool(cache._coherence._incarnation), what="incarnation read")
        return cache

    try:
        yield make
    finally:
        for cache in caches:
            cache.close()
