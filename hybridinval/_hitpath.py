"""The L1 hit path: which code answers ``get``/``get_or_set``/``get_local``, and the lease it reads.

Three paths, chosen once per process by :func:`install`:

* **C** (``hybridinval._speedups``, where built): a :class:`MemoryL1` hit is answered without
  entering Python; everything else is forwarded to the cache's Python method.
* **Python over the map**: the cache's own methods read :attr:`MemoryL1.entries` directly (no C
  extension, ``HYBRIDINVAL_PURE_PYTHON=1``, or a subclass that overrides a read method).
* **Any other** :class:`~hybridinval.L1Store`: the same logic through :meth:`L1Store.lookup`.

Every path honours the L1 lease: a hit after ``lease.until`` renews it first (see
:meth:`hybridinval._coherence.Coherence.renew_lease`), and reads again, since a renewal may
have flushed L1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from ._l1 import L1Store, MemoryL1
from ._local import MISSING

__all__ = ["NEVER", "HitPaths", "Lease", "load_speedups", "new_lease"]

log = logging.getLogger("hybridinval")

_monotonic = time.monotonic
NEVER = float("inf")
READS = ("get", "get_or_set", "get_local")


class Lease:
    """The deadline until which L1 may answer without a check (pure-Python twin of
    ``_speedups.Lease``; one is shared by a cache's hit paths)."""

    __slots__ = ("until",)

    def __init__(self, until: float = 0.0) -> None:
        self.until = until


def load_speedups() -> Any:
    """The C hit path, or None: not built, turned off by ``HYBRIDINVAL_PURE_PYTHON=1``, or on a
    clock other than ``time.monotonic()``'s (checked here, since the lease compares the two)."""
    if os.environ.get("HYBRIDINVAL_PURE_PYTHON"):
        return None
    try:
        from . import _speedups
    except ImportError:
        return None
    before = _monotonic()
    reading = _speedups.monotonic()
    after = _monotonic()
    if not before <= reading <= after:
        log.warning(
            "hybridinval._speedups reads a different clock than time.monotonic() "
            "(%r not within [%r, %r]); using the pure-Python hit path",
            reading,
            before,
            after,
        )
        return None
    return _speedups


_speedups = load_speedups()


def new_lease(until: float) -> Any:
    """A lease the chosen hit path can read (the C type where the accelerator is built)."""
    return Lease(until) if _speedups is None else _speedups.Lease(until)


ReadThrough = Callable[[str, Any, Any, Any], Any]


class HitPaths:
    """The read methods installed on one cache, and their hit counts."""

    def __init__(
        self,
        target: Any,
        base: type,
        l1: L1Store,
        lease: Any,
        *,
        count_hits: bool,
        renew: Callable[[], None],
        read_through: ReadThrough,
        check_key: Callable[[object], object],
    ) -> None:
        """Install on ``target`` (a cache whose class derives from ``base``, the class whose
        methods read :attr:`MemoryL1.entries`) the fastest correct read methods.

        Instance attributes shadow the methods. A subclass's override keeps the Python path,
        and so does an L1 other than a :class:`MemoryL1`. The C path counts its own hits for
        free; elsewhere hits are counted only when ``count_hits`` asks for it.
        """
        self.c_paths: list[Any] = []
        self.python_hits = 0
        for name in READS:
            # After fork: drop the parent's paths. Not through __dict__: materialising an
            # instance's dict turns off CPython's inline attribute values, which made every
            # self._entries / self._lease read on the Python hit path 2x slower.
            with contextlib.suppress(AttributeError):
                delattr(target, name)
        if type(l1) is not MemoryL1:
            for name, path in _lookup_paths(self, l1, lease, renew, read_through, check_key):
                setattr(target, name, path)
            return
        entries = l1.entries
        for name in READS:
            method = getattr(type(target), name)
            python = self._counting(target, method, entries) if count_hits else None
            if _speedups is not None and method is getattr(base, name):
                path = _speedups.HitPath(entries, lease, python or method.__get__(target))
                self.c_paths.append(path)
                setattr(target, name, path)
            elif python is not None:
                setattr(target, name, python)

    @property
    def accelerated(self) -> bool:
        return bool(self.c_paths)

    def hits(self) -> int:
        return self.python_hits + sum(int(path.hits) for path in self.c_paths)

    def _counting(
        self, target: Any, method: Callable[..., Any], entries: dict[str, Any]
    ) -> Callable[..., Any]:
        """``method`` with L1 hits counted (a key present before the call counts as a hit)."""

        def counted(key: str, *args: Any, **kwargs: Any) -> Any:
            try:
                if key in entries:
                    self.python_hits += 1
            except TypeError:  # unhashable: the method reports it
                pass
            return method(target, key, *args, **kwargs)

        counted.__doc__ = method.__doc__
        counted.__wrapped__ = method.__get__(target)  # type: ignore[attr-defined]
        return counted


def _lookup_paths(
    paths: HitPaths,
    l1: L1Store,
    lease: Any,
    renew: Callable[[], None],
    read_through: ReadThrough,
    check_key: Callable[[object], object],
) -> list[tuple[str, Callable[..., Any]]]:
    """The read methods for an L1 read through :meth:`L1Store.lookup` (hits always counted:
    a lookup costs more than the counter)."""
    lookup = l1.lookup

    def hit(key: str) -> Any:
        try:
            entry = lookup(key)
        except TypeError:  # unhashable: the caller's miss path names the key
            return MISSING
        if entry is not None and _monotonic() >= lease.until:
            renew()
            entry = lookup(key)
        if entry is None:
            return MISSING
        paths.python_hits += 1
        return entry[0]

    def get(key: str, default: Any = None) -> Any:
        value = hit(key)
        if value is MISSING:
            value = read_through(key, None, None, None)
            return default if value is MISSING else value
        return value

    def get_or_set(
        key: str,
        loader: Callable[[], Any],
        ttl: float | None = None,
        *,
        l1_ttl: float | None = None,
    ) -> Any:
        value = hit(key)
        return read_through(key, loader, ttl, l1_ttl) if value is MISSING else value

    def get_local(key: str, default: Any = None) -> Any:
        value = hit(key)
        if value is MISSING:
            check_key(key)
            return default
        return value

    return [("get", get), ("get_or_set", get_or_set), ("get_local", get_local)]
