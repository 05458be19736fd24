"""Hot-path figures of every contender, side by side, with the baselines measured in the same
rounds: L1 hit, L2 hit, cross-process propagation, and bytes per L1 entry.

Method (the same as :mod:`benchmarks.core`, so the two tables agree):

* L1/L2 hits are timed in interleaved rounds (every contender and baseline once per round) and
  the median round is reported, so background noise on this shared machine hits all alike. The
  cost of the calling lambda is subtracted. The async contender (cashews) is timed as ``await``
  in a loop minus the same loop awaiting an empty coroutine.
* Propagation: the sender does what the workload's writer does after a commit; the receiver
  process timestamps the moment its L1 entry is evicted, through the library's own eviction
  call, wrapped. One message in flight at a time. p50/p99 over all messages.
* Memory: ``tracemalloc`` over N stores, with keys and values allocated before tracing starts,
  so only what the store adds per entry is counted (a copy of the value counts: it is extra).
"""

from __future__ import annotations

import asyncio
import gc
import json
import multiprocessing
import statistics
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from typing import Any

import redis

from . import contenders as cmod
from .core import _interleaved, _median_ns, _percentile

__all__ = [
    "bench_l1_hits",
    "bench_l2_hits",
    "bench_memory",
    "bench_propagation_all",
    "cleanup",
]

VALUE = {"id": 1, "version": 1, "payload": "x" * 100}

# (url, prefix) of every key space these benchmarks wrote to, for cleanup().
_USED: list[tuple[str, str]] = []


def _env(
    redis_url: str, name: str, role: str = "micro", prefix: str | None = None, **query: str
) -> cmod.Env:
    prefix = prefix or f"hibench-{uuid.uuid4().hex[:8]}-{name.replace('_', '')}"
    url = cmod.redis_url_for(redis_url, cmod.REDIS_DBS[name], f"{prefix}-{role}", **query)
    _USED.append((url, prefix))
    return cmod.Env(url, prefix, 60.0)


def cleanup() -> int:
    """Delete the keys these benchmarks wrote (their run-unique prefixes only)."""
    from .workload import cleanup_keys

    deleted = 0
    for url, prefix in dict.fromkeys(_USED):
        deleted += cleanup_keys(url, [f"{prefix}:*", f"hi:{prefix}:*"])
    _USED.clear()
    return deleted


# -- L1 hit -----------------------------------------------------------------------------------


def bench_l1_hits(redis_url: str, rounds: int = 25, number: int = 20_000) -> dict[str, Any]:
    """ns per L1 hit of every contender that has an L1, with dict/cachetools baselines."""
    import cachetools

    hyb = cmod.Hybridinval(_env(redis_url, "hybridinval"), use_sqlalchemy=False)
    hand = cmod.HandRolled(_env(redis_url, "hand_rolled"))
    dog = cmod.DogpileMemoryRedis(_env(redis_url, "dogpile_memory_redis"))
    try:
        assert hyb.ready(10) and hand.ready(10)
        key = "item:1"
        hyb.cache.get_or_set(key, lambda: VALUE)
        hand.get_or_set(key, lambda: VALUE)
        dog.get_or_set(key, lambda: VALUE)
        plain = {key: VALUE}
        lru: cachetools.LRUCache[str, object] = cachetools.LRUCache(maxsize=10_000)
        lru[key] = VALUE
        dget, lget = plain.get, lru.get
        hget, hgos, hand_gos, dog_gos = (
            hyb.cache.get,
            hyb.cache.get_or_set,
            hand.get_or_set,
            dog.get_or_set,
        )
        dog_get = dog.l1.get

        def never() -> dict[str, Any]:
            raise AssertionError("a hit must not load")

        ns = _interleaved(
            {
                "dict.get": lambda: dget(key),
                "cachetools.LRUCache.get": lambda: lget(key),
                "hybridinval get": lambda: hget(key),
                "hybridinval get_or_set": lambda: hgos(key, never),
                "hand-rolled get_or_set": lambda: hand_gos(key, never),
                "dogpile memory region.get": lambda: dog_get(key),
                "dogpile memory->redis get_or_create": lambda: dog_gos(key, never),
            },
            number=number,
            rounds=rounds,
        )
        empty = _median_ns(lambda: None, number, rounds)
        sessions = _session_cache_hit_ns(hyb, number, rounds)
    finally:
        hyb.close()
        hand.close()
    net = {name: round(max(1.0, v - empty), 1) for name, v in ns.items()}
    if sessions is not None:
        net["hybridinval cached(session).get_or_set"] = round(max(1.0, sessions - empty), 1)
    net.update(_cashews_l1_hit_ns(redis_url, number, rounds))
    base_dict, base_lru = net["dict.get"], net["cachetools.LRUCache.get"]
    return {
        "ns": net,
        "ratio_to_dict_get": {k: round(v / base_dict, 2) for k, v in net.items()},
        "ratio_to_lru_get": {k: round(v / base_lru, 2) for k, v in net.items()},
    }


def _session_cache_hit_ns(hyb: cmod.Hybridinval, number: int, rounds: int) -> float | None:
    """An L1 hit through ``cached(session, cache)`` (hybridinval.sqlalchemy), or None.

    The session is an installed one on SQLite in memory, inside a transaction that has run a
    statement, as a request's session is after its first query.
    """
    if not cmod.sqlalchemy_integration_available():
        return None
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session, sessionmaker

    from hybridinval.sqlalchemy import cached, install

    from .workload import make_model

    class MicroSession(Session):
        pass

    engine = create_engine("sqlite://")
    factory = sessionmaker(engine, class_=MicroSession)
    make_model(f"hibench_micro_{uuid.uuid4().hex[:6]}")
    installation = install(factory, hyb.cache)
    try:
        with factory() as session:
            session.execute(text("select 1"))
            get_or_set = cached(session, hyb.cache).get_or_set
            assert get_or_set("item:1", lambda: VALUE) == VALUE
            return _median_ns(lambda: get_or_set("item:1", lambda: VALUE), number // 4, rounds)
    finally:
        installation.uninstall()
        engine.dispose()


def _cashews_l1_hit_ns(redis_url: str, number: int, rounds: int) -> dict[str, float]:
    env = _env(redis_url, "cashews")

    async def setup_and_time() -> tuple[float, float]:
        c = cmod.Cashews(env)
        await c.ainit()
        assert await c.aready(10)
        await c.cache.set("item:1", VALUE)
        assert await c.cache.get("item:1") == VALUE
        get = c.cache.get
        try:
            return await _atime(lambda: get("item:1"), number, rounds)
        finally:
            await c.aclose()

    ours, base = asyncio.run(setup_and_time())
    return {"cashews get (client-side hit)": round(max(1.0, ours - base), 1)}


async def _atime(
    make: Callable[[], Awaitable[Any]], number: int, rounds: int
) -> tuple[float, float]:
    async def empty() -> None:
        return None

    async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
        started = time.perf_counter()
        for _ in range(number):
            await fn()
        return (time.perf_counter() - started) / number * 1e9

    ours, base = [], []
    for _ in range(rounds):
        ours.append(await timed(make))
        base.append(await timed(empty))
    return statistics.median(ours), statistics.median(base)


# -- L2 hit -----------------------------------------------------------------------------------


def bench_l2_hits(redis_url: str, rounds: int = 31, number: int = 300) -> dict[str, Any]:
    """µs per read served by Redis, against a raw redis-py GET + json.loads of the same value."""
    from hybridinval import HybridCache

    env = _env(redis_url, "hybridinval")
    nol1 = HybridCache.from_url(env.redis_url, namespace=env.prefix, l1_enabled=False)
    ronly = cmod.RedisOnly(_env(redis_url, "redis_only"))
    dog = cmod.DogpileRedis(_env(redis_url, "dogpile_redis"))
    raw = redis.Redis.from_url(ronly.env.redis_url, protocol=2)
    raw_key = ronly.env.prefix + ":raw"
    try:
        assert nol1.wait_until_subscribed(10)
        nol1.set("item:1", VALUE)
        raw.set(raw_key, json.dumps(VALUE))
        ronly.get_or_set("item:1", lambda: VALUE)
        dog.region.set("item:1", VALUE)
        raw_get, loads = raw.get, json.loads

        def baseline() -> object:
            return loads(raw_get(raw_key))  # type: ignore[arg-type,unused-ignore]

        def never() -> dict[str, Any]:
            raise AssertionError("an L2 hit must not load")

        ns = _interleaved(
            {
                "redis-py GET + json.loads": baseline,
                "hybridinval get (L1 disabled)": lambda: nol1.get("item:1"),
                "redis only get_or_set": lambda: ronly.get_or_set("item:1", never),
                "dogpile redis region.get": lambda: dog.region.get("item:1"),
            },
            number=number,
            rounds=rounds,
        )
        base_async, cashews_ns = _cashews_l2_hit_ns(redis_url, number, rounds)
    finally:
        nol1.invalidate("item:1")
        nol1.close()
        ronly.close()
        raw.delete(raw_key)
        raw.close()
    us = {name: round(v / 1000, 2) for name, v in ns.items()}
    us["cashews get (redis backend)"] = round(cashews_ns / 1000, 2)
    us["redis.asyncio GET + pickle.loads"] = round(base_async / 1000, 2)
    base = us["redis-py GET + json.loads"]
    ratios = {k: round(v / base, 3) for k, v in us.items()}
    # cashews runs on redis.asyncio: its fair baseline is the async GET.
    ratios["cashews get (redis backend)"] = round(cashews_ns / base_async, 3)
    return {"us": us, "ratio_to_raw_get": ratios}


def _cashews_l2_hit_ns(redis_url: str, number: int, rounds: int) -> tuple[float, float]:
    """cashews' plain Redis backend (every get is a Redis GET) and an async raw GET baseline."""
    import pickle

    import redis.asyncio as aredis
    from cashews import Cache

    env = _env(redis_url, "cashews")

    async def run() -> tuple[float, float]:
        cache = Cache()
        cache.setup(env.redis_url)
        await cache.init()
        client = aredis.Redis.from_url(env.redis_url)
        key, raw_key = env.prefix + ":item:1", env.prefix + ":raw"
        try:
            await cache.set(key, VALUE)
            await client.set(raw_key, pickle.dumps(VALUE))
            ours, base = [], []
            for _ in range(rounds):
                started = time.perf_counter()
                for _ in range(number):
                    await cache.get(key)
                ours.append((time.perf_counter() - started) / number * 1e9)
                started = time.perf_counter()
                for _ in range(number):
                    pickle.loads(await client.get(raw_key))  # type: ignore[arg-type]
                base.append((time.perf_counter() - started) / number * 1e9)
        finally:
            await cache.close()
            await client.aclose()
        return statistics.median(base), statistics.median(ours)

    return asyncio.run(run())


# -- propagation ------------------------------------------------------------------------------


def _receiver(name: str, env: cmod.Env, conn: Connection) -> None:
    """Child process: hold a contender, timestamp every eviction, report when told."""
    evicted: list[tuple[str, int]] = []

    def stamp(key: str) -> None:
        evicted.append((key, time.time_ns()))

    if name == "raw":
        client = redis.Redis.from_url(env.redis_url, protocol=2)
        pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call,unused-ignore]
        pubsub.subscribe(**{env.prefix + ":raw": lambda m: stamp(m["data"].decode())})
        # stop() closes the connection under the reading thread: that error is expected.
        thread = pubsub.run_in_thread(
            sleep_time=1.0, daemon=True, exception_handler=lambda exc, ps, th: th.stop()
        )
        assert pubsub.subscribed_event.wait(10)
        conn.send("ready")
        conn.recv()
        thread.stop()
        conn.send(evicted)
        return
    if name == "cashews":
        asyncio.run(_cashews_receiver(env, conn, evicted, stamp))
        return
    contender: Any
    if name == "hand_rolled":
        contender = cmod.HandRolled(env, on_evict=stamp)
    else:
        contender = cmod.Hybridinval(env, use_sqlalchemy=False)
        listener = contender.cache._coherence  # the transport looks on_message up per message
        evict = listener.on_message

        def timed(payload: bytes) -> None:
            evict(payload)
            now = time.time_ns()
            evicted.extend((k, now) for k in json.loads(payload)["k"])

        listener.on_message = timed
    assert contender.ready(10)
    conn.send("ready")
    conn.recv()
    conn.send(evicted)
    contender.close()


async def _cashews_receiver(
    env: cmod.Env, conn: Connection, evicted: list[tuple[str, int]], stamp: Callable[[str], None]
) -> None:
    c = cmod.Cashews(env)
    await c.ainit()
    assert await c.aready(10)
    local = c.backend._local_cache
    delete = local.delete

    async def timed_delete(key: str) -> Any:
        result = await delete(key)
        stamp(key)
        return result

    local.delete = timed_delete  # the listener's own eviction call, wrapped to timestamp it
    loop = asyncio.get_running_loop()
    conn.send("ready")
    await loop.run_in_executor(None, conn.recv)
    conn.send(evicted)
    await c.aclose()


def _propagation_one(
    name: str, redis_url: str, messages: int, cashews_query: dict[str, str]
) -> list[int]:
    ctx = multiprocessing.get_context("spawn")
    db_name = {"raw": "redis_only", "hybridinval": "hybridinval"}.get(name, name)
    prefix = f"hibench-{uuid.uuid4().hex[:8]}-prop{name.replace('_', '')}"
    query = cashews_query if name == "cashews" else {}
    recv_env = _env(redis_url, db_name, "recv", prefix, **query)
    send_env = _env(redis_url, db_name, "send", prefix, **query)
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(name, recv_env, theirs), daemon=True)
    proc.start()
    keys = [f"k{i}" for i in range(messages)]
    sent: dict[str, int] = {}
    try:
        assert ours.poll(60) and ours.recv() == "ready", f"{name}: receiver did not start"
        if name == "cashews":
            asyncio.run(_cashews_send(send_env, keys, sent))
        else:
            send = _sender(name, send_env)
            try:
                for key in keys:
                    sent[key] = time.time_ns()
                    send.publish(key)
                    time.sleep(0.002)  # one in flight at a time: latency, not throughput
            finally:
                send.close()
        time.sleep(0.2)
        ours.send("done")
        assert ours.poll(30)
        evicted: list[tuple[str, int]] = ours.recv()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
    first: dict[str, int] = {}
    for key, at in evicted:
        if key in sent and at >= sent[key] and key not in first:
            first[key] = at
    return [first[k] - t for k, t in sent.items() if k in first]


class _Sender:
    def __init__(self, publish: Callable[[str], object], close: Callable[[], object]) -> None:
        self.publish, self.close = publish, close


def _sender(name: str, env: cmod.Env) -> _Sender:
    if name == "raw":
        client = redis.Redis.from_url(env.redis_url, protocol=2)
        channel = env.prefix + ":raw"
        return _Sender(lambda key: client.publish(channel, key), client.close)
    if name == "hand_rolled":
        hand = cmod.HandRolled(env)
        assert hand.ready(10)
        return _Sender(lambda key: hand.after_commit([key]), hand.close)
    hyb = cmod.Hybridinval(env, use_sqlalchemy=False)
    assert hyb.ready(10)
    return _Sender(lambda key: hyb.after_commit([key]), hyb.close)


async def _cashews_send(env: cmod.Env, keys: list[str], sent: dict[str, int]) -> None:
    c = cmod.Cashews(env)
    await c.ainit()
    try:
        for key in keys:  # a delete only notifies if the key exists
            await c.cache.set(key, VALUE)
        await asyncio.sleep(0.5)  # let those SETs' own invalidations drain first
        for key in keys:
            sent[key] = time.time_ns()
            await c.aafter_commit([key])
            await asyncio.sleep(0.002)
    finally:
        await c.aclose()


def bench_propagation_all(
    redis_url: str, messages: int = 300, cashews_query: dict[str, str] | None = None
) -> dict[str, Any]:
    """p50/p99 µs from "the writer's post-commit call began" to "evicted in another process"."""
    out: dict[str, Any] = {"messages": messages, "latency": {}, "samples_us": {}}
    labels = {
        "raw": "raw PUBLISH -> redis-py subscriber",
        "hybridinval": "hybridinval invalidate_committed -> eviction",
        "hand_rolled": "hand-rolled DEL + PUBLISH -> eviction",
        "cashews": "cashews delete -> tracking -> eviction",
    }
    for name, label in labels.items():
        lags = _propagation_one(name, redis_url, messages, cashews_query or {})
        out["latency"][name] = {
            "label": label,
            "received": len(lags),
            "p50_us": round(_percentile(lags, 0.50), 1) if lags else None,
            "p99_us": round(_percentile(lags, 0.99), 1) if lags else None,
        }
        out["samples_us"][name] = [round(x / 1000, 1) for x in lags]
    raw = out["latency"]["raw"]
    for stats in out["latency"].values():
        for q in ("p50", "p99"):
            ours = stats[f"{q}_us"]
            stats[f"{q}_ratio_to_raw"] = round(ours / raw[f"{q}_us"], 2) if ours else None
    return out


# -- memory -----------------------------------------------------------------------------------


def bench_memory(entries: int = 10_000) -> dict[str, Any]:
    """Bytes each L1 keeps per entry beyond the value object itself."""
    import cachetools

    from hybridinval import MemoryL1

    keys = [f"item:{i}" for i in range(entries)]
    values = [{"id": i, "version": 1, "payload": "x" * 100} for i in range(entries)]

    def measure(fill: Callable[[], object]) -> float:
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            keep = fill()
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        del keep
        return round((after - before) / entries, 1)

    def fill_dict() -> object:
        d = {}
        for k, v in zip(keys, values, strict=True):
            d[k] = v
        return d

    def fill_lru() -> object:
        c: cachetools.LRUCache[str, object] = cachetools.LRUCache(maxsize=entries)
        for k, v in zip(keys, values, strict=True):
            c[k] = v
        return c

    def fill_ttl() -> object:  # the hand-rolled contender's L1
        c: cachetools.TTLCache[str, object] = cachetools.TTLCache(maxsize=entries, ttl=60)
        for k, v in zip(keys, values, strict=True):
            c[k] = v
        return c

    def fill_hybridinval() -> object:
        l1 = MemoryL1(entries)
        deadline = time.monotonic() + 60
        for k, v in zip(keys, values, strict=True):
            l1.store(k, v, deadline)
        return l1

    def fill_dogpile() -> object:
        from dogpile.cache import make_region

        region = make_region().configure("dogpile.cache.memory", expiration_time=60)
        for k, v in zip(keys, values, strict=True):
            region.set(k, v)
        return region

    def fill_cashews() -> object:
        from cashews.backends.memory import Memory

        mem = Memory(size=entries, check_interval=0)

        async def fill() -> None:
            for k, v in zip(keys, values, strict=True):
                await mem.set(k, v)

        asyncio.run(fill())
        return mem

    measured = {
        "dict": measure(fill_dict),
        "cachetools.LRUCache": measure(fill_lru),
        "cachetools.TTLCache (hand-rolled L1)": measure(fill_ttl),
        "hybridinval MemoryL1": measure(fill_hybridinval),
        "dogpile memory backend": measure(fill_dogpile),
        "cashews Memory (client-side local cache)": measure(fill_cashews),
    }
    base = measured["dict"]
    return {
        "entries": entries,
        "bytes_per_entry": measured,
        "ratio_to_dict": {k: round(v / base, 2) for k, v in measured.items()},
    }
