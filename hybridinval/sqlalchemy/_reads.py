"""Reading through a session: ``cached(session)``, a :class:`SessionCache` that never caches what
the session could read wrongly (its own pending changes, or rows of a snapshot older than the L2
version)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from inspect import isawaitable
from typing import TYPE_CHECKING, Any, TypeVar, overload

from sqlalchemy import inspect
from sqlalchemy.orm import Session
from sqlalchemy.orm.state import InstanceState

from .._async import AsyncHybridCache
from .._cache import HybridCache
from ..errors import AmbiguousCacheError, SessionNotInstalledError
from ._frames import _sync_session, _uow_for
from ._registry import registry
from ._snapshot import _snapshot_is_fresh
from ._templates import _MISSING, _fields, _specs_for

if TYPE_CHECKING:
    from .._async import AnyCache

T = TypeVar("T")


# Bound once (the registry never rebinds it): read on every read through a session.
_outer_pending_data = registry.outer_pending_data


def cached(session: Any, cache: AnyCache | None = None) -> SessionCache:
    """The cache as seen from ``session``: ``cached(session).get_or_set(key, loader)``.

    ``session`` is a ``Session`` or ``AsyncSession`` whose class is installed (else
    :class:`~hybridinval.SessionNotInstalledError`: without the listeners its flushed but
    uncommitted changes would be invisible). ``cache`` defaults to the cache the session's class
    was installed with; when installations with different caches cover it (a base class and a
    sessionmaker, say), there is no default and :class:`~hybridinval.AmbiguousCacheError` asks
    for one. Any cache may be named, installed or not: only the session's changes must be known.

    Cheap (a dict lookup in ``session.info``): call it for each read or each request rather than
    keeping the result, which belongs to that session.
    """
    return SessionCache(cache, session)


class SessionCache:
    """``cache`` as seen from one session: never caches what that session could read wrongly.

    Built by :func:`cached` (``session`` may be an AsyncSession); ``SessionCache(cache, session)``
    is the same, ``cache=None`` choosing as :func:`cached` does. Cheap: make one per use. The
    session's class must be installed (so its flushed changes are known).
    """

    __slots__ = ("_async", "_is_clean", "cache", "session", "uow")

    def __init__(self, cache: AnyCache | None, session: Any) -> None:
        self.session = _sync_session(session)
        uow = _uow_for(self.session)
        if uow is None:
            raise SessionNotInstalledError(
                "cached(): this session's class is not installed, so its flushed but "
                "uncommitted changes are invisible to hybridinval; call "
                "hybridinval.sqlalchemy.install(session_factory, cache) first"
            )
        if cache is None:  # inline: cached(session) runs for every request
            caches = uow.caches
            if len(caches) != 1:
                raise _ambiguous_cache(caches)
            cache = caches[0]
        # The blocking methods read through the blocking face of an asyncio cache (a sync
        # Session, say in a Celery task); aget/aget_or_set await the asyncio one.
        if isinstance(cache, AsyncHybridCache):
            self._async: AsyncHybridCache | None = cache
            self.cache: HybridCache = cache.sync
        else:
            self._async = None
            self.cache = cache
        self.uow = uow
        session = self.session
        # SQLAlchemy's own cleanliness check (private, but long-standing), bound once: it runs
        # on every read, and building the three identity sets would cost microseconds.
        self._is_clean: Callable[[], bool] = getattr(
            session, "_is_clean", lambda: _session_is_clean(session)
        )

    def get(self, key: str, default: Any = None) -> Any:
        """The cached value, or ``default`` when the session has pending changes to ``key``
        (the caller then reads the session's own writes from the database)."""
        uow = self.uow  # inline fast path: nothing collected and nothing unflushed
        if (uow.frames or _outer_pending_data or not self._is_clean()) and self.is_pending(key):
            self._count_bypass()
            return default
        return self.cache.get(key, default)

    def get_or_set(self, key: str, loader: Callable[[], T], ttl: float | None = None) -> T:
        """``cache.get_or_set(key, loader, ttl)``, unless the value must not be shared: then
        ``loader()`` is called and its result returned without being stored anywhere."""
        uow = self.uow
        if (uow.frames or _outer_pending_data or not self._is_clean()) and self.is_pending(key):
            self._count_bypass()
            return loader()
        # An L1 entry is committed data: fine for any session without changes to it. Only a
        # fill (which compares a version read now with rows the session reads) cares about the
        # session's snapshot. The entry is used as read, not looked up again through the core:
        # evicted in between, the core would fill without the snapshot check.
        hit = self.cache.get_local(key, _NOT_CACHED)
        if hit is not _NOT_CACHED:
            return hit  # type: ignore[no-any-return]
        if not _snapshot_is_fresh(self.uow.connections):
            self._count_bypass()
            return loader()
        return self.cache.get_or_set(key, loader, ttl)

    async def aget(self, key: str, default: Any = None) -> Any:
        """``get`` for asyncio code: awaited through an :class:`~hybridinval.AsyncHybridCache`;
        with a blocking cache, an L1 miss reads L2 in a worker thread."""
        uow = self.uow
        if (uow.frames or _outer_pending_data or not self._is_clean()) and self.is_pending(key):
            self._count_bypass()
            return default
        if self._async is not None:
            return await self._async.get(key, default)
        hit = self.cache.get_local(key, _NOT_CACHED)
        if hit is not _NOT_CACHED:
            return hit
        return await asyncio.to_thread(self.cache.get, key, default)

    @overload
    async def aget_or_set(
        self, key: str, loader: Callable[[], Awaitable[T]], ttl: float | None = None
    ) -> T: ...

    @overload
    async def aget_or_set(
        self, key: str, loader: Callable[[], T], ttl: float | None = None
    ) -> T: ...

    async def aget_or_set(self, key: str, loader: Any, ttl: float | None = None) -> Any:
        """``get_or_set`` for asyncio code; ``loader`` is an async callable (an AsyncSession
        query) or a plain one.

        Through an :class:`~hybridinval.AsyncHybridCache` the read path is awaited on this loop.
        With a blocking cache, an L1 hit is answered on the loop and a miss runs the read path
        in a worker thread, which schedules ``loader()`` back on this loop and waits for it;
        the fill guard and the L2 compare-and-set work alike either way.
        """
        uow = self.uow
        if (uow.frames or _outer_pending_data or not self._is_clean()) and self.is_pending(key):
            self._count_bypass()
            return await _await(loader)
        # The asyncio cache's get_local never waits on the loop (an unprovable lease misses).
        hit = (self._async or self.cache).get_local(key, _NOT_CACHED)
        if hit is not _NOT_CACHED:
            return hit
        if not _snapshot_is_fresh(self.uow.connections):
            self._count_bypass()
            return await _await(loader)
        if self._async is not None:
            return await self._async.get_or_set(key, loader, ttl)
        loop = asyncio.get_running_loop()

        def run_loader() -> Any:
            return asyncio.run_coroutine_threadsafe(_await(loader), loop).result()

        return await asyncio.to_thread(self.cache.get_or_set, key, run_loader, ttl)

    def is_pending(self, key: str) -> bool:
        """Whether this session has changed, or may have changed, what ``key`` caches."""
        if type(key) is not str:
            raise TypeError(f"cache key must be a str, got {type(key).__name__}: {key!r:.100}")
        uow = self.uow
        if (uow.frames or _outer_pending_data) and uow.has_key(key):
            return True
        if self._is_clean():
            return False
        exact, patterns = _unflushed_keys(self.session)
        return key in exact or any(p.fullmatch(key) for p in patterns)

    def can_cache(self, key: str) -> bool:
        """Whether a value loaded through this session now may be stored in L1/L2."""
        return not self.is_pending(key) and _snapshot_is_fresh(self.uow.connections)

    def _count_bypass(self) -> None:
        primary = self.uow.primary
        if primary is not None:
            primary._stats["bypassed_reads"] += 1


_NOT_CACHED: Any = object()


def _ambiguous_cache(caches: tuple[AnyCache, ...]) -> AmbiguousCacheError:
    """The error for ``cached(session)`` when the installations covering the session publish to
    more than one cache (``caches``, as in its unit of work)."""
    namespaces = ", ".join(repr(c.namespace) for c in caches)
    return AmbiguousCacheError(
        f"cached(session): this session's class is installed with {len(caches)} caches "
        f"(namespaces {namespaces}), so there is no default; name the one to read: "
        f"cached(session, cache)"
    )


def _session_is_clean(session: Session) -> bool:
    """No unflushed new, dirty or deleted objects. Runs on every read through a session, so it
    uses SQLAlchemy's own cleanliness check where present (private, but long-standing) rather
    than building three identity sets."""
    try:
        return bool(session._is_clean())
    except AttributeError:
        return not (session.new or session.dirty or session.deleted)


async def _await(loader: Callable[[], Awaitable[T]] | Callable[[], T]) -> T:
    value = loader()
    if isawaitable(value):
        return await value
    return value


def _unflushed_keys(session: Session) -> tuple[set[str], list[re.Pattern[str]]]:
    """Keys of tracked objects changed in the session but not flushed yet.

    Old and new values are both pending. A value not known yet (the id of a new object, an
    old value never loaded) makes the template a pattern matching any value there.
    """
    exact: set[str] = set()
    patterns: list[re.Pattern[str]] = []
    if _session_is_clean(session):
        return exact, patterns
    for group, is_new in ((session.new, True), (session.dirty, False), (session.deleted, False)):
        for obj in group:
            specs = _specs_for(type(obj))
            if not specs:
                continue
            state: InstanceState[Any] = inspect(obj)
            current: dict[str, Any] = {}
            old: dict[str, Any] = {}
            for field in _fields(specs):
                value = state.dict.get(field, _MISSING)
                if is_new and value is None:
                    value = _MISSING  # assigned by the INSERT (autoincrement, defaults)
                current[field] = value
                if not is_new:
                    history = state.attrs[field].history
                    if history.deleted:
                        old[field] = history.deleted[0]
                    elif history.unchanged:
                        old[field] = history.unchanged[0]
                    else:
                        old[field] = _MISSING
            for values in (current, old) if not is_new else (current,):
                for spec in specs:
                    for template in spec.templates:
                        if any(values[f] is _MISSING for f in template.fields):
                            patterns.append(template.pattern(values))
                        else:
                            exact.add(template.format(values))
    return exact, patterns
