"""The asyncio cache's hot paths against baselines measured in the same run.

* L1 hit: ``await cache.get`` on a cached key vs a bare ``async def`` that returns a dict
  lookup (the coroutine floor), cashews' client-side hit, and the blocking cache's hit;
  ``cache.get_local`` vs the blocking ``cache.get``. Each round times every statement in turn,
  less an empty loop timed in the same round (``await`` of a coroutine that does nothing, for
  the awaited ones; nothing, for the plain calls); medians over the rounds.
* L2 hit: ``await cache.get`` with L1 off vs a raw ``redis.asyncio`` GET plus ``json.loads``.
* Eviction behind a busy loop: another process invalidates a key while this process's event
  loop is (a) idle, awaiting, or (b) stuck in a CPU-bound handler that never yields. The time
  from the sender's ``invalidate()`` to the key leaving L1 (stamped by the subscriber thread
  that evicts it) shows what a busy loop costs eviction: the subscriber needs the GIL, which
  the handler gives up only at the interpreter's switch interval.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

import redis.asyncio as aredis

from hybridinval import AsyncHybridCache, HybridCache

from . import contenders as cmod

VALUE = {"id": 1, "name": "Ada", "email": "ada@example.com", "tags": list(range(10))}


async def _timed(fn: Callable[[], Awaitable[Any]], number: int) -> float:
    started = time.perf_counter()
    for _ in range(number):
        await fn()
    return (time.perf_counter() - started) / number * 1e9


def _timed_sync(fn: Callable[[], Any], number: int) -> float:
    started = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - started) / number * 1e9


def bench_l1_hit(url: str, rounds: int = 25, number: int = 20_000) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        namespace = f"bench-{uuid.uuid4().hex[:8]}"
        cashews = cmod.Cashews(cmod.Env(url, f"hibench-{uuid.uuid4().hex[:8]}", 60.0))
        async with AsyncHybridCache.from_url(url, namespace=namespace) as cache:
            assert await cache.wait_until_subscribed(10)
            await cashews.ainit()
            assert await cashews.aready(10)
            try:
                await cache.get_or_set("user:1", lambda: VALUE)
                await cashews.cache.set("item:1", VALUE)
                assert await cashews.cache.get("item:1") == VALUE
                table = {"user:1": VALUE}

                async def bare(key: str) -> object:
                    return table[key]

                get, local, blocking = cache.get, cache.get_local, cache.sync.get
                cget = cashews.cache.get
                # Each through a lambda, as the plain calls are: the loop and the lambda are
                # what "empty call" times, and what is subtracted from every statement.
                awaited: dict[str, Callable[[], Awaitable[Any]]] = {
                    "bare async def dict lookup": lambda: bare("user:1"),
                    "hybridinval await get (L1 hit)": lambda: get("user:1"),
                    "cashews await get (client-side hit)": lambda: cget("item:1"),
                }
                plain: dict[str, Callable[[], Any]] = {
                    "empty call": lambda: None,
                    "hybridinval get_local (L1 hit)": lambda: local("user:1"),
                    "HybridCache.get (L1 hit)": lambda: blocking("user:1"),
                }
                samples: dict[str, list[float]] = {n: [] for n in (*awaited, *plain)}
                plain_names = list(plain)
                for r in range(rounds):
                    for name, fn in awaited.items():
                        samples[name].append(await _timed(fn, number))
                    # Rotated: whichever runs first after the awaited ones pays for the switch.
                    for name in plain_names[r % 3 :] + plain_names[: r % 3]:
                        samples[name].append(_timed_sync(plain[name], number))
                    await asyncio.sleep(0)  # let the listener tasks run between rounds
            finally:
                await cashews.aclose()
        return samples

    samples = asyncio.run(run())
    # The loop and the lambda cost every statement alike: subtract them round by round. An
    # awaited statement keeps the cost of its coroutine (that is the floor it is judged by).
    empty = samples.pop("empty call")
    net = {
        name: statistics.median(v - e for v, e in zip(values, empty, strict=True))
        for name, values in samples.items()
    }
    ours = net["hybridinval await get (L1 hit)"]
    return {
        "ns": {name: round(max(1.0, v), 1) for name, v in net.items()},
        "ratio_to_bare_coroutine": round(ours / net["bare async def dict lookup"], 2),
        "ratio_to_cashews": round(ours / net["cashews await get (client-side hit)"], 3),
        "get_local_ratio_to_sync_get": round(
            net["hybridinval get_local (L1 hit)"] / net["HybridCache.get (L1 hit)"], 2
        ),
    }


def bench_l2_hit(url: str, rounds: int = 31, number: int = 300) -> dict[str, Any]:
    async def run() -> dict[str, float]:
        namespace = f"bench-{uuid.uuid4().hex[:8]}"
        async with AsyncHybridCache.from_url(url, namespace=namespace, l1_enabled=False) as cache:
            assert await cache.wait_until_subscribed(10)
            await cache.set("user:1", VALUE)
            raw = aredis.Redis.from_url(url, protocol=2)
            raw_key = f"{namespace}:raw"
            await raw.set(raw_key, json.dumps(VALUE))
            raw_get, loads, get = raw.get, json.loads, cache.get

            async def baseline() -> object:
                return loads(await raw_get(raw_key))  # type: ignore[arg-type]

            assert await get("user:1") == VALUE == await baseline()
            stmts: dict[str, Callable[[], Awaitable[Any]]] = {
                "redis.asyncio GET + json.loads": baseline,
                "hybridinval await get (L2 hit)": lambda: get("user:1"),
            }
            samples: dict[str, list[float]] = {n: [] for n in stmts}
            try:
                for _ in range(rounds):
                    for name, fn in stmts.items():
                        samples[name].append(await _timed(fn, number))
            finally:
                await raw.aclose()
        return {name: statistics.median(v) for name, v in samples.items()}

    ns = asyncio.run(run())
    return {
        "us": {name: round(v / 1000, 2) for name, v in ns.items()},
        "ratio_to_raw_get": round(
            ns["hybridinval await get (L2 hit)"] / ns["redis.asyncio GET + json.loads"], 3
        ),
    }


# -- eviction behind a busy loop -----------------------------------------------------------------


def _receiver(url: str, namespace: str, conn: Connection, windows: int, window_s: float) -> None:
    """For each window: fill a key, tell the sender to invalidate it, then either await
    (idle) or spin in pure Python on the loop's thread (busy) until the window ends. The
    subscriber thread stamps the eviction."""

    async def main() -> dict[str, list[int]]:
        cache = AsyncHybridCache.from_url(url, namespace=namespace)
        assert await cache.wait_until_subscribed(10)
        coherence = cache.sync._coherence
        on_message = coherence.on_message
        evicted_at: list[int] = []

        def stamped(payload: bytes) -> None:
            on_message(payload)
            evicted_at.append(time.time_ns())

        coherence.on_message = stamped  # type: ignore[method-assign]
        out: dict[str, list[int]] = {"idle": [], "busy": []}
        try:
            for i in range(windows):
                for mode in ("idle", "busy"):
                    key = f"{mode}:{i}"
                    await cache.get_or_set(key, lambda: 1)
                    evicted_at.clear()
                    conn.send(key)
                    deadline = time.monotonic() + window_s
                    if mode == "idle":
                        await asyncio.sleep(window_s)
                    else:
                        while time.monotonic() < deadline:
                            sum(range(200))  # a CPU-bound handler: never yields to the loop
                    sent_ns = conn.recv()
                    if evicted_at and cache.get_local(key) is None:
                        out[mode].append(evicted_at[0] - sent_ns)
        finally:
            await cache.aclose()
        return out

    conn.send(asyncio.run(main()))


def bench_busy_loop(url: str, windows: int = 100, window_s: float = 0.03) -> dict[str, Any]:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_receiver, args=(url, namespace, theirs, windows, window_s))
    child.start()
    sender = HybridCache.from_url(url, namespace=namespace)
    rng = random.Random(7)
    try:
        assert sender.wait_until_subscribed(10)
        for _ in range(2 * windows):
            if not ours.poll(60):
                raise RuntimeError("busy-loop receiver stopped answering")
            key = ours.recv()
            time.sleep(rng.uniform(0.002, window_s / 3))  # well inside the window
            sent = time.time_ns()
            sender.invalidate(key)
            ours.send(sent)
        if not ours.poll(60):
            raise RuntimeError("busy-loop receiver sent no results")
        lags: dict[str, list[int]] = ours.recv()
    finally:
        sender.close()
        child.join(30)

    def summary(values: list[int]) -> dict[str, Any]:
        ordered = sorted(values)
        n = len(ordered)
        return {
            "n": n,
            "p50_us": round(ordered[n // 2] / 1000, 1) if n else None,
            "p99_us": round(ordered[min(n - 1, n * 99 // 100)] / 1000, 1) if n else None,
        }

    idle, busy = summary(lags["idle"]), summary(lags["busy"])
    return {
        "windows": windows,
        "idle": idle,
        "busy": busy,
        "p50_ratio_busy_to_idle": round(busy["p50_us"] / idle["p50_us"], 2)
        if idle["p50_us"] and busy["p50_us"]
        else None,
    }


def measure(
    url: str, progress: Callable[[str], None] = print, *, quick: bool = False
) -> dict[str, Any]:
    scale = 0.3 if quick else 1.0
    progress("asyncio: L1 hit (await get, get_local) vs a bare coroutine and cashews")
    out: dict[str, Any] = {"l1_hit": bench_l1_hit(url, rounds=max(5, int(25 * scale)))}
    progress("asyncio: L2 hit vs redis.asyncio GET")
    out["l2_hit"] = bench_l2_hit(url, rounds=max(5, int(31 * scale)))
    progress("asyncio: eviction behind an idle and a busy event loop")
    out["busy_loop"] = bench_busy_loop(url, windows=max(20, int(100 * scale)))
    return out


def markdown(results: dict[str, Any]) -> str:
    l1, l2, busy = results["l1_hit"], results["l2_hit"], results["busy_loop"]
    ns = l1["ns"]
    ours = ns["hybridinval await get (L1 hit)"]
    lines = [
        "| hot path | hybridinval | baseline | ratio |",
        "|---|---|---|---|",
        f"| `await get`, L1 hit | {ours} ns | bare `async def` dict lookup "
        f"{ns['bare async def dict lookup']} ns | {l1['ratio_to_bare_coroutine']}x |",
        f"| `await get`, L1 hit | {ours} ns | cashews client-side hit "
        f"{ns['cashews await get (client-side hit)']} ns | {l1['ratio_to_cashews']}x |",
        f"| `get_local`, L1 hit | {ns['hybridinval get_local (L1 hit)']} ns | "
        f"`HybridCache.get` {ns['HybridCache.get (L1 hit)']} ns | "
        f"{l1['get_local_ratio_to_sync_get']}x |",
        f"| `await get`, L2 hit | {l2['us']['hybridinval await get (L2 hit)']} µs | "
        f"redis.asyncio GET + json.loads {l2['us']['redis.asyncio GET + json.loads']} µs | "
        f"{l2['ratio_to_raw_get']}x |",
        f"| eviction, loop busy (p50 / p99) | {busy['busy']['p50_us']} / "
        f"{busy['busy']['p99_us']} µs | loop idle {busy['idle']['p50_us']} / "
        f"{busy['idle']['p99_us']} µs | {busy['p50_ratio_busy_to_idle']}x |",
    ]
    return "\n".join(lines) + "\n"
