"""``make fanout``: the cost of one invalidation as the number of subscribed processes grows.

For each backplane and each number of subscriber processes (8, 32 and 128 by default), in one
run, against the raw client of the same broker:

* **propagation to the slowest process**: the writer stamps each message before it sends it;
  every subscriber process stamps it when its eviction is done (for raw clients: when the
  message is read); per message, the latest of those; p50 and p99 over the messages;
* **broker CPU per message** (Redis only: ``INFO cpu``, user + system, over the message phase,
  summed over a cluster's masters; divided by the messages, and by the messages times the
  subscribers);
* **subscriber CPU per message**: each subscriber process's own CPU time (``/proc``) over the
  message phase, divided by the messages; the median process; and the hub's, where there is one;
* **keys per second** that one writer process, and four, can invalidate (one key per call),
  with every subscriber listening; and **Redis CPU per key** with four writers, counted until
  Redis has written out what it owes the subscribers (their output buffers are empty), net of
  what Redis spends idle (measured for a second just before).

Rows: ``raw PUBLISH`` (redis-py subscriber processes), ``hybridinval`` (Redis Pub/Sub) and
``hybridinval (hub)`` (the same behind one host hub); with ``--amqp``, ``raw kombu publish`` and
``hybridinval (RabbitMQ)``; with ``--cluster`` (a private 3-master cluster), ``raw SPUBLISH``
(redis-py's sharded Pub/Sub on one channel), ``hybridinval (cluster)`` (sharded, a channel per
bucket) and ``hybridinval (cluster, hub)``. Each row runs ``--repeats`` times (3), the rows
taken in turn, and every figure is the median of its runs. Every subscriber is a forked
process of this one, idle but for the backplane; all run on this machine. Linux only
(``/proc``). Results in ``benchmarks/results/fanout.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import re
import sys
import tempfile
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
REDIS_MODES = ("raw PUBLISH", "hybridinval", "hybridinval (hub)")
AMQP_MODES = ("raw kombu publish", "hybridinval (RabbitMQ)")
CLUSTER_MODES = ("raw SPUBLISH", "hybridinval (cluster)", "hybridinval (cluster, hub)")
MODES = REDIS_MODES + AMQP_MODES + CLUSTER_MODES


def _family(mode: str) -> str:
    if mode in AMQP_MODES:
        return "amqp"
    return "cluster" if mode in CLUSTER_MODES else "redis"


def _cache_options(mode: str, spec: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if mode == "hybridinval (RabbitMQ)":
        options["backplane"] = spec["amqp_url"]
    if mode.endswith("hub)"):
        options["backplane_hub"] = spec["hub_path"]
    return options


def _cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid``, all its threads, in ns resolution (Linux ``schedstat``)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def _hub(spec: dict[str, Any], ready: Any, done: Any) -> None:
    from hybridinval.hub import Hub

    with Hub(spec["redis_url"], spec["hub_path"], namespace=spec["namespace"]):
        ready.release()
        done.wait()


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
    elif mode == "raw SPUBLISH":
        cluster: Any = _cluster_client(spec)
        sharded = cluster.pubsub()
        sharded.ssubscribe(spec["channel"])
        sharded.get_sharded_message(timeout=5)  # the confirmation
        ready.release()
        while not done.is_set():
            message = sharded.get_sharded_message(timeout=0.1)
            if message is not None and message.get("type") == "smessage":
                stamps[int(message["data"])] = now()
        sharded.close()
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

        options = _cache_options(mode, spec)
        cache = HybridCache.from_url(spec["redis_url"], namespace=spec["namespace"], **options)
        assert cache.wait_until_subscribed(60)
        # Stamped right after the eviction, with the keys the cache decoded (no second decode
        # on our account).
        l1 = cache._local.l1
        evict_many = l1.evict_many

        def stamped(keys: Any) -> int:
            evicted = evict_many(keys)
            stamp = now()
            for key in keys:
                stamps[int(key[1:])] = stamp
            return evicted

        l1.evict_many = stamped  # type: ignore[method-assign]
        ready.release()
        done.wait()
        cache.close()
    out.send(stamps)


# -- the writer side ----------------------------------------------------------------------------


class _Sender:
    def __init__(self, mode: str, spec: dict[str, Any]) -> None:
        self.mode = mode
        self.closed = False
        if mode == "raw PUBLISH":
            self.client = redis.Redis.from_url(spec["redis_url"], protocol=2)
            channel = spec["channel"]
            self.send: Callable[[int], object] = lambda i: self.client.publish(channel, str(i))
        elif mode == "raw SPUBLISH":
            self.client = _cluster_client(spec)
            channel = spec["channel"]
            self.send = lambda i: self.client.spublish(channel, str(i))
        elif mode == "raw kombu publish":
            kombu = _kombu()
            self.conn = kombu.Connection(spec["amqp_url"])
            exchange = kombu.Exchange(spec["channel"], "fanout", durable=False, auto_delete=True)
            producer = kombu.Producer(self.conn.channel(), exchange=exchange, serializer="json")
            producer.declare()
            self.send = lambda i: producer.publish(i, retry=False)
        else:
            from hybridinval import HybridCache

            # Behind the hub too, in its rows, as every process of a host would be.
            options = _cache_options(mode, spec)
            self.cache = HybridCache.from_url(
                spec["redis_url"], namespace=spec["namespace"], **options
            )
            assert self.cache.wait_until_subscribed(60)
            self.send = lambda i: self.cache.invalidate(f"k{i}")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.mode in ("raw PUBLISH", "raw SPUBLISH"):
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


def _cluster_client(spec: dict[str, Any]) -> Any:
    from redis.cluster import RedisCluster

    host, port = spec["cluster_nodes"][0]
    return RedisCluster(host=host, port=port, protocol=2)


def _redis_cpu(clients: list[redis.Redis]) -> float:
    total = 0.0
    for client in clients:
        info = client.info("cpu")
        total += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return total


def _drained(probes: list[redis.Redis], timeout: float = 60.0) -> None:
    """Wait until Redis holds nothing more for its Pub/Sub clients: what it still has to write
    to a lagging subscriber is CPU the keys cost."""
    deadline = time.monotonic() + timeout
    while any(int(c.get("omem", 0)) for probe in probes for c in probe.client_list(_type="pubsub")):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the subscribers did not catch up within {timeout:.0f} s")
        time.sleep(0.05)


def _throughput(
    ctx: Any,
    mode: str,
    spec: dict[str, Any],
    writers: int,
    seconds: float,
    probes: list[redis.Redis],
) -> tuple[int, float, int]:
    """Keys per second that ``writers`` processes invalidate together, Redis CPU seconds per
    key meanwhile, and how many Pub/Sub connections Redis served as they began."""
    go = ctx.Event()
    outs, procs = [], []
    for _ in range(writers):
        ours, theirs = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_writer, args=(mode, spec, seconds, go, theirs))
        proc.start()
        outs.append(ours)
        procs.append(proc)
    time.sleep(0.5)
    # What Redis spends meanwhile without us (its cron; a cluster's bus; the subscribers'
    # health checks) is no key's cost: measured for a second first, and subtracted.
    idle_start, idle_since = _redis_cpu(probes), time.monotonic()
    time.sleep(1.0)
    idle_rate = (_redis_cpu(probes) - idle_start) / (time.monotonic() - idle_since)
    listening = sum(len(probe.client_list(_type="pubsub")) for probe in probes)
    cpu_start, started = _redis_cpu(probes), time.monotonic()
    go.set()
    total = sum(pipe.recv() for pipe in outs)
    _drained(probes)
    cpu = _redis_cpu(probes) - cpu_start - idle_rate * (time.monotonic() - started)
    for proc in procs:
        proc.join(30)
    return round(total / seconds), cpu / max(1, total), listening


def measure(
    mode: str,
    subscribers: int,
    *,
    redis_url: str,
    amqp_url: str,
    messages: int,
    interval: float,
    throughput_seconds: float,
    cluster_nodes: list[tuple[str, int]] | None = None,
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    tag = uuid.uuid4().hex[:8]
    spec: dict[str, Any] = {
        "redis_url": redis_url,
        "amqp_url": amqp_url,
        "namespace": f"fanout-{tag}",
        "channel": f"fanout-{tag}",
        "hub_path": os.path.join(tempfile.mkdtemp(prefix="hybridinval-fanout-"), "hub.sock"),
        "cluster_nodes": cluster_nodes,
    }
    probes = [redis.Redis.from_url(redis_url, protocol=2)]
    if _family(mode) == "cluster":
        assert cluster_nodes, "the cluster rows need --cluster"
        spec["redis_url"] = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in cluster_nodes)
        probes = [redis.Redis(host=h, port=p, protocol=2) for h, p in cluster_nodes]
    if mode.startswith("hybridinval"):
        from hybridinval.keyspace import Keyspace

        spec["channel"] = Keyspace(spec["namespace"]).channel
    ready, done, hub_done = ctx.Semaphore(0), ctx.Event(), ctx.Event()
    hub = None
    if mode.endswith("hub)"):
        hub = ctx.Process(target=_hub, args=(spec, ready, hub_done), daemon=True)
        hub.start()
        if not ready.acquire(timeout=60):
            raise RuntimeError(f"{mode}: the hub did not start")
    pipes, procs = [], []
    for _ in range(subscribers):
        ours, theirs = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_subscriber, args=(mode, spec, ready, done, theirs), daemon=True)
        proc.start()
        pipes.append(ours)
        procs.append(proc)
    sender = _Sender(mode, spec)
    rates: dict[int, int] = {}
    per_key: dict[int, float] = {}
    listening = 0
    try:
        for _ in range(subscribers):
            if not ready.acquire(timeout=120):
                raise RuntimeError(f"{mode}: a subscriber did not start")
        time.sleep(0.5)  # let every subscription settle
        sent_at: dict[int, int] = {}
        pids = [p.pid for p in procs if p.pid is not None]
        if hub is not None and hub.pid:
            pids.append(hub.pid)
        window = messages * interval + 0.5

        def cpus() -> list[float]:
            return [_cpu_seconds(pid) for pid in pids] + [_redis_cpu(probes)]

        # What everything spends idle (health checks, ticks, Redis's cron) over windows as
        # long as the message phase, before and after it: the smaller is subtracted (the
        # other may have caught the previous row's processes going away), so the figures are
        # per message.
        time.sleep(1.5)
        idle_start = cpus()
        time.sleep(window)
        idle_before = [b - a for a, b in zip(idle_start, cpus(), strict=True)]
        busy_start = cpus()
        for i in range(messages):
            sent_at[i] = time.time_ns()
            sender.send(i)
            time.sleep(interval)
        time.sleep(0.5)
        busy = [b - a for a, b in zip(busy_start, cpus(), strict=True)]
        idle_start = cpus()
        time.sleep(window)
        idle_after = [b - a for a, b in zip(idle_start, cpus(), strict=True)]
        idle = [min(x, y) for x, y in zip(idle_before, idle_after, strict=True)]
        net = [b - i for b, i in zip(busy, idle, strict=True)]
        cpu = net[-1]
        sub_cpu = sorted(net[: len(procs)])
        hub_cpu = net[len(procs)] if hub is not None and hub.pid else None
        # Closed before the writers fork: no thread of ours may hold a lock at a fork.
        sender.close()
        # Throughput with every subscriber listening: what a writer can invalidate, and what
        # Redis spends per key, is what the fan-out costs.
        for writers in (1, 4):
            rates[writers], per_key[writers], listening = _throughput(
                ctx, mode, spec, writers, throughput_seconds, probes
            )
        done.set()
        stamps = [pipe.recv() for pipe in pipes]
    finally:
        done.set()
        sender.close()
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.terminate()  # ours, by handle
        hub_done.set()  # after its processes: none of them sees it go
        if hub is not None:
            hub.join(30)
            if hub.is_alive():
                hub.terminate()
    slowest = []
    lost = 0
    for i, sent in sent_at.items():
        arrivals = [s[i] for s in stamps if i in s]
        lost += subscribers - len(arrivals)
        if arrivals:
            slowest.append((max(arrivals) - sent) / 1000)
    slowest.sort()
    n = len(slowest)
    for probe in probes:
        probe.close()
    per_message = sub_cpu[len(sub_cpu) // 2] / messages * 1e6 if sub_cpu else None
    return {
        "mode": mode,
        "subscribers": subscribers,
        "messages": messages,
        "lost": lost,
        "slowest_p50_us": round(slowest[n // 2], 1) if n else None,
        "slowest_p99_us": round(slowest[min(n - 1, n * 99 // 100)], 1) if n else None,
        "redis_cpu_us_per_message": round(cpu / messages * 1e6, 1),
        "redis_cpu_us_per_message_per_subscriber": round(cpu / messages / subscribers * 1e6, 2),
        "subscriber_cpu_us_per_message": round(per_message, 1) if per_message is not None else None,
        "redis_cpu_us_per_key_4_writers": round(per_key[4] * 1e6, 2),
        "hub_cpu_us_per_message": (
            round(hub_cpu / messages * 1e6, 1) if hub_cpu is not None else None
        ),
        "keys_per_s_1_writer": rates[1],
        "keys_per_s_4_writers": rates[4],
        "pubsub_connections_during_throughput": listening,
    }


def _median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the runs of one row (``lost``: the total)."""
    row = dict(runs[0])
    for field, value in runs[0].items():
        if isinstance(value, (int, float)) and field not in ("subscribers", "messages"):
            values = sorted(r[field] for r in runs if r[field] is not None)
            row[field] = values[len(values) // 2] if values else None
    row["lost"] = sum(r["lost"] for r in runs)
    row["runs"] = len(runs)
    return row


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| backplane | subscribers | slowest p50 / p99 µs | x raw | Redis CPU µs per message "
        "(per subscriber) | x raw | subscriber CPU µs per message (hub) | x raw "
        "| keys/s, 1 writer | keys/s, 4 writers | Redis CPU µs per key, 4 writers | x raw |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = results["rows"]
    raw_of = {
        (r["subscribers"], _family(r["mode"])): r for r in rows if r["mode"].startswith("raw")
    }

    def ratio(r: dict[str, Any], raw: dict[str, Any] | None, field: str) -> str:
        if raw is None or raw is r or not r.get(field) or not raw.get(field):
            return "-"
        if "redis_cpu" in field and _family(r["mode"]) == "amqp":
            return "-"  # raw kombu leaves Redis idle: no baseline to divide by
        return f"{r[field] / raw[field]:.2f}x"

    for r in rows:
        raw = raw_of.get((r["subscribers"], _family(r["mode"])))
        hub = f" ({r['hub_cpu_us_per_message']})" if r.get("hub_cpu_us_per_message") else ""
        lines.append(
            f"| {r['mode']} | {r['subscribers']} | {r['slowest_p50_us']} / {r['slowest_p99_us']}"
            f" | {ratio(r, raw, 'slowest_p50_us')} / {ratio(r, raw, 'slowest_p99_us')}"
            f" | {r['redis_cpu_us_per_message']} ({r['redis_cpu_us_per_message_per_subscriber']})"
            f" | {ratio(r, raw, 'redis_cpu_us_per_message')}"
            f" | {r.get('subscriber_cpu_us_per_message')}{hub}"
            f" | {ratio(r, raw, 'subscriber_cpu_us_per_message')}"
            f" | {r['keys_per_s_1_writer']:,} | {r['keys_per_s_4_writers']:,}"
            f" | {r.get('redis_cpu_us_per_key_4_writers')}"
            f" | {ratio(r, raw, 'redis_cpu_us_per_key_4_writers')} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, cpu) = plt.subplots(1, 2, figsize=(12, 4.8))
    modes = list(dict.fromkeys(r["mode"] for r in results["rows"]))
    for index, mode in enumerate(modes):
        rows = [r for r in results["rows"] if r["mode"] == mode and r["slowest_p50_us"]]
        xs = [r["subscribers"] for r in rows]
        color = f"C{index}"  # one color per backplane: p50 solid, p99 dashed
        lat.plot(
            xs,
            [r["slowest_p50_us"] / 1000 for r in rows],
            marker="o",
            color=color,
            label=f"{mode} p50",
        )
        lat.plot(
            xs,
            [r["slowest_p99_us"] / 1000 for r in rows],
            marker="x",
            linestyle="--",
            color=color,
            label=f"{mode} p99",
        )
        if _family(mode) != "amqp":
            cpu.plot(
                xs,
                [max(r["redis_cpu_us_per_message"], 1.0) for r in rows],
                marker="o",
                color=color,
                label=mode,
            )
    for ax in (lat, cpu):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("subscriber processes")
        ax.grid(True, which="both", alpha=0.3)
    lat.set_ylabel("send -> evicted in the slowest process (ms)")
    lat.set_title("Propagation to the slowest process")
    lat.legend(fontsize=6, ncol=2)
    cpu.set_ylabel("Redis CPU per message (µs)")
    cpu.set_title("Redis CPU per message (one key each)")
    cpu.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fanout", description=__doc__)
    parser.add_argument("--redis-url", default=os.environ.get("HYBRIDINVAL_REDIS_URL"))
    parser.add_argument("--amqp-url", default=os.environ.get("HYBRIDINVAL_AMQP_URL"))
    parser.add_argument("--amqp", action="store_true", help="also the RabbitMQ rows")
    parser.add_argument(
        "--cluster", action="store_true", help="also the Redis Cluster rows (a private cluster)"
    )
    parser.add_argument("--modes", default=None, help="comma-separated subset of the rows")
    parser.add_argument("--sizes", default="8,32,128")
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--interval-ms", type=float, default=20.0)
    parser.add_argument("--throughput-seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; medians reported")
    args = parser.parse_args(argv)
    redis_url = args.redis_url or DEFAULT_REDIS_URL
    amqp_url = args.amqp_url or DEFAULT_AMQP_URL
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = list(REDIS_MODES) + (list(AMQP_MODES) if args.amqp else [])
    modes += list(CLUSTER_MODES) if args.cluster else []
    if args.modes:
        wanted = re.split(r",(?! )", args.modes)  # "hybridinval (cluster, hub)" is one row
        unknown = set(wanted) - set(modes)
        if unknown:
            parser.error(f"unknown rows {sorted(unknown)}; the rows are {modes}")
        modes = [m for m in modes if m in wanted]
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        nodes = None
        if args.cluster:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from support.cluster import LocalCluster  # the tests' throwaway cluster

            cluster = stack.enter_context(LocalCluster(masters=3, replicas=0))
            nodes = [(n.host, n.port) for n in cluster.nodes]
        for size in sizes:
            runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
            for repeat in range(args.repeats):  # the rows rotated, so noise hits them alike
                for mode in modes:
                    print(
                        f"[{time.monotonic() - started:6.1f}s] {mode}, {size} subscribers "
                        f"({repeat + 1}/{args.repeats})",
                        flush=True,
                    )
                    runs[mode].append(
                        measure(
                            mode,
                            size,
                            redis_url=redis_url,
                            amqp_url=amqp_url,
                            messages=args.messages,
                            interval=args.interval_ms / 1000,
                            throughput_seconds=args.throughput_seconds,
                            cluster_nodes=nodes,
                        )
                    )
            rows.extend(_median_row(runs[mode]) for mode in modes)
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
    full = (
        sizes == [8, 32, 128]
        and args.amqp
        and args.cluster
        and not args.modes
        and args.repeats >= 3
    )
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
