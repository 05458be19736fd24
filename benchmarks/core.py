"""Hot-path latencies of hybridinval against baselines measured in the same run.

Every figure is a median over repeated rounds, reported with its ratio to the baseline beside
it, because this machine is shared and noisy: absolute numbers drift from run to run, ratios
measured side by side do not.

* L1 hit: ``cache.get`` on a cached key vs ``dict.get`` and ``cachetools.LRUCache.get``.
* L2 hit: ``get`` with L1 disabled vs a raw redis-py ``GET`` plus the same JSON decoding.
* Propagation: ``invalidate()`` in one process to eviction in another, vs a raw ``PUBLISH`` to
  a raw redis-py subscriber thread; both timed at the receiving thread.
* Batch invalidation: round trips and time for 1,000 keys.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import threading
import time
import timeit
import uuid
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import redis
from redis.connection import AbstractConnection

from hybridinval import HybridCache


def _median_ns(stmt: Callable[[], object], number: int, rounds: int) -> float:
    samples = [timeit.timeit(stmt, number=number) / number * 1e9 for _ in range(rounds)]
    return statistics.median(samples)


def _interleaved(
    stmts: dict[str, Callable[[], object]], number: int, rounds: int
) -> dict[str, float]:
    """Medians of rounds run in turn, so background noise hits every contender alike."""
    samples: dict[str, list[float]] = {name: [] for name in stmts}
    for _ in range(rounds):
        for name, stmt in stmts.items():
            samples[name].append(timeit.timeit(stmt, number=number) / number * 1e9)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_l1_hit(url: str, rounds: int = 25) -> dict[str, Any]:
    import cachetools

    with HybridCache.from_url(url, namespace=f"bench-{uuid.uuid4().hex[:8]}") as cache:
        assert cache.wait_until_subscribed(10)
        value = {"id": 1, "name": "Ada"}
        cache.get_or_set("user:1", lambda: value)
        plain = {"user:1": value}
        lru: cachetools.LRUCache[str, object] = cachetools.LRUCache(maxsize=10_000)
        lru["user:1"] = value
        ttl: cachetools.TTLCache[str, object] = cachetools.TTLCache(maxsize=10_000, ttl=60)
        ttl["user:1"] = value
        get, dget, lget, tget = cache.get, plain.get, lru.get, ttl.get
        stmts: dict[str, Callable[[], object]] = {
            "empty": lambda: None,
            "dict.get": lambda: dget("user:1"),
            "cachetools.LRUCache.get": lambda: lget("user:1"),
            "cachetools.TTLCache.get": lambda: tget("user:1"),
            "hybridinval get (L1 hit)": lambda: get("user:1"),
        }
        samples: dict[str, list[float]] = {name: [] for name in stmts}
        for _ in range(rounds):
            for name, stmt in stmts.items():
                samples[name].append(timeit.timeit(stmt, number=50_000) / 50_000 * 1e9)
    # The lambda wrapper costs the same for all four; subtract it so ratios compare the calls.
    # Subtracted round by round (the empty loop timed in the same round), then the median: an
    # empty loop timed apart, in a noisier moment, could leave a net dict.get of almost nothing.
    empty = samples.pop("empty")
    net = {
        name: max(1.0, statistics.median(v - e for v, e in zip(values, empty, strict=True)))
        for name, values in samples.items()
    }
    ours = net["hybridinval get (L1 hit)"]
    return {
        "ns": {name: round(v, 1) for name, v in net.items()},
        "ratio_to_dict_get": round(ours / net["dict.get"], 2),
        "ratio_to_lru_get": round(ours / net["cachetools.LRUCache.get"], 2),
    }


def bench_l2_hit(url: str, rounds: int = 31) -> dict[str, Any]:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    with HybridCache.from_url(url, namespace=namespace, l1_enabled=False) as cache:
        assert cache.wait_until_subscribed(10)
        value = {"id": 1, "name": "Ada", "email": "ada@example.com", "tags": list(range(10))}
        cache.set("user:1", value)
        raw = redis.Redis.from_url(url, protocol=2)
        raw.set("raw:user:1", json.dumps(value))
        raw_get, loads = raw.get, json.loads

        def baseline() -> object:
            return loads(raw_get("raw:user:1"))  # type: ignore[arg-type]

        assert cache.get("user:1") == value == baseline()
        ns = _interleaved(
            {
                "redis-py GET + json.loads": baseline,
                "hybridinval get (L2 hit)": lambda: cache.get("user:1"),
            },
            number=500,
            rounds=rounds,
        )
        raw.close()
    return {
        "us": {name: round(v / 1000, 2) for name, v in ns.items()},
        "ratio_to_raw_get": round(
            ns["hybridinval get (L2 hit)"] / ns["redis-py GET + json.loads"], 3
        ),
    }


# -- propagation: two processes ------------------------------------------------------------------


def _receiver_ours(url: str, namespace: str, conn: Connection) -> None:
    received: dict[str, int] = {}

    cache = HybridCache.from_url(url, namespace=namespace)
    listener = cache._coherence  # what the transport delivers to (looked up per message)
    evict = listener.on_message

    def timed(payload: bytes) -> None:
        evict(payload)
        now = time.time_ns()
        for key in json.loads(payload)["k"]:
            received[key] = now

    listener.on_message = timed  # type: ignore[method-assign]
    assert cache.wait_until_subscribed(10)
    conn.send("ready")
    conn.recv()  # "done"
    conn.send(received)
    cache.close()


def _receiver_raw(url: str, channel: str, conn: Connection) -> None:
    received: dict[str, int] = {}
    client = redis.Redis.from_url(url, protocol=2)
    pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call,unused-ignore]
    pubsub.subscribe(channel)
    while pubsub.get_message(timeout=1.0) is None and not pubsub.subscribed:
        pass
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.2)
            if message is not None:
                received[message["data"].decode()] = time.time_ns()

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    conn.send("ready")
    conn.recv()
    stop.set()
    thread.join(2)
    conn.send(received)
    pubsub.close()
    client.close()


def _percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] / 1000  # µs


def bench_propagation(url: str, messages: int = 400) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    results: dict[str, dict[str, float]] = {}

    def run(
        target: Callable[..., None], args: tuple[Any, ...], send: Callable[[str], object]
    ) -> list[int]:
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=target, args=(*args, theirs))
        proc.start()
        assert ours.poll(30) and ours.recv() == "ready"
        sent: dict[str, int] = {}
        for i in range(messages):
            key = f"k{i}"
            sent[key] = time.time_ns()
            send(key)
            time.sleep(0.002)  # one message in flight at a time: latency, not throughput
        time.sleep(0.2)
        ours.send("done")
        received: dict[str, int] = ours.recv()
        proc.join(10)
        return [received[k] - t for k, t in sent.items() if k in received]

    raw = redis.Redis.from_url(url, protocol=2)
    channel = f"bench-raw-{namespace}"
    raw_lags = run(_receiver_raw, (url, channel), lambda key: raw.publish(channel, key))
    with HybridCache.from_url(url, namespace=namespace) as sender:
        assert sender.wait_until_subscribed(10)
        our_lags = run(_receiver_ours, (url, namespace), lambda key: sender.invalidate(key))
    raw.close()
    for name, lags in (
        ("raw PUBLISH -> redis-py subscriber", raw_lags),
        ("hybridinval invalidate -> eviction", our_lags),
    ):
        results[name] = {
            "received": len(lags),
            "p50_us": round(_percentile(lags, 0.50), 1),
            "p99_us": round(_percentile(lags, 0.99), 1),
        }
    ours_r, raw_r = (
        results["hybridinval invalidate -> eviction"],
        results["raw PUBLISH -> redis-py subscriber"],
    )
    return {
        "latency": results,
        "messages": messages,
        "p50_ratio_to_raw": round(ours_r["p50_us"] / raw_r["p50_us"], 2),
        "p99_ratio_to_raw": round(ours_r["p99_us"] / raw_r["p99_us"], 2),
    }


def bench_batch_invalidation(url: str, keys: int = 1000, rounds: int = 15) -> dict[str, Any]:
    with HybridCache.from_url(url, namespace=f"bench-{uuid.uuid4().hex[:8]}") as cache:
        batch = [f"user:{i}" for i in range(keys)]
        # Subscribed, script loaded, pooled connection open: the handshakes are not the
        # invalidation's, nor a connection opened because the subscribe-time L2 check (on its
        # own thread) held the pooled one at that moment.
        assert cache.wait_until_subscribed(10)
        cache.invalidate_many(batch)
        # Count what goes over the wire: every packed command written to a socket.
        commands: list[str] = []
        original = AbstractConnection.send_packed_command

        caller = threading.get_ident()

        def spy(conn: AbstractConnection, command: Any, check_health: bool = True) -> None:
            if threading.get_ident() == caller:  # not the subscriber's PINGs, say
                packed = b"".join(command) if isinstance(command, list) else bytes(command)
                commands.append(packed.split(b"\r\n")[2].decode())  # the command's name
            original(conn, command, check_health)  # type: ignore[no-untyped-call]

        AbstractConnection.send_packed_command = spy  # type: ignore[method-assign]
        try:
            cache.invalidate_many(batch)
        finally:
            AbstractConnection.send_packed_command = original  # type: ignore[method-assign]
        raw = redis.Redis.from_url(url, protocol=2)
        one = _median_ns(lambda: raw.publish("bench-nobody", "x"), 200, rounds) / 1000
        ours = _median_ns(lambda: cache.invalidate_many(batch), 5, rounds) / 1000
        raw.close()
    return {
        "keys": keys,
        "round_trips": len(commands),
        "commands": commands,
        "ms": round(ours / 1000, 2),
        "raw_publish_us": round(one, 1),
        "ratio_to_one_publish": round(ours / one, 1),
    }


def run_all(
    url: str, progress: Callable[[str], None] = print, *, quick: bool = False
) -> dict[str, Any]:
    """Every hot-path benchmark; ``quick`` cuts rounds and messages for a smoke run."""
    scale = 0.3 if quick else 1.0
    out: dict[str, Any] = {}
    progress("L1 hit ...")
    out["l1_hit"] = bench_l1_hit(url, rounds=max(5, int(25 * scale)))
    progress("L2 hit ...")
    out["l2_hit"] = bench_l2_hit(url, rounds=max(5, int(31 * scale)))
    progress("propagation (two processes) ...")
    out["propagation"] = bench_propagation(url, messages=int(400 * scale))
    progress("1,000-key invalidation ...")
    out["batch_invalidation"] = bench_batch_invalidation(url, rounds=max(5, int(15 * scale)))
    return out


def markdown(results: dict[str, Any]) -> str:
    l1, l2 = results["l1_hit"], results["l2_hit"]
    prop, batch = results["propagation"], results["batch_invalidation"]
    lines = [
        "| hot path | hybridinval | baseline | ratio |",
        "|---|---|---|---|",
        f"| L1 hit | {l1['ns']['hybridinval get (L1 hit)']} ns | dict.get {l1['ns']['dict.get']} ns"
        f" | {l1['ratio_to_dict_get']}x |",
        f"| L1 hit | {l1['ns']['hybridinval get (L1 hit)']} ns | cachetools.LRUCache.get "
        f"{l1['ns']['cachetools.LRUCache.get']} ns | {l1['ratio_to_lru_get']}x |",
        f"| L2 hit | {l2['us']['hybridinval get (L2 hit)']} µs | redis-py GET + json.loads "
        f"{l2['us']['redis-py GET + json.loads']} µs | {l2['ratio_to_raw_get']}x |",
    ]
    ours = prop["latency"]["hybridinval invalidate -> eviction"]
    raw = prop["latency"]["raw PUBLISH -> redis-py subscriber"]
    lines += [
        f"| propagation p50 | {ours['p50_us']} µs | raw PUBLISH -> subscriber {raw['p50_us']} µs"
        f" | {prop['p50_ratio_to_raw']}x |",
        f"| propagation p99 | {ours['p99_us']} µs | raw PUBLISH -> subscriber {raw['p99_us']} µs"
        f" | {prop['p99_ratio_to_raw']}x |",
        f"| invalidate 1,000 keys | {batch['ms']} ms, {batch['round_trips']} round trip(s) | "
        f"one PUBLISH {batch['raw_publish_us']} µs | {batch['ratio_to_one_publish']}x |",
    ]
    return "\n".join(lines) + "\n"
