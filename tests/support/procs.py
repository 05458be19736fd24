"""Entry points for child processes (importable by name, as multiprocessing's spawn requires)."""

from __future__ import annotations

import time
from multiprocessing.connection import Connection

from hybridinval import HybridCache
from support.inspect import entries


def l1_reader(url: str, namespace: str, key: str, conn: Connection) -> None:
    """Cache ``key`` in L1, report ready, then report how long after the parent's invalidate()
    started (wall clock, same machine) the key left this process's L1."""
    cache = HybridCache.from_url(url, namespace=namespace)
    try:
        assert cache.wait_until_subscribed(10)
        cache.get_or_set(key, lambda: "original")
        conn.send(("ready", cache.instance_id, key in entries(cache)))
        started_ns = conn.recv()  # the parent's time.time_ns() just before invalidate()
        deadline = time.monotonic() + 10
        while key in entries(cache) and time.monotonic() < deadline:
            pass  # spin: we are measuring sub-millisecond delivery
        evicted_ns = time.time_ns()
        stats = cache.stats()
        conn.send(
            ("evicted", key not in entries(cache), evicted_ns - started_ns, stats, cache.get(key))
        )
    finally:
        cache.close()
