"""The staleness-under-load workload: 4 reader processes and 1 writer on PostgreSQL, one
contender at a time, with the subscriber connections killed during the second part of the run.

Setup: a table of ``rows`` rows ``(id, version, payload)``, every version 1. Keys are
``item:{id}``, drawn from a Zipf distribution (``zipf_s``) so a few rows are hot, as in real
traffic. Readers loop over units of work (one SQLAlchemy session each, like a web request,
``reads_per_session`` reads); every read records ``(row, version returned, start time)``. On a
miss the loader runs one query (counted). The writer commits updates at ``write_rate`` per
second, each incrementing one Zipf-chosen row's version through the ORM, then does what the
contender's users do after a commit; it records ``(row, new version, time the write returned)``.

Timeline of a run of ``duration`` seconds: the *steady* phase, then the *faults* phase, during
which every Pub/Sub connection of this run is killed (``CLIENT KILL``) at the ``fault_at``
fractions of the run, repeatedly for ``fault_hold`` seconds each time (a subscriber that cannot
stay connected, as during a network flap; 0 means a single kill). Only this run's connections are
killed (they are found by client name), because the Redis server is shared.

After the run the writer's history goes to every reader, which checks its own reads
(:mod:`benchmarks.staleness`) and reports counts, so millions of read records never cross a
process boundary. Time is ``time.monotonic_ns()``, which is system-wide on Linux.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import sys
import time
import traceback
import uuid
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import redis

from . import contenders as cmod
from .staleness import WriteLog, find_stale, stale_by_phase

__all__ = ["WorkerPool", "WorkloadConfig", "kill_pubsub", "run_contender", "zipf_rows"]


@dataclass
class WorkloadConfig:
    """Every knob of the workload; the defaults are what ``python -m benchmarks`` runs."""

    rows: int = 1000
    zipf_s: float = 1.1
    readers: int = 4
    duration: float = 6.0
    warmup: float = 0.5  # Zipf reads before the run (after the prewarm), not counted
    write_rate: float = 100.0  # commits per second, the same for every contender
    reads_per_session: int = 100
    # Seconds each reader sleeps after a unit of work (a web worker waiting for its next
    # request). 0 keeps readers CPU-bound, the hardest case for every subscriber thread.
    pause_per_session: float = 0.0
    grace_ms: float = 10.0
    l1_ttl: float = 60.0
    steady_fraction: float = 0.4
    fault_at: tuple[float, ...] = (0.45, 0.6, 0.75, 0.9)
    fault_hold: float = 0.3
    fault_every: float = 0.02
    latency_sample_every: int = 32
    payload_bytes: int = 100
    seed: int = 20240501
    startup_timeout: float = 60.0
    # Reader 0 adds one read that is stale by construction before checking: proves end to end
    # that the pipeline (records -> checker -> totals) reports a stale read (used by the test).
    plant_stale: bool = False
    # sys.setswitchinterval() in every workload process; None keeps Python's default (5 ms).
    # A diagnostic: how long a subscriber thread waits for the GIL held by a busy reader.
    switch_interval: float | None = None
    # hybridinval's l1_lease in ms: None keeps the library default, 0 turns the lease off.
    # A diagnostic: what the lease costs and what it prevents.
    l1_lease_ms: float | None = None


@dataclass
class _Spec:
    contender: str
    pg_url: str
    table: str
    redis_url: str  # with db and client_name
    prefix: str
    config: WorkloadConfig
    role: str  # "writer" or "reader-<n>"
    seed: int
    cashews_protocol: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def zipf_rows(rows: int, s: float, size: int, seed: int) -> list[int]:
    """``size`` row ids in ``1..rows`` with P(row k) proportional to k**-s."""
    weights = 1.0 / np.arange(1, rows + 1, dtype=np.float64) ** s
    rng = np.random.default_rng(seed)
    ids = rng.choice(rows, size=size, p=weights / weights.sum()) + 1
    return [int(x) for x in ids]


def key_for(row: int) -> str:
    return f"item:{row}"


# -- the database --------------------------------------------------------------------------------


def make_model(table: str) -> type:
    """A mapped class for ``table`` (one per run; each process builds its own)."""
    from sqlalchemy import Integer, String
    from sqlalchemy.orm import DeclarativeBase, mapped_column

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        # Unannotated columns: the class is built at run time, where string annotations
        # (``from __future__ import annotations``) could not be resolved.
        __tablename__ = table
        id = mapped_column(Integer, primary_key=True)
        version = mapped_column(Integer, nullable=False)
        payload = mapped_column(String, nullable=False)

    return Item


def create_table(pg_url: str, table: str, rows: int, payload_bytes: int) -> None:
    from sqlalchemy import create_engine, insert

    model: Any = make_model(table)
    engine = create_engine(pg_url)
    try:
        model.metadata.drop_all(engine)
        model.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                insert(model),
                [
                    {"id": i, "version": 1, "payload": "x" * payload_bytes}
                    for i in range(1, rows + 1)
                ],
            )
    finally:
        engine.dispose()


def drop_table(pg_url: str, table: str) -> None:
    from sqlalchemy import create_engine

    model: Any = make_model(table)
    engine = create_engine(pg_url)
    try:
        model.metadata.drop_all(engine)
    finally:
        engine.dispose()


def _session_factory(spec: _Spec) -> tuple[Any, Any, Any, Any]:
    from sqlalchemy import bindparam, create_engine, select
    from sqlalchemy.orm import Session, sessionmaker

    class BenchSession(Session):
        """A dedicated class, so that installing listeners on it touches no other session."""

    engine = create_engine(spec.pg_url, pool_size=2, max_overflow=2)
    model: Any = make_model(spec.table)
    factory = sessionmaker(engine, class_=BenchSession)
    query = select(model.version, model.payload).where(model.id == bindparam("id"))
    return engine, factory, model, query


# -- child processes ---------------------------------------------------------------------------


def worker_main(conn: Connection) -> None:
    """Entry point of every workload process (importable by name, as spawn requires).

    A worker serves one run after another (``("run", spec)``) until told ``("exit",)``, so the
    several seconds a spawned Python needs to import SQLAlchemy, redis-py and numpy are paid
    once per benchmark, not once per contender. Each run builds and closes its own contender.
    """
    default_interval = sys.getswitchinterval()
    # Blind periods and reconnects are expected here (we cause them) and counted in the results.
    for name in ("hybridinval", "cashews", "redis"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    while True:
        message = conn.recv()
        if message[0] == "exit":
            return
        spec: _Spec = message[1]
        try:
            sys.setswitchinterval(spec.config.switch_interval or default_interval)
            if cmod.CONTENDERS[spec.contender].is_async:
                asyncio.run(_async_child(spec, conn))
            else:
                _sync_child(spec, conn)
        except Exception:
            with contextlib.suppress(Exception):
                conn.send(("error", traceback.format_exc()))


class WorkerPool:
    """``size`` spawned worker processes, reused by every run (see :func:`worker_main`)."""

    def __init__(self, size: int) -> None:
        self.workers: list[tuple[Any, Connection]] = self._spawn(size)

    @staticmethod
    def _spawn(size: int) -> list[tuple[Any, Connection]]:
        ctx = multiprocessing.get_context("spawn")
        workers = []
        for n in range(size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, args=(theirs,), name=f"hibench-worker-{n}", daemon=True
            )
            proc.start()
            workers.append((proc, ours))
        return workers

    def __len__(self) -> int:
        return len(self.workers)

    def healthy(self) -> bool:
        return bool(self.workers) and all(proc.is_alive() for proc, _ in self.workers)

    def restart(self) -> None:
        """Replace every worker (after a failed run, one may be stuck mid-run)."""
        size = len(self.workers)
        self.close()
        self.workers = self._spawn(size)

    def close(self) -> None:
        for _, pipe in self.workers:
            with contextlib.suppress(Exception):
                pipe.send(("exit",))
        for proc, _ in self.workers:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()  # our own child, by handle
                proc.join(5)
        self.workers = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _env(spec: _Spec) -> cmod.Env:
    lease = spec.config.l1_lease_ms
    options = {} if lease is None else {"l1_lease": lease / 1000 if lease else None}
    return cmod.Env(spec.redis_url, spec.prefix, spec.config.l1_ttl, options)


def _sync_child(spec: _Spec, conn: Connection) -> None:
    engine, factory, model, query = _session_factory(spec)
    contender = cmod.CONTENDERS[spec.contender](_env(spec))
    try:
        contender.install(factory, model)
        if not contender.ready(spec.config.startup_timeout):
            raise RuntimeError(f"{spec.contender}: not ready after {spec.config.startup_timeout}s")
        if spec.role != "writer" and (contender.has_l1 or contender.has_l2):
            _prewarm(spec, factory, query, contender.reader)
        conn.send(("ready",))
        _, start_ns, stop_ns = conn.recv()
        if spec.role == "writer":
            log = _write_loop(spec, factory, model, start_ns, stop_ns, contender.after_commit)
            conn.send(("done", {"writes": log, "notes": contender.notes()}))
            return
        reads = _read_loop(spec, factory, query, start_ns, stop_ns, contender.reader)
        conn.send(("done", {"reads": len(reads.rows)}))
        conn.send(("result", _check(spec, reads, conn.recv(), contender.notes())))
    finally:
        contender.close()
        engine.dispose()


async def _async_child(spec: _Spec, conn: Connection) -> None:
    engine, factory, model, query = _session_factory(spec)
    contender: Any = cmod.CONTENDERS[spec.contender](_env(spec))
    loop = asyncio.get_running_loop()
    try:
        contender.install(factory, model)
        await contender.ainit()
        if not await contender.aready(spec.config.startup_timeout):
            raise RuntimeError(f"{spec.contender}: not ready after {spec.config.startup_timeout}s")
        if spec.role != "writer":
            await _aprewarm(spec, factory, query, contender.areader)
        conn.send(("ready",))
        _, start_ns, stop_ns = await loop.run_in_executor(None, conn.recv)
        if spec.role == "writer":
            log = await _awrite_loop(
                spec, factory, model, start_ns, stop_ns, contender.aafter_commit
            )
            conn.send(("done", {"writes": log, "notes": contender.notes()}))
            return
        reads = await _aread_loop(spec, factory, query, start_ns, stop_ns, contender.areader)
        conn.send(("done", {"reads": len(reads.rows)}))
        check = await loop.run_in_executor(None, conn.recv)
        conn.send(("result", _check(spec, reads, check, contender.notes())))
    finally:
        await contender.aclose()
        engine.dispose()


def _make_loader(
    session: Any, query: Any, out: _Reads | None, start_ns: int
) -> Callable[[int], cmod.Row]:
    """The loader every contender calls on a miss: one query, counted once the run began."""
    execute, now = session.execute, time.monotonic_ns

    def load(row: int) -> cmod.Row:
        if out is not None and now() >= start_ns:  # warm-up fills are not counted
            out.queries += 1
        version, payload = execute(query, {"id": row}).one()
        return {"id": row, "version": version, "payload": payload}

    return load


def _prewarm(
    spec: _Spec, factory: Any, query: Any, reader_for: Callable[[Any], cmod.ReadFn]
) -> None:
    """Read every row once before reporting ready (nothing is written yet), so the measured run
    starts on warm caches instead of timing the first fill of the Zipf tail."""
    with factory() as session:
        load = _make_loader(session, query, None, 0)
        read = reader_for(session)
        for row in range(1, spec.config.rows + 1):
            read(key_for(row), lambda row=row: load(row))  # type: ignore[misc]


async def _aprewarm(
    spec: _Spec, factory: Any, query: Any, reader_for: Callable[[Any], cmod.AReadFn]
) -> None:
    with factory() as session:
        load = _make_loader(session, query, None, 0)
        read = reader_for(session)
        for row in range(1, spec.config.rows + 1):
            await read(key_for(row), lambda row=row: load(row))  # type: ignore[misc]


class _Reads:
    """Per-read records in typed arrays (8 bytes a field), not tuples: millions of reads."""

    def __init__(self) -> None:
        self.rows = array("q")
        self.versions = array("q")
        self.starts = array("q")
        self.latency = array("q")  # every latency_sample_every-th read, ns
        self.queries = 0
        self.errors = 0
        self.first_error = ""


def _sleep_until(deadline_ns: int) -> None:
    delay = (deadline_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


def _read_loop(
    spec: _Spec,
    factory: Any,
    query: Any,
    start_ns: int,
    stop_ns: int,
    reader_for: Callable[[Any], cmod.ReadFn],
) -> _Reads:
    cfg = spec.config
    plan = zipf_rows(cfg.rows, cfg.zipf_s, 1 << 18, spec.seed)
    keys = [""] + [key_for(r) for r in range(1, cfg.rows + 1)]
    out = _Reads()
    rows_a, versions_a, starts_a, lat_a = (
        out.rows.append,
        out.versions.append,
        out.starts.append,
        out.latency.append,
    )
    now = time.monotonic_ns
    mask, every = len(plan) - 1, cfg.latency_sample_every
    pause = cfg.pause_per_session
    i = 0
    _sleep_until(start_ns - int(cfg.warmup * 1e9))
    while now() < stop_ns:
        with factory() as session:
            load = _make_loader(session, query, out, start_ns)
            read = reader_for(session)
            for _ in range(cfg.reads_per_session):
                row = plan[i & mask]
                i += 1
                started = now()
                try:
                    value = read(keys[row], lambda row=row, load=load: load(row))  # type: ignore[misc]
                except Exception as exc:  # a failed read is counted, never a stale one
                    out.errors += 1
                    out.first_error = out.first_error or repr(exc)
                    continue
                rows_a(row)
                versions_a(value["version"])
                starts_a(started)
                if i % every == 0 and started >= start_ns:
                    lat_a(now() - started)
        if pause:
            time.sleep(pause)
    return out


async def _aread_loop(
    spec: _Spec,
    factory: Any,
    query: Any,
    start_ns: int,
    stop_ns: int,
    reader_for: Callable[[Any], cmod.AReadFn],
) -> _Reads:
    """The same loop as :func:`_read_loop`, awaiting the contender (its loader stays sync)."""
    cfg = spec.config
    plan = zipf_rows(cfg.rows, cfg.zipf_s, 1 << 18, spec.seed)
    keys = [""] + [key_for(r) for r in range(1, cfg.rows + 1)]
    out = _Reads()
    rows_a, versions_a, starts_a, lat_a = (
        out.rows.append,
        out.versions.append,
        out.starts.append,
        out.latency.append,
    )
    now = time.monotonic_ns
    mask, every = len(plan) - 1, cfg.latency_sample_every
    pause = cfg.pause_per_session
    i = 0
    await asyncio.sleep(max(0.0, (start_ns - int(cfg.warmup * 1e9) - now()) / 1e9))
    while now() < stop_ns:
        with factory() as session:
            load = _make_loader(session, query, out, start_ns)
            read = reader_for(session)
            for _ in range(cfg.reads_per_session):
                row = plan[i & mask]
                i += 1
                started = now()
                try:
                    value = await read(keys[row], lambda row=row, load=load: load(row))  # type: ignore[misc]
                except Exception as exc:
                    out.errors += 1
                    out.first_error = out.first_error or repr(exc)
                    continue
                rows_a(row)
                versions_a(value["version"])
                starts_a(started)
                if i % every == 0 and started >= start_ns:
                    lat_a(now() - started)
        # An async server returns to its event loop between requests (to write the response,
        # accept the next one): without this a loop of local-cache hits, which never suspend,
        # would starve the contender's listener task forever.
        await asyncio.sleep(pause)
    return out


def _write_plan(spec: _Spec) -> tuple[list[int], float]:
    cfg = spec.config
    return zipf_rows(cfg.rows, cfg.zipf_s, 1 << 16, spec.seed), 1e9 / cfg.write_rate


def _write_loop(
    spec: _Spec,
    factory: Any,
    model: Any,
    start_ns: int,
    stop_ns: int,
    after_commit: Callable[[list[str]], None],
) -> dict[str, list[int]]:
    plan, interval = _write_plan(spec)
    log: dict[str, list[int]] = {"rows": [], "versions": [], "done_ns": []}
    due = float(start_ns)
    for n in range(len(plan)):
        due = max(due + interval, float(time.monotonic_ns()))  # no catch-up bursts
        if due >= stop_ns:
            break
        _sleep_until(int(due))
        row = plan[n]
        with factory() as session:
            item = session.get(model, row)
            item.version += 1
            version = item.version
            session.commit()
        after_commit([key_for(row)])
        done = time.monotonic_ns()
        log["rows"].append(row)
        log["versions"].append(version)
        log["done_ns"].append(done)
    return log


async def _awrite_loop(
    spec: _Spec,
    factory: Any,
    model: Any,
    start_ns: int,
    stop_ns: int,
    after_commit: Callable[[list[str]], Any],
) -> dict[str, list[int]]:
    plan, interval = _write_plan(spec)
    log: dict[str, list[int]] = {"rows": [], "versions": [], "done_ns": []}
    due = float(start_ns)
    for n in range(len(plan)):
        due = max(due + interval, float(time.monotonic_ns()))
        if due >= stop_ns:
            break
        await asyncio.sleep(max(0.0, (due - time.monotonic_ns()) / 1e9))
        row = plan[n]
        with factory() as session:
            item = session.get(model, row)
            item.version += 1
            version = item.version
            session.commit()
        await after_commit([key_for(row)])
        done = time.monotonic_ns()
        log["rows"].append(row)
        log["versions"].append(version)
        log["done_ns"].append(done)
    return log


def _plant_stale_read(
    reads: _Reads, writes: dict[str, list[int]], grace_ns: int, stop_ns: int
) -> None:
    """Record a read, begun three graces after a write finished, that returned the version
    before that write: stale by definition."""
    for row, version, done in zip(
        reversed(writes["rows"]),
        reversed(writes["versions"]),
        reversed(writes["done_ns"]),
        strict=True,
    ):
        if done + 3 * grace_ns < stop_ns:
            reads.rows.append(row)
            reads.versions.append(version - 1)
            reads.starts.append(done + 3 * grace_ns)
            return


def _check(spec: _Spec, reads: _Reads, check: Any, notes: list[str]) -> dict[str, Any]:
    """Find this reader's stale reads against the writer's history; summarise them."""
    _, writes, phases, grace_ns = check
    log = WriteLog.from_lists(writes["rows"], writes["versions"], writes["done_ns"])
    if spec.config.plant_stale and spec.role == "reader-0" and writes["rows"]:
        _plant_stale_read(reads, writes, grace_ns, phases[-1][2])
    starts = np.frombuffer(reads.starts, dtype=np.int64)
    measured = starts >= phases[0][1]  # warm-up reads are neither counted nor checked
    starts = starts[measured]
    rows = np.frombuffer(reads.rows, dtype=np.int64)[measured]
    versions = np.frombuffer(reads.versions, dtype=np.int64)[measured]
    report = find_stale(rows, versions, starts, log, grace_ns=grace_ns)
    ages = report.age_ns[report.stale]
    examples = [
        {
            "row": int(r),
            "version": int(v),
            "age_ms": round(int(a) / 1e6, 2),
            "at_s": round((int(t) - phases[0][1]) / 1e9, 3),
        }
        for r, v, a, t in zip(
            rows[report.stale][:5],
            versions[report.stale][:5],
            ages[:5],
            starts[report.stale][:5],
            strict=True,
        )
    ]
    latency = np.frombuffer(reads.latency, dtype=np.int64)
    if len(latency) > 4000:
        latency = latency[:: len(latency) // 4000 + 1]
    return {
        "role": spec.role,
        "reads": len(rows),
        "queries": reads.queries,
        "errors": reads.errors,
        "first_error": reads.first_error,
        "phases": stale_by_phase(report, starts, phases),
        "stale": report.count,
        # Stale by more than 100 ms: not a late message but a missed one (or a stale set).
        "stale_over_100ms": int((ages > 100_000_000).sum()),
        "stale_age_ms": [round(int(a) / 1e6, 3) for a in ages[:: max(1, len(ages) // 500)]],
        "stale_examples": examples,
        "latency_ns": latency.tolist(),
        "notes": notes,
    }


# -- the parent: one contender's run ------------------------------------------------------------


def kill_pubsub(client: redis.Redis, name_prefix: str) -> int:
    """``CLIENT KILL`` every Pub/Sub connection whose client name starts with ``name_prefix``.

    Equivalent to ``CLIENT KILL TYPE pubsub`` on a server of our own, but never touches other
    users' subscribers on a shared one. Returns how many connections were killed.
    """
    killed = 0
    for info in client.client_list(_type="pubsub"):
        if str(info.get("name", "")).startswith(name_prefix):
            with contextlib.suppress(redis.ResponseError):  # already gone
                killed += int(
                    client.execute_command(  # type: ignore[no-untyped-call]
                        "CLIENT", "KILL", "ID", info["id"]
                    )
                )
    return killed


def cleanup_keys(url: str, patterns: list[str]) -> int:
    """Delete this run's keys (SCAN + UNLINK by pattern); never FLUSHDB a shared server."""
    client = redis.Redis.from_url(url, protocol=2)
    deleted = 0
    try:
        for pattern in patterns:
            batch: list[bytes] = []
            for key in client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += int(client.unlink(*batch))
                    batch = []
            if batch:
                deleted += int(client.unlink(*batch))
    finally:
        client.close()
    return deleted


def run_contender(
    name: str,
    cfg: WorkloadConfig,
    redis_url: str,
    pg_url: str,
    *,
    progress: Callable[[str], None] = print,
    run_id: str | None = None,
    cashews_protocol: str | None = None,
    pool: WorkerPool | None = None,
) -> dict[str, Any]:
    """Run the workload for one contender and return every figure (see ``_aggregate``).

    ``pool``: worker processes to run in (reused across calls; replaced if a run fails).
    Without one, a pool is started for this run and closed after it.
    """
    run_id = run_id or uuid.uuid4().hex[:8]
    prefix = f"hibench-{run_id}-{name.replace('_', '')}"
    table = f"hibench_{run_id}_{name}"
    db = cmod.REDIS_DBS[name]
    admin = redis.Redis.from_url(
        cmod.redis_url_for(redis_url, db, f"hibench-{run_id}-admin"), protocol=2
    )
    own_pool = pool is None
    if pool is None:
        pool = WorkerPool(cfg.readers + 1)
    elif not pool.healthy():
        pool.restart()
    if len(pool) != cfg.readers + 1:
        raise ValueError(f"the pool has {len(pool)} workers; this run needs {cfg.readers + 1}")
    create_table(pg_url, table, cfg.rows, cfg.payload_bytes)
    result: dict[str, Any] = {"contender": name, "label": cmod.CONTENDERS[name].label}
    roles = ["writer"] + [f"reader-{i}" for i in range(cfg.readers)]
    pipes = [(role, pipe) for role, (_, pipe) in zip(roles, pool.workers, strict=True)]
    try:
        for n, (role, pipe) in enumerate(pipes):
            query: dict[str, str] = {}
            if name == "cashews" and cashews_protocol:
                query["protocol"] = cashews_protocol
            spec = _Spec(
                contender=name,
                pg_url=pg_url,
                table=table,
                prefix=prefix,
                config=cfg,
                redis_url=cmod.redis_url_for(redis_url, db, f"{prefix}-{role}", **query),
                role=role,
                seed=cfg.seed + 7919 * n,
            )
            pipe.send(("run", spec))
        for role, pipe in pipes:
            _expect(pipe, "ready", cfg.startup_timeout, role)
        start_ns = time.monotonic_ns() + 300_000_000 + int(cfg.warmup * 1e9)
        stop_ns = start_ns + int(cfg.duration * 1e9)
        for _, pipe in pipes:
            pipe.send(("go", start_ns, stop_ns))
        progress(f"{name}: running {cfg.duration:g}s ({cfg.readers} readers, 1 writer)")
        faults = _inject_faults(admin, prefix, cfg, start_ns)
        summaries = {
            role: _expect(pipe, "done", cfg.duration + 60, role)[1] for role, pipe in pipes
        }
        writes = summaries["writer"]["writes"]
        steady_end = start_ns + int(cfg.duration * cfg.steady_fraction * 1e9)
        phases = [("steady", start_ns, steady_end), ("faults", steady_end, stop_ns)]
        grace_ns = int(cfg.grace_ms * 1e6)
        for _, pipe in pipes[1:]:
            pipe.send(("check", writes, phases, grace_ns))
        readers = [_expect(pipe, "result", 120, role)[1] for role, pipe in pipes[1:]]
        result.update(_aggregate(cfg, readers, writes, faults, summaries["writer"]["notes"]))
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        progress(f"{name}: FAILED: {result['error']}")
        # A worker may be stuck mid-run: the next run starts on fresh processes.
        if not own_pool:
            pool.restart()
    finally:
        if own_pool:
            pool.close()
        result["keys_cleaned"] = cleanup_keys(
            cmod.redis_url_for(redis_url, db, f"hibench-{run_id}-cleanup"),
            [f"{prefix}:*", f"hi:{prefix}:*"],
        )
        admin.close()
        with contextlib.suppress(Exception):
            drop_table(pg_url, table)
    return result


def _expect(pipe: Connection, tag: str, timeout: float, role: str) -> Any:
    if not pipe.poll(timeout):
        raise TimeoutError(f"{role}: no {tag!r} within {timeout:g}s")
    message = pipe.recv()
    if message[0] == "error":
        raise RuntimeError(f"{role} failed:\n{message[1]}")
    if message[0] != tag:
        raise RuntimeError(f"{role}: expected {tag!r}, got {message[0]!r}")
    return message


def _inject_faults(
    admin: redis.Redis, prefix: str, cfg: WorkloadConfig, start_ns: int
) -> list[dict[str, Any]]:
    faults = []
    for fraction in cfg.fault_at:
        at_ns = start_ns + int(cfg.duration * fraction * 1e9)
        _sleep_until(at_ns)
        killed = 0
        end_ns = at_ns + int(cfg.fault_hold * 1e9)
        while True:
            killed += kill_pubsub(admin, prefix)
            if time.monotonic_ns() >= end_ns:
                break
            time.sleep(cfg.fault_every)
        faults.append({"at_s": round(fraction * cfg.duration, 2), "connections_killed": killed})
    _sleep_until(start_ns + int(cfg.duration * 1e9))
    return faults


def _aggregate(
    cfg: WorkloadConfig,
    readers: list[dict[str, Any]],
    writes: dict[str, list[int]],
    faults: list[dict[str, Any]],
    writer_notes: list[str],
) -> dict[str, Any]:
    reads = sum(r["reads"] for r in readers)
    phases: dict[str, dict[str, int]] = {}
    for r in readers:
        for phase, counts in r["phases"].items():
            into = phases.setdefault(phase, {"reads": 0, "stale": 0})
            into["reads"] += counts["reads"]
            into["stale"] += counts["stale"]
    phase_seconds = {
        "steady": cfg.duration * cfg.steady_fraction,
        "faults": cfg.duration * (1 - cfg.steady_fraction),
    }
    for phase, counts in phases.items():
        counts["reads_per_s"] = round(counts["reads"] / phase_seconds[phase])
    latency = sorted(x for r in readers for x in r["latency_ns"])
    ages = sorted(a for r in readers for a in r["stale_age_ms"])
    queries = sum(r["queries"] for r in readers)
    return {
        "reads": reads,
        "reads_per_s": round(reads / cfg.duration),
        "queries": queries,
        "queries_per_1k_reads": round(1000 * queries / reads, 2) if reads else None,
        "writes": len(writes["rows"]),
        "writes_per_s": round(len(writes["rows"]) / cfg.duration, 1),
        "stale": sum(r["stale"] for r in readers),
        "stale_over_100ms": sum(r["stale_over_100ms"] for r in readers),
        "phases": phases,
        "stale_age_ms_p50": ages[len(ages) // 2] if ages else None,
        "stale_age_ms_max": ages[-1] if ages else None,
        "stale_examples": [e for r in readers for e in r["stale_examples"]][:5],
        "errors": sum(r["errors"] for r in readers),
        "first_error": next((r["first_error"] for r in readers if r["first_error"]), ""),
        "read_latency_us": _percentiles_us(latency),
        "latency_samples_ns": latency[:: max(1, len(latency) // 5000)],
        "faults": faults,
        "notes": list(dict.fromkeys([*writer_notes, *readers[0]["notes"]])) if readers else [],
        "reader_notes": [r["notes"] for r in readers],
        "config": asdict(cfg),
    }


def _percentiles_us(ordered: list[int]) -> dict[str, float | None]:
    if not ordered:
        return {"p50": None, "p99": None}
    return {
        "p50": round(ordered[len(ordered) // 2] / 1000, 2),
        "p99": round(ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)] / 1000, 2),
    }
