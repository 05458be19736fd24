"""The blocking API of a HybridCache, answered by an AsyncHybridCache's asyncio paths.

So that the tests written for the guarantees of the blocking cache run, unchanged, against the
asyncio one (``@pytest.mark.both_apis``). Each call runs on the calling thread's own event loop,
made on first use and kept for the thread's life: a test that reads from several threads reads
from as many loops, which exercises single flight across loops. Everything else (L1, the
backplane state, the blocking L2 that the restore after a gap uses) is the cache's own, reached
through :attr:`AsyncHybridCache.sync`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from hybridinval import AsyncHybridCache, CacheStats

T = TypeVar("T")

_loops = threading.local()


def run(awaitable: Awaitable[T]) -> T:
    """Run ``awaitable`` to completion on this thread's own event loop."""
    loop = getattr(_loops, "loop", None)
    if loop is None:
        loop = _loops.loop = asyncio.new_event_loop()

    async def wrapped() -> T:
        return await awaitable

    return loop.run_until_complete(wrapped())


HOOKABLE = ("get", "get_for_fill", "cas_set", "set", "invalidate_many")


class HookableL2:
    """The asyncio cache's L2 as the blocking tests see it (``view.l2``).

    Reading an attribute gives the blocking store's (``view.l2.versions``, ``view.l2.get("k")``
    in a test). Replacing one of the read or write methods (``view.l2.get = hook``, the tests'
    forced interleavings) makes the asyncio path await ``hook`` instead, run in a worker thread,
    where it may call the blocking original; assigning the original back removes the hook.
    """

    def __init__(self, async_l2: Any, sync_l2: Any) -> None:
        object.__setattr__(self, "_async", async_l2)
        object.__setattr__(self, "_sync", sync_l2)
        object.__setattr__(self, "hooks", {})
        object.__setattr__(self, "version_ttl", async_l2.version_ttl)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sync, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in HOOKABLE:
            setattr(self._sync, name, value)
        elif value == getattr(type(self._sync), name).__get__(self._sync):
            self.hooks.pop(name, None)
        else:
            self.hooks[name] = value

    def awaited(self) -> Any:
        """What the asyncio cache awaits: the hooks, else the real asyncio store."""
        return _Awaited(self)


class _Awaited:
    def __init__(self, hookable: HookableL2) -> None:
        self._hookable = hookable

    def __getattr__(self, name: str) -> Any:
        hook = self._hookable.hooks.get(name)
        real = getattr(self._hookable._async, name)
        if hook is None:
            return real

        async def hooked(*args: Any) -> Any:
            return await asyncio.to_thread(hook, *args)

        return hooked


class AsyncView:
    """A HybridCache-shaped view of ``cache`` whose reads and writes are its asyncio ones."""

    def __init__(self, cache: AsyncHybridCache) -> None:
        self.async_cache = cache
        self.l2 = HookableL2(cache.l2, cache.sync.l2)
        cache.l2 = self.l2.awaited()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.async_cache.sync, name)

    def get(self, key: str, default: Any = None) -> Any:
        return run(self.async_cache.get(key, default))

    def get_or_set(
        self, key: str, loader: Callable[[], Any], ttl: float | None = None, **kwargs: Any
    ) -> Any:
        return run(self.async_cache.get_or_set(key, loader, ttl, **kwargs))

    def get_local(self, key: str, default: Any = None) -> Any:
        return self.async_cache.get_local(key, default)

    def set(self, key: str, value: Any, ttl: float | None = None) -> None:
        run(self.async_cache.set(key, value, ttl))

    def invalidate(self, *keys: str) -> None:
        run(self.async_cache.invalidate(*keys))

    def invalidate_many(self, keys: Iterable[str]) -> None:
        run(self.async_cache.invalidate_many(keys))

    def invalidate_committed(self, keys: Iterable[str], **kwargs: Any) -> bool:
        return run(self.async_cache.invalidate_committed(keys, **kwargs))

    def wait_until_subscribed(self, timeout: float = 5.0) -> bool:
        return run(self.async_cache.wait_until_subscribed(timeout))

    def stats(self) -> CacheStats:
        return self.async_cache.stats()

    @property
    def accelerated(self) -> bool:
        return self.async_cache.accelerated

    def close(self) -> None:
        self.async_cache.close()

    def __enter__(self) -> AsyncView:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


for _name in ("get", "get_or_set", "get_local", "set", "invalidate", "invalidate_many"):
    getattr(AsyncView, _name).__doc__ = getattr(AsyncHybridCache, _name).__doc__


def view_of(cache: Any, api: str) -> Any:
    """``cache`` (a HybridCache) as the test's ``api`` sees it: itself for "sync"; for "async",
    an AsyncHybridCache over it, seen through :class:`AsyncView`."""
    if api == "sync":
        return cache
    assert api == "async", api
    return AsyncView(AsyncHybridCache.wrap(cache))
