"""``make chaos``: the mixed workload under real faults, with figures per fault.

4 reader processes and 1 writer on PostgreSQL, Zipf keys, every process installed with the
transactional outbox (so every process also runs a relay), on a private ``redis-server`` that
each reader reaches through a TCP proxy of its own. Faults are injected one kind after another,
with a quiet gap between injections:

=================== =====================================================================
redis kill          the private Redis SIGKILLed and restarted on the same port
subscriber kill     ``CLIENT KILL TYPE pubsub``: every subscriber disconnected at once
half-open link      one reader's proxy black-holes its traffic (nothing is closed) for
                    longer than the health check, then heals
buffer-limit kill   ``client-output-buffer-limit pubsub`` lowered and the channel flooded,
                    so Redis disconnects subscribers for a full output buffer
writer SIGKILL      the writer killed by SIGKILL at a random point of a commit: before its
                    COMMIT, between COMMIT and publish, or during the publish; a new writer
                    takes over
PG terminate        ``pg_terminate_backend`` of the writer's connection while it COMMITs
=================== =====================================================================

Every read records (row, version returned, start time); the writer records each commit's
start and return (and its death, written unbuffered just before the SIGKILL). Afterwards the
database says which commits in flight at a death or a terminated COMMIT did commit; those count
from the moment of the fault. For each kind of fault:

* **stale past δ**: reads that returned a version older than one committed more than δ before
  the read began, except within the documented bound of the fault: for a commit whose writer
  died after its COMMIT, the crash bound (``grace + interval`` of the outbox, plus δ); while a
  link is half-open (nothing arrives and nothing says so), the detection bound
  (``health_check_interval + health_check_timeout``, plus δ). Must be 0.
* **oldest stale inside the bound**: how late the latest of those reads was.
* **lost**: after the run, every reader reads every row once more; a version older than the
  database's is a lost invalidation, counted against the fault phase of the commit that made
  the newer version. Must be 0.
* **flushes**: blind periods (L1 flushed and bypassed) the readers went through.
* **recovery**: from the fault to the last stale read it caused (0 if none).

Run: ``python -m benchmarks.chaos`` (``make chaos``); results in ``benchmarks/results/chaos.*``.
Needs ``redis-server`` on PATH and PostgreSQL (``HYBRIDINVAL_DATABASE_URL``, default the local
``test`` database). Everything it starts, it stops.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
from sqlalchemy import Integer, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from hybridinval.sqlalchemy import outbox_table, track

from .staleness import WriteLog, find_stale

RESULTS = Path(__file__).parent / "results"
DEFAULT_DB = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@dataclass
class ChaosConfig:
    rows: int = 200
    zipf_s: float = 1.1
    readers: int = 4
    write_rate: float = 50.0
    delta_ms: float = 10.0
    gap: float = 1.0  # seconds between injections
    redis_kills: int = 5
    subscriber_kills: int = 20
    half_open: int = 3
    buffer_kills: int = 1
    writer_kills: int = 20
    pg_terminates: int = 5
    outbox_grace: float = 1.0
    outbox_interval: float = 0.5
    seed: int = 7


# -- servers and links ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A ``redis-server`` of our own on a loopback port: killed and restarted on demand."""

    def __init__(self, directory: str) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("make chaos needs redis-server on PATH")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)


class HalfOpen:
    """Black-holes one TCP connection to the private Redis (packets dropped both ways, nothing
    closed: a half-open link) with iptables rules that match only its local port, so that no
    proxy sits in the path of every message. Rules carry a comment and are always removed."""

    def __init__(self, redis_port: int, tag: str) -> None:
        self.redis_port = redis_port
        self.tag = tag
        self.rules: list[list[str]] = []

    @staticmethod
    def available() -> bool:
        iptables = shutil.which("iptables")
        if iptables is None or os.geteuid() != 0:
            return False
        done = subprocess.run([iptables, "-L", "-n"], capture_output=True)
        return done.returncode == 0

    def drop(self, client_port: int) -> None:
        for direction in (("--sport", "--dport"), ("--dport", "--sport")):
            rule = [
                "OUTPUT", "-p", "tcp", "-s", "127.0.0.1", "-d", "127.0.0.1",
                direction[0], str(client_port), direction[1], str(self.redis_port),
                "-m", "comment", "--comment", self.tag, "-j", "DROP",
            ]  # fmt: skip
            subprocess.run(["iptables", "-I", *rule], check=True)
            self.rules.append(rule)

    def heal(self) -> None:
        while self.rules:
            rule = self.rules.pop()
            subprocess.run(["iptables", "-D", *rule], check=False)


# -- the processes ------------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "chaos_items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(Integer)


outbox_table(Base.metadata)
track(Item, keys=["item:{id}"])


def _setup(db_url: str, schema: str) -> Any:
    engine = create_engine(db_url, pool_pre_ping=True).execution_options(
        schema_translate_map={None: schema}
    )
    return Base, Item, engine, sessionmaker(engine, expire_on_commit=False)


def _zipf(rows: int, s: float, rng: np.random.Generator, size: int) -> list[int]:
    weights = 1.0 / np.arange(1, rows + 1, dtype=np.float64) ** s
    return [int(x) + 1 for x in rng.choice(rows, size=size, p=weights / weights.sum())]


def _install(sessions: Any, cache: Any, cfg: ChaosConfig) -> Any:
    from hybridinval.sqlalchemy import Outbox, install

    outbox = Outbox(grace=cfg.outbox_grace, interval=cfg.outbox_interval)
    return install(sessions, cache, outbox=outbox)


def reader(
    index: int, redis_url: str, db_url: str, schema: str, ns: str, cfg: ChaosConfig,
    ready: Any, stop: Any, final: Any, out: str,
) -> None:  # fmt: skip
    from hybridinval import HybridCache
    from hybridinval.sqlalchemy import cached

    _, Item, _, Sessions = _setup(db_url, schema)
    cache = HybridCache.from_url(redis_url, namespace=ns)
    installation = _install(Sessions, cache, cfg)
    cache.wait_until_subscribed(10)
    rng = np.random.default_rng(cfg.seed + 100 + index)
    rows_a, versions_a, starts_a = [], [], []
    flushes: list[tuple[int, int]] = []
    ready.set()
    next_sample = 0
    while not stop.is_set():
        for row in _zipf(cfg.rows, cfg.zipf_s, rng, 200):
            start = time.monotonic_ns()
            with Sessions() as s:

                def load(s: Any = s, row: int = row) -> int:
                    return int(s.get(Item, row).version)

                try:
                    version = cached(s, cache).get_or_set(f"item:{row}", load)
                except Exception:  # the database itself failed: not a cache read
                    continue
            rows_a.append(row)
            versions_a.append(int(version))
            starts_a.append(start)
            if start >= next_sample:
                flushes.append((start, int(cache.stats()["blind_periods"])))
                next_sample = start + 50_000_000
    final.wait(120)
    lost = []
    with Sessions() as s:
        truth = {i.id: i.version for i in s.query(Item)}
    for row, version in truth.items():
        with Sessions() as s:
            seen = cached(s, cache).get_or_set(f"item:{row}", lambda: -1)
        if seen != -1 and seen < version:
            lost.append((row, seen, version))
    flushes.append((time.monotonic_ns(), int(cache.stats()["blind_periods"])))
    np.savez(
        out,
        rows=np.asarray(rows_a, dtype=np.int64),
        versions=np.asarray(versions_a, dtype=np.int64),
        starts=np.asarray(starts_a, dtype=np.int64),
        flushes=np.asarray(flushes, dtype=np.int64).reshape(-1, 2),
        lost=np.asarray(lost, dtype=np.int64).reshape(-1, 3),
    )
    installation.uninstall()
    cache.close()


# What the writer does at its next commit: nothing, die at a point of it, or have its backend
# terminated during the COMMIT.
NONE, BEFORE_COMMIT, AFTER_COMMIT, DURING_PUBLISH, PG_TERMINATE = range(5)


def writer(
    redis_url: str, db_url: str, schema: str, ns: str, cfg: ChaosConfig, seed: int,
    command: Any, ready: Any, stop: Any, log_path: str,
) -> None:  # fmt: skip
    from sqlalchemy import event, text

    from hybridinval import HybridCache

    _, Item, engine, Sessions = _setup(db_url, schema)
    cache = HybridCache.from_url(redis_url, namespace=ns)
    installation = _install(Sessions, cache, cfg)
    cache.wait_until_subscribed(10)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    pid = os.getpid()

    def record(kind: str, row: int, version: int) -> None:
        os.write(fd, f"{kind} {row} {version} {time.monotonic_ns()}\n".encode())

    current: dict[str, Any] = {}

    def die(row: int, version: int) -> None:
        record("K", row, version)
        os.kill(pid, signal.SIGKILL)

    @event.listens_for(engine, "commit")
    def before_commit(conn: Any) -> None:  # before ours: registered first
        point = current.get("point")
        if point == BEFORE_COMMIT:
            die(current["row"], current["version"])
        elif point == PG_TERMINATE:
            backend = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            delay = random.uniform(0, 0.0005)

            def terminate() -> None:
                time.sleep(delay)
                with engine.connect() as other:
                    other.execute(text(f"SELECT pg_terminate_backend({int(backend)})"))

            threading.Thread(target=terminate, daemon=True).start()

    publish = cache.invalidate_committed

    def publishing(keys: Any, **options: Any) -> bool:
        point = current.get("point")
        if point == AFTER_COMMIT:
            die(current["row"], current["version"])
        if point == DURING_PUBLISH:
            delay = random.uniform(0, 0.0003)
            threading.Timer(delay, die, args=(current["row"], current["version"])).start()
        return publish(keys, **options)

    cache.invalidate_committed = publishing  # type: ignore[method-assign]
    rng = np.random.default_rng(seed)
    ready.set()
    interval = 1.0 / cfg.write_rate
    while not stop.is_set():
        for row in _zipf(cfg.rows, cfg.zipf_s, rng, 100):
            if stop.is_set():
                break
            point = command.value
            if point:
                command.value = NONE
            try:
                with Sessions() as s:
                    item = s.get(Item, row)
                    version = item.version + 1
                    current.update(row=row, version=version, point=point)
                    item.version = version
                    record("S", row, version)
                    s.commit()
                record("D", row, version)
            except Exception:  # a terminated backend: the outcome is unknown
                record("U", row, version)
                time.sleep(0.05)
            current.clear()
            time.sleep(interval)
    installation.uninstall()
    cache.close()


# -- the run --------------------------------------------------------------------------------------


@contextlib.contextmanager
def private_schema(db_url: str) -> Iterator[str]:
    from sqlalchemy import create_engine, text

    schema = f"hi_chaos_{uuid.uuid4().hex[:8]}"
    admin = create_engine(db_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield schema
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


def run(cfg: ChaosConfig, db_url: str, out_dir: Path) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    tmp = tempfile.TemporaryDirectory(prefix="hybridinval-chaos-")
    server = PrivateRedis(tmp.name)
    server.start()
    ns = f"chaos-{uuid.uuid4().hex[:8]}"
    half_open = HalfOpen(server.port, f"hybridinval-chaos-{ns}")
    faults: list[tuple[str, int]] = []  # (kind, monotonic ns)
    procs: list[Any] = []
    try:
        with private_schema(db_url) as schema:
            Base, Item, engine, Sessions = _setup(db_url, schema)
            Base.metadata.create_all(engine)
            with Sessions.begin() as s:
                s.add_all(Item(id=i, version=1) for i in range(1, cfg.rows + 1))
            stop, final = ctx.Event(), ctx.Event()
            readies = []
            outs = [str(Path(tmp.name) / f"reader{i}.npz") for i in range(cfg.readers)]
            for i in range(cfg.readers):
                ready = ctx.Event()
                readies.append(ready)
                p = ctx.Process(
                    target=reader,
                    args=(i, server.url, db_url, schema, ns, cfg, ready, stop, final, outs[i]),
                )
                p.start()
                procs.append(p)
            log_path = str(Path(tmp.name) / "writes.log")
            command = ctx.Value("i", 0)
            writer_stop = ctx.Event()
            writers: list[Any] = []

            def start_writer() -> Any:
                ready = ctx.Event()
                w = ctx.Process(
                    target=writer,
                    args=(
                        server.url,
                        db_url,
                        schema,
                        ns,
                        cfg,
                        cfg.seed + len(writers),
                        command,
                        ready,
                        writer_stop,
                        log_path,
                    ),
                )
                w.start()
                writers.append(w)
                if not ready.wait(60):
                    raise RuntimeError("the writer did not start")
                return w

            for ready in readies:
                if not ready.wait(60):
                    raise RuntimeError("a reader did not start")
            current_writer = start_writer()
            rng = random.Random(cfg.seed)

            def mark(kind: str) -> None:
                faults.append((kind, time.monotonic_ns()))

            time.sleep(cfg.gap * 2)  # steady
            admin = server.client()
            for _ in range(cfg.redis_kills):
                mark("redis kill")
                server.kill()
                time.sleep(0.2)
                server.start()
                time.sleep(cfg.gap)
            admin = server.client()
            for _ in range(cfg.subscriber_kills):
                mark("subscriber kill")
                with contextlib.suppress(redis.RedisError):
                    admin.execute_command(  # type: ignore[no-untyped-call,unused-ignore]
                        "CLIENT", "KILL", "TYPE", "pubsub"
                    )
                time.sleep(cfg.gap / 2)
            for i in range(cfg.half_open if HalfOpen.available() else 0):
                subscribers = admin.client_list(_type="pubsub")
                victim = subscribers[i % len(subscribers)]
                mark("half-open link")
                half_open.drop(int(str(victim["addr"]).rsplit(":", 1)[1]))
                time.sleep(2.0)  # past health_check_interval + health_check_timeout
                half_open.heal()
                time.sleep(cfg.gap)
            for _ in range(cfg.buffer_kills):
                mark("buffer-limit kill")
                admin.config_set("client-output-buffer-limit", "pubsub 64kb 32kb 1")
                blob = b"x" * 65536
                pipe = admin.pipeline(transaction=False)
                for i in range(1000):
                    pipe.publish(f"hi:{ns}:inval", blob)
                    if i % 100 == 99:
                        pipe.execute()
                pipe.execute()
                admin.config_set("client-output-buffer-limit", "pubsub 32mb 8mb 60")
                time.sleep(cfg.gap)
            points = [BEFORE_COMMIT, AFTER_COMMIT, DURING_PUBLISH]
            for i in range(cfg.writer_kills):
                mark("writer SIGKILL")
                command.value = points[i % 3] if i < 3 else rng.choice(points)
                current_writer.join(30)
                if current_writer.exitcode != -signal.SIGKILL:
                    raise RuntimeError(f"writer ended with {current_writer.exitcode}")
                current_writer = start_writer()
                time.sleep(cfg.gap / 2)
            for _ in range(cfg.pg_terminates):
                mark("PG terminate")
                command.value = PG_TERMINATE
                time.sleep(cfg.gap)
            time.sleep(cfg.gap)
            writer_stop.set()
            current_writer.join(30)
            end = time.monotonic_ns()
            # Let every relay finish what a dead writer left, then the final check.
            time.sleep(cfg.outbox_grace + cfg.outbox_interval + 1.0)
            stop.set()
            final.set()
            for p in procs:
                p.join(180)
            with Sessions() as s:
                truth = {i.id: i.version for i in s.query(Item)}
            engine.dispose()
        report = analyse(cfg, outs, log_path, truth, faults, end)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        half_open.heal()
        server.kill()
        if os.environ.get("HYBRIDINVAL_CHAOS_KEEP"):  # for a look at the raw records
            shutil.copytree(tmp.name, os.environ["HYBRIDINVAL_CHAOS_KEEP"], dirs_exist_ok=True)
        tmp.cleanup()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "chaos.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "chaos.md").write_text(render(report))
    return report


def analyse(
    cfg: ChaosConfig,
    outs: list[str],
    log_path: str,
    truth: dict[int, int],
    faults: list[tuple[str, int]],
    end_ns: int,
) -> dict[str, Any]:
    log_lines = Path(log_path).read_text().splitlines()
    # Which commit made each (row, version): the one that returned ("D"), or one in flight at a
    # writer's death ("K") or a terminated COMMIT ("U") if the database has it and nobody
    # wrote that version again afterwards (a retry of the same version means the first
    # attempt did not commit).
    made: dict[tuple[int, int], tuple[int, bool]] = {}
    for line in log_lines:
        kind, row_s, version_s, t_s = line.split()
        row, version, t = int(row_s), int(version_s), int(t_s)
        if kind == "S":
            made.pop((row, version), None)
        elif kind == "D" or (kind in ("K", "U") and truth.get(row, 0) >= version):
            made[row, version] = (t, kind == "K")
    rows: list[int] = []
    versions: list[int] = []
    done: list[int] = []
    crashed: list[bool] = []
    for (row, version), (t, crash) in made.items():
        rows.append(row)
        versions.append(version)
        done.append(t)
        crashed.append(crash)
    # A version that committed although its writer died before logging it (none is expected:
    # the K line is written before the kill) would show as a lost invalidation below.
    writes = WriteLog.from_lists(rows, versions, done)
    crash_of = {(r, v): c for r, v, c in zip(rows, versions, crashed, strict=True)}
    from hybridinval import CacheConfig

    delta_ns = int(cfg.delta_ms * 1e6)
    bound_ns = int((cfg.outbox_grace + cfg.outbox_interval) * 1e9) + delta_ns
    defaults = CacheConfig()
    detect_ns = (
        int((defaults.health_check_interval + defaults.health_check_timeout) * 1e9) + delta_ns
    )
    by_kind: dict[str, dict[str, Any]] = {}
    for kind, _ in faults:
        by_kind.setdefault(kind, _empty_figures())["injections"] += 1
    steady = _empty_figures()
    fault_times = np.asarray([t for _, t in faults], dtype=np.int64)

    def phase_of(t: int) -> tuple[str, int]:
        i = int(np.searchsorted(fault_times, t, side="right")) - 1
        return (faults[i][0], faults[i][1]) if i >= 0 else ("steady", 0)

    total_reads = 0
    lost_total = 0
    w_sorted: dict[int, list[tuple[int, int]]] = {}
    for r, v, t in zip(rows, versions, done, strict=True):
        w_sorted.setdefault(r, []).append((v, t))
    for out in outs:
        data = np.load(out)
        r_rows, r_versions, r_starts = data["rows"], data["versions"], data["starts"]
        total_reads += len(r_rows)
        report = find_stale(r_rows, r_versions, r_starts, writes, grace_ns=delta_ns)
        for idx in np.flatnonzero(report.stale):
            row, version, start = int(r_rows[idx]), int(r_versions[idx]), int(r_starts[idx])
            newer = min((v, t) for v, t in w_sorted[row] if v > version)
            age = start - newer[1]
            name, at = phase_of(start)
            stats = by_kind.get(name, steady)
            crash_ok = crash_of.get((row, newer[0])) and age <= bound_ns
            half_open_ok = name == "half-open link" and start - at <= detect_ns
            if crash_ok or half_open_ok:
                stats["oldest_stale_in_bound_ms"] = max(
                    stats["oldest_stale_in_bound_ms"], round(age / 1e6, 1)
                )
            else:
                stats["stale_past_delta"] += 1
                examples = stats.setdefault("examples", [])
                if len(examples) < 5:
                    examples.append(
                        {
                            "row": row,
                            "returned": version,
                            "newer": newer[0],
                            "newer_by_crash": bool(crash_of.get((row, newer[0]))),
                            "age_ms": round(age / 1e6, 1),
                            "after_fault_ms": round((start - at) / 1e6, 1) if at else None,
                        }
                    )
            if at:
                stats["recovery_ms"] = max(stats["recovery_ms"], round((start - at) / 1e6, 1))
        flushes = data["flushes"]
        for j in range(1, len(flushes)):
            grown = int(flushes[j][1] - flushes[j - 1][1])
            if grown > 0:
                name, _ = phase_of(int(flushes[j][0]))
                by_kind.get(name, steady)["flushes"] += grown
        lost_total += len(data["lost"])
        for row, _seen, version in data["lost"]:
            # Attributed to the phase of the commit whose invalidation never arrived.
            made_at = made.get((int(row), int(version)))
            name, _ = phase_of(made_at[0]) if made_at else ("steady", 0)
            by_kind.get(name, steady)["lost"] += 1
    return {
        "config": asdict(cfg),
        "reads": total_reads,
        "commits": len(rows),
        "crash_bound_ms": round(bound_ns / 1e6, 1),
        "half_open_bound_ms": round(detect_ns / 1e6, 1),
        "writer_deaths": sum(1 for line in log_lines if line.startswith("K ")),
        "deaths_after_commit": sum(crashed),
        "unknown_outcomes": sum(1 for line in log_lines if line.startswith("U ")),
        "lost_invalidations": lost_total,
        "steady": steady,
        "faults": by_kind,
        "duration_s": round((end_ns - (faults[0][1] if faults else end_ns)) / 1e9, 1),
    }


def _empty_figures() -> dict[str, Any]:
    return {
        "injections": 0,
        "stale_past_delta": 0,
        "oldest_stale_in_bound_ms": 0.0,
        "flushes": 0,
        "recovery_ms": 0.0,
        "lost": 0,
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        "| fault | injections | stale past δ (must be 0) | oldest stale inside its "
        "bound | invalidations lost (must be 0) | flushes | recovery |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in [("steady", report["steady"]), *report["faults"].items()]:
        lines.append(
            f"| {name} | {s['injections']} | {s['stale_past_delta']} | "
            f"{s['oldest_stale_in_bound_ms']} ms | {s.get('lost', 0)} | {s['flushes']} | "
            f"{s['recovery_ms']} ms |"
        )
    cfg = report["config"]
    lines += [
        "",
        f"{report['reads']:,} reads checked, {report['commits']:,} commits, "
        f"{cfg['readers']} readers + 1 writer at {cfg['write_rate']:.0f} commits/s on "
        f"PostgreSQL, Zipf s={cfg['zipf_s']} over {cfg['rows']} rows; δ = {cfg['delta_ms']} ms; "
        f"crash bound (outbox grace + interval + δ) = {report['crash_bound_ms']} ms; "
        f"half-open detection bound (health check interval + timeout + δ) = "
        f"{report['half_open_bound_ms']} ms; writer deaths: {report['writer_deaths']} "
        f"({report['deaths_after_commit']} after their COMMIT); COMMITs with an unknown "
        f"outcome (terminated backend): {report['unknown_outcomes']}; "
        f"invalidations lost: {report['lost_invalidations']} (must be 0).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default=os.environ.get("HYBRIDINVAL_DATABASE_URL", DEFAULT_DB))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--quick", action="store_true", help="one injection of each kind")
    args = parser.parse_args(argv)
    cfg = ChaosConfig()
    if args.quick:
        cfg = ChaosConfig(redis_kills=1, subscriber_kills=1, half_open=1, writer_kills=3,
                          pg_terminates=1)  # fmt: skip
    report = run(cfg, args.db, Path(args.out))
    print(render(report))
    bad = report["lost_invalidations"] + sum(
        s["stale_past_delta"] for s in [report["steady"], *report["faults"].values()]
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
