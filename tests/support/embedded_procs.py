"""Processes for the shared embedded Redis tests: each builds HybridCache.from_url() itself."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from hybridinval import HybridCache
from support.inspect import entries, redis_l2


def writer_then_invalidate(namespace: str, conn: Any) -> None:
    """Set "k", tell the parent, wait for its go, invalidate "k", report, hold until told."""
    with HybridCache.from_url(namespace=namespace) as cache:
        assert cache.wait_until_subscribed(10)
        cache.set("k", "v1")
        conn.send(("set", redis_l2(cache).endpoint))
        assert conn.recv() == "invalidate"
        cache.invalidate("k")
        conn.send("invalidated")
        conn.recv()


def reader(namespace: str, conn: Any) -> None:
    """Read "k" into L1, report, then report once another process's invalidation evicted it."""
    with HybridCache.from_url(namespace=namespace) as cache:
        assert cache.wait_until_subscribed(10)
        conn.send(("read", cache.get("k"), redis_l2(cache).endpoint, "k" in entries(cache)))
        deadline = time.monotonic() + 10
        while "k" in entries(cache) and time.monotonic() < deadline:
            time.sleep(0.001)
        conn.send(("evicted", "k" not in entries(cache), cache.get("k")))
        conn.recv()


FORKED_PAIR = r"""
import os, sys, time
import hybridinval
from hybridinval import HybridCache

namespace = sys.argv[1]
r, w = os.pipe()
children = []
for role in ("writer", "reader"):
    pid = os.fork()
    if pid == 0:  # a gunicorn-style worker: the cache is built after the fork
        os.close(r)
        with HybridCache.from_url(namespace=namespace) as cache:
            assert cache.wait_until_subscribed(10)
            if role == "writer":
                cache.set("k", "from-writer")
                time.sleep(0.5)
                cache.invalidate("k")
                out = "writer ok"
            else:
                deadline = time.monotonic() + 5
                value = None
                while value is None and time.monotonic() < deadline:
                    value = cache.get("k")
                    time.sleep(0.01)
                while "k" in cache.l1.entries and time.monotonic() < deadline + 5:
                    time.sleep(0.001)
                out = f"reader saw {value} evicted={'k' not in cache.l1.entries}"
        os.write(w, (out + "\n").encode())
        os._exit(0)
    children.append(pid)
os.close(w)
for pid in children:
    os.waitpid(pid, 0)
sys.stdout.write(os.read(r, 4096).decode())
"""


def run_forked_pair(namespace: str) -> str:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", FORKED_PAIR, namespace],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ.copy(),
    )
    assert out.returncode == 0, out.stderr
    return out.stdout
