"""``make fanout``: the cost of one invalidation as the number of subscribed processes grows.

For each backplane and each number of subscriber processes (8, 32 and 128 by default), in one
run, against the raw client of the same broker:

* **propagation to the slowest process**: the writer stamps each message before it sends it;
  every subscriber process stamps it when its eviction is done (for raw clients: when the
  message is read); per message, the latest of those; p50 and p99 over the messages;
* **broker CPU per message** (Redis only: ``INFO cpu``, user + system, over the message phase;
  divided by the messages, and by the messages times the subscribers);
* **keys per second** that one writer process, and four, can invalidate (one key per call).

Rows: ``raw PUBLISH`` (redis-py subscriber processes) and ``hybridinval`` (Redis Pub/Sub);
with ``--amqp``, ``raw kombu publish`` and ``hybridinval (RabbitMQ)``. Every subscriber is a
forked process of this one, idle but for the backplane; all run on this machine. Results in
``benchmarks/results/fanout.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis

__all__ = ["MODES", "main", "markdown", "measure"]

RESULTS = Path(__file__).parent / "results"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
MODES = ("raw PUBLISH", "hybridinval", "raw kombu publish", "hybridinval (RabbitMQ)")


def _kombu() -> Any:
    """kombu, untyped (imported only by the RabbitMQ rows)."""
    import importlib

    return importlib.import_module("kombu")


# -- subscribers (forked) -----------------------------------------------------------------------


def _subscriber(mode: str, spec: dict[str, Any], ready: Any, done: Any, out: Connection) -> None:
    """Stamp every message's arrival (after its eviction, for hybridinval) until ``done``."""
    stamps: dict[int, int] = {}
    now = time.time_ns
    if mode == "raw PUBLISH":
        client = redis.Redis.from_url(spec["redis_url"], protocol=2)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(spec["channel"])
        pubsub.get_message(timeout=5)  # the confirmation (not returned: ignored)
        ready.release()
        while not done.is_set():
            message = pubsub.get_message(timeout=0.1)
            if message is not None:
                stamps[int(message["data"])] = now()
        pubsub.close()
    elif mode == "raw kombu publish":
        kombu = _kombu()
        with kombu.Connection(spec["amqp_url"]) as conn:
            exchange = kombu.Exchange(spec["channel"], "fanout", durable=False, auto_delete=True)
            queue = kombu.Queue(
                f"{spec['channel']}.{os.getpid()}", exchange, exclusive=True, auto_delete=True
            )

            def on_message(body: Any, message: Any) -> None:
                stamps[int(body)] = now()
                message.ack()

            with kombu.Consumer(conn, [queue], callbacks=[on_message], accept=["json"]):
                ready.release()
                while not done.is_set():
                    with contextlib.suppress(TimeoutError):
                        conn.drain_events(timeout=0.1)
    else:
        from hybridinval import HybridCache

        options = {"backplane": spec["amqp_url"]} if mode == "hybridinval (RabbitMQ)" else {}
        cache = HybridCache.from_url(spec["redis_url"], namespace=spec["namespace"], **options)
        assert cache.wait_until_subscribed(30)
        coherence = cache._coherence
        apply = coherence.on_message
        decode = json.loads

        def stamped(payload: bytes) -> None:
            apply(payload)  # evicts
            keys = decode(payload).get("k") or ()
            for key in keys:
                stamps[int(key[1:])] = now()

        coherence.on_message = stamped  # type: ignore[method-assign]
        ready.release()
        done.wait()
        cache.close()
    out.send(stamps)


# -- the writer side ----------------------------------------------------------------------------


class _Sender:
    def __init__(self, mode: str, spec: dict[str, Any]) -> None:
        self.mode = mode
        if mode == "raw PUBLISH":
            self.client = redis.Redis.from_url(spec["redis_url"], protocol=2)
            channel = spec["channel"]
            self.send: Callable[[int], object] = lambda i: self.client.publish(channel, str(i))
        elif mode == "raw kombu publish":
            kombu = _kombu()
            self.conn = kombu.Connection(spec["amqp_url"])
            exchange = kombu.Exchange(spec["channel"], "fanout", durable=False, auto_delete=True)
            producer = kombu.Producer(self.conn.channel(), exchange=exchange, serializer="json")
            producer.declare()
            self.send = lambda i: producer.publish(i, retry=False)
        else:
            from hybridinval import HybridCache

            options = {"backplane": spec["amqp_url"]} if mode == "hybridinval (RabbitMQ)" else {}
            self.cache = HybridCache.from_url(
                spec["redis_url"], namespace=spec["namespace"], **options
            )
            assert self.cache.wait_until_subscribed(30)
            self.send = lambda i: self.cache.invalidate(f"k{i}")

    def close(self) -> None:
        if self.mode == "raw PUBLISH":
            self.client.close()
        elif self.mode == "raw kombu publish":
            self.conn.release()
        else:
            self.cache.close()


def _writer(mode: str, spec: dict[str, Any], seconds: float, go: Any, out: Connection) -> None:
    sender = _Sender(mode, spec)
    go.wait()
    sent, deadline, i = 0, time.monotonic() + seconds, 10**9 + os.getpid() * 10**6
    while time.monotonic() < deadline:
        sender.send(i)
        sent, i = sent + 1, i + 1
    sender.close()
    out.send(sent)


def _redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def measure(
    mode: str,
    subscribers: int,
    *,
    redis_url: str,
    amqp_url: str,
    messages: int,
    interval: float,
    throughput_seconds: float,
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    tag = uuid.uuid4().hex[:8]
    spec = {
        "redis_url": redis_url,
        "amqp_url": amqp_url,
        "namespace": f"fanout-{tag}",
        "channel": f"fanout-{tag}",
    }
    if mode.startswith("hybridinval"):
        from hybridinval.keyspace import Keyspace

        spec["channel"] = Keyspace(spec["namespace"]).channel
    ready, done = ctx.Semaphore(0), ctx.Event()
    pipes, procs = [], []
    for _ in range(subscribers):
        ours, theirs = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_subscriber, args=(mode, spec, ready, done, theirs), daemon=True)
        proc.start()
        pipes.append(ours)
        procs.append(proc)
    probe = redis.Redis.from_url(redis_url, protocol=2)
    sender = _Sender(mode, spec)
    try:
        for _ in range(subscribers):
            if not ready.acquire(timeout=120):
                raise RuntimeError(f"{mode}: a subscriber did not start")
        time.sleep(0.5)  # let every subscription settle
        sent_at: dict[int, int] = {}
        cpu_before = _redis_cpu(probe)
        for i in range(messages):
            sent_at[i] = time.time_ns()
            sender.send(i)
            time.sleep(interval)
        time.sleep(0.5)
        cpu = _redis_cpu(probe) - cpu_before
        done.set()
        stamps = [pipe.recv() for pipe in pipes]
    finally:
        done.set()
        # Closed before the writers fork below: no thread of ours may hold a lock at a fork.
        sender.close()
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.terminate()  # ours, by handle
    slowest = []
    lost = 0
    for i, sent in sent_at.items():
        arrivals = [s[i] for s in stamps if i in s]
        lost += subscribers - len(arrivals)
        if arrivals:
            slowest.append((max(arrivals) - sent) / 1000)
    slowest.sort()
    n = len(slowest)
    rates = {}
    for writers in (1, 4):
        go = ctx.Event()
        outs, wprocs = [], []
        for _ in range(writers):
            ours, theirs = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_writer, args=(mode, spec, throughput_seconds, go, theirs))
            proc.start()
            outs.append(ours)
            wprocs.append(proc)
        time.sleep(0.5)
        go.set()
        total = sum(pipe.recv() for pipe in outs)
        for proc in wprocs:
            proc.join(30)
        rates[writers] = round(total / throughput_seconds)
    probe.close()
    return {
        "mode": mode,
        "subscribers": subscribers,
        "messages": messages,
        "lost": lost,
        "slowest_p50_us": round(slowest[n // 2], 1) if n else None,
        "slowest_p99_us": round(slowest[min(n - 1, n * 99 // 100)], 1) if n else None,
        "redis_cpu_us_per_message": round(cpu / messages * 1e6, 1),
        "redis_cpu_us_per_message_per_subscriber": round(cpu / messages / subscribers * 1e6, 2),
        "keys_per_s_1_writer": rates[1],
        "keys_per_s_4_writers": rates[4],
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| backplane | subscribers | slowest p50 / p99 µs | x raw | Redis CPU µs per message "
        "(per subscriber) | keys/s, 1 writer | keys/s, 4 writers |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = results["rows"]
    raw_of = {
        (r["subscribers"], "redis" if "kombu" not in r["mode"] else "amqp"): r
        for r in rows
        if r["mode"].startswith("raw")
    }
    for r in rows:
        family = "amqp" if ("kombu" in r["mode"] or "RabbitMQ" in r["mode"]) else "redis"
        raw = raw_of.get((r["subscribers"], family))
        ratio = (
            f"{r['slowest_p50_us'] / raw['slowest_p50_us']:.2f}x / "
            f"{r['slowest_p99_us'] / raw['slowest_p99_us']:.2f}x"
            if raw and raw is not r and r["slowest_p50_us"] and raw["slowest_p50_us"]
            else "-"
        )
        lines.append(
            f"| {r['mode']} | {r['subscribers']} | {r['slowest_p50_us']} / {r['slowest_p99_us']}"
            f" | {ratio} | {r['redis_cpu_us_per_message']} "
            f"({r['redis_cpu_us_per_message_per_subscriber']}) | "
            f"{r['keys_per_s_1_writer']:,} | {r['keys_per_s_4_writers']:,} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    modes = list(dict.fromkeys(r["mode"] for r in results["rows"]))
    for index, mode in enumerate(modes):
        rows = [r for r in results["rows"] if r["mode"] == mode and r["slowest_p50_us"]]
        xs = [r["subscribers"] for r in rows]
        color = f"C{index}"  # one color per backplane: p50 solid, p99 dashed
        ax.plot(
            xs,
            [r["slowest_p50_us"] / 1000 for r in rows],
            marker="o",
            color=color,
            label=f"{mode} p50",
        )
        ax.plot(
            xs,
            [r["slowest_p99_us"] / 1000 for r in rows],
            marker="x",
            linestyle="--",
            color=color,
            label=f"{mode} p99",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("subscriber processes")
    ax.set_ylabel("send -> evicted in the slowest process (ms)")
    ax.set_title("Fan-out: one message to every process")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fanout", description=__doc__)
    parser.add_argument("--redis-url", default=os.environ.get("HYBRIDINVAL_REDIS_URL"))
    parser.add_argument("--amqp-url", default=os.environ.get("HYBRIDINVAL_AMQP_URL"))
    parser.add_argument("--amqp", action="store_true", help="also the RabbitMQ rows")
    parser.add_argument("--sizes", default="8,32,128")
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--throughput-seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    redis_url = args.redis_url or DEFAULT_REDIS_URL
    amqp_url = args.amqp_url or DEFAULT_AMQP_URL
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = MODES if args.amqp else MODES[:2]
    started = time.monotonic()
    rows = []
    for size in sizes:
        for mode in modes:
            print(f"[{time.monotonic() - started:6.1f}s] {mode}, {size} subscribers", flush=True)
            rows.append(
                measure(
                    mode,
                    size,
                    redis_url=redis_url,
                    amqp_url=amqp_url,
                    messages=args.messages,
                    interval=args.interval_ms / 1000,
                    throughput_seconds=args.throughput_seconds,
                )
            )
    results = {
        "command": "python -m benchmarks.fanout " + " ".join(argv or sys.argv[1:]),
        "python": sys.version.split()[0],
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "seconds": round(time.monotonic() - started, 1),
        "rows": rows,
    }
    table = markdown(results)
    print(table)
    full = sizes == [8, 32, 128] and args.amqp
    out = args.out if full else args.out / "partial"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fanout.json").write_text(json.dumps(results, indent=1))
    (out / "fanout.md").write_text(
        f"Run: `{results['command']}` on {results['cpus']} CPUs, Python {results['python']}; "
        f"{results['seconds']} s.\n\n{table}"
    )
    plot(results, out / "fanout.png")
    print(f"wrote {out}/fanout.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
