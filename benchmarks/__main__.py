"""Run every benchmark and write benchmarks/results/ (results.md, results.json, *.png).

Five parts, in this order:

1. core: hybridinval's hot paths against raw baselines (:mod:`benchmarks.core`);
2. micro: the same hot paths for every contender, side by side (:mod:`benchmarks.micro`);
3. workload: staleness and throughput under load with faults, one contender at a time, the
   contenders taken round robin ``--repeats`` times (:mod:`benchmarks.workload`);
4. commit: ``Session.commit()`` on PostgreSQL without the library, installed, and installed
   with the outbox, rotated in one run (:mod:`benchmarks.commit_overhead`);
5. asyncio: ``AsyncHybridCache``'s hot paths against a bare coroutine, cashews and
   ``redis.asyncio``, and eviction behind a busy event loop (:mod:`benchmarks.asyncio_paths`).

Redis: ``--redis-url``, else $HYBRIDINVAL_REDIS_URL, else 127.0.0.1:6379, else an embedded one.
PostgreSQL: ``--postgres-url``, else $HYBRIDINVAL_POSTGRES_URL, else the local test database;
without one the workload is skipped and the results say so.

Only a full run (every part, every contender, not ``--quick``) writes to ``--out``: a partial one
writes to ``--out``/partial/ (not committed), so the committed results always come from one
full run. Nothing is written until every file has been rendered.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import redis

from . import contenders as cmod
from . import core

RESULTS = Path(__file__).parent / "results"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PARTS = ("core", "micro", "workload", "commit", "asyncio")
PARTIAL = "partial"  # the subfolder of --out that a partial run writes to


def _redis_url(explicit: str | None) -> tuple[str, object | None]:
    url = explicit or os.environ.get("HYBRIDINVAL_REDIS_URL")
    if url:
        return url, None
    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=0.5).ping()
        return "redis://127.0.0.1:6379/0", None
    except redis.RedisError:
        from hybridinval._embedded import EmbeddedRedis

        server = EmbeddedRedis.start()
        return server.url, server


def _postgres(explicit: str | None) -> tuple[str | None, str]:
    """(URL, server version) or (None, why not)."""
    url = explicit or os.environ.get("HYBRIDINVAL_POSTGRES_URL") or DEFAULT_POSTGRES_URL
    try:
        from sqlalchemy import create_engine, text

        engine = create_engine(url, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                version = str(conn.execute(text("show server_version")).scalar())
        finally:
            engine.dispose()
    except Exception as exc:
        first_line = next(iter(str(exc).splitlines()), "")  # not the driver's hints
        return None, f"PostgreSQL unavailable at {url}: {type(exc).__name__}: {first_line}"
    return url, version


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (~1.5 min): short phases, one run per contender",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="only re-render results.md and the plots from a results.json",
    )
    parser.add_argument("--redis-url")
    parser.add_argument("--postgres-url")
    parser.add_argument("--skip", default="", help="comma list of parts: " + ",".join(PARTS))
    parser.add_argument(
        "--contenders",
        default=",".join(cmod.CONTENDERS),
        help="comma list, default all: " + ",".join(cmod.CONTENDERS),
    )
    parser.add_argument("--duration", type=float, help="seconds per workload run (default 6)")
    parser.add_argument("--warmup", type=float, help="seconds of cache filling before each run")
    parser.add_argument("--repeats", type=int, help="workload runs per contender (default 3)")
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--write-rate", type=float, default=100.0, help="commits per second")
    parser.add_argument(
        "--fault-hold",
        type=float,
        help="seconds each fault keeps killing pub/sub connections (0: once)",
    )
    parser.add_argument(
        "--pause-ms",
        type=float,
        default=0.0,
        help="ms each reader sleeps after each unit of work (default 0: CPU-bound readers)",
    )
    parser.add_argument("--grace-ms", type=float, default=10.0)
    parser.add_argument("--l1-ttl", type=float, default=60.0)
    parser.add_argument(
        "--switch-interval",
        type=float,
        help="sys.setswitchinterval() in workload processes (diagnostic)",
    )
    parser.add_argument(
        "--l1-lease-ms",
        type=float,
        help="hybridinval's l1_lease in the workload, 0 = off (diagnostic; default: the library's)",
    )
    return parser.parse_args(argv)


def workload_config(args: argparse.Namespace) -> Any:
    from .workload import WorkloadConfig

    quick = args.quick
    return WorkloadConfig(
        rows=args.rows,
        readers=args.readers,
        duration=args.duration or (3.0 if quick else 6.0),
        warmup=args.warmup if args.warmup is not None else 0.5,
        write_rate=args.write_rate,
        grace_ms=args.grace_ms,
        pause_per_session=args.pause_ms / 1000,
        l1_ttl=args.l1_ttl,
        fault_at=(0.5, 0.75) if quick else (0.45, 0.6, 0.75, 0.9),
        fault_hold=args.fault_hold if args.fault_hold is not None else (0.1 if quick else 0.3),
        switch_interval=args.switch_interval,
        l1_lease_ms=args.l1_lease_ms,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        _write(args.out, json.loads(args.render.read_text()), print, rewrite_json=False)
        return 0
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in names if n not in cmod.CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contender(s) {unknown}; choose from {list(cmod.CONTENDERS)}")
    left_out = [n for n in cmod.CONTENDERS if n not in names]
    if "hybridinval_core" in names and not cmod.sqlalchemy_integration_available():
        names.remove("hybridinval_core")  # it would be the same as the hybridinval row
    url, server = _redis_url(args.redis_url)
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)

    probe = redis.Redis.from_url(url, protocol=2)
    redis_version = str(probe.info("server")["redis_version"])
    probe.close()
    results: dict[str, Any] = {
        "command": "python -m benchmarks" + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
        "python": sys.version.split()[0],
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "redis_url": url,
        "redis_version": redis_version,
        "versions": cmod.pinned_versions(),
        "contenders_run": names,
        "notes": [],
    }
    progress(f"hybridinval benchmarks against Redis {redis_version} at {url}")
    try:
        _run_parts(args, url, names, skip, results, progress)
    finally:
        if server is not None:
            server.stop()  # type: ignore[attr-defined]
    results["seconds"] = round(time.monotonic() - started, 1)
    results["targets"] = targets(results)
    partial = [f"no {part} part" for part in PARTS if part not in results]
    if left_out:
        partial.append(f"contenders left out: {', '.join(left_out)}")
    if args.quick:
        partial.append("--quick")
    if partial:
        results["partial"] = partial
    _write(args.out, results, progress)
    return 0


def _run_parts(
    args: argparse.Namespace,
    url: str,
    names: list[str],
    skip: set[str],
    results: dict[str, Any],
    progress: Callable[[str], None],
) -> None:
    from . import micro

    quick = args.quick
    # Probes: contenders that cannot run here, or only with a workaround, say so in the table.
    csc = cmod.redis_py_csc_unsupported(url)
    if csc:
        results["unsupported"] = {cmod.REDIS_PY_CSC: csc}
        progress(f"redis-py client-side cache: not run: {csc}")
    cashews_query: dict[str, str] = {}
    if "cashews" in names:
        cashews_query = _cashews_probe(url, results, progress)

    if "core" not in skip:
        progress("core: hybridinval hot paths vs raw baselines")
        results["core"] = core.run_all(
            url, progress=lambda s: progress(f"  core: {s}"), quick=quick
        )
    if "micro" not in skip:
        scale = 0.3 if quick else 1.0
        progress("micro: L1 hit of every contender")
        results["micro"] = {"l1_hit": micro.bench_l1_hits(url, rounds=max(5, int(25 * scale)))}
        progress("micro: L2 hit of every contender")
        results["micro"]["l2_hit"] = micro.bench_l2_hits(url, rounds=max(5, int(31 * scale)))
        progress("micro: propagation (one receiver process per contender)")
        results["micro"]["propagation"] = micro.bench_propagation_all(
            url, messages=int(300 * scale), cashews_query=cashews_query
        )
        progress("micro: bytes per L1 entry")
        results["micro"]["memory"] = micro.bench_memory()
        micro.cleanup()
    if "workload" not in skip:
        pg_url, pg_info = _postgres(args.postgres_url)
        if pg_url is None:
            results["notes"].append(f"workload skipped: {pg_info}")
            progress(f"workload skipped: {pg_info}")
        else:
            results["postgres_version"] = pg_info
            results["workload"] = run_workload(args, url, pg_url, names, cashews_query, progress)
    if "commit" not in skip:
        pg_url, pg_info = _postgres(args.postgres_url)
        if pg_url is None:
            results["notes"].append(f"commit latency skipped: {pg_info}")
            progress(f"commit latency skipped: {pg_info}")
        else:
            from . import commit_overhead

            progress("commit: Session.commit() plain / installed / with the outbox")
            results["commit"] = commit_overhead.measure(pg_url, url, rounds=150 if quick else 600)
    if "asyncio" not in skip:
        from . import asyncio_paths

        results["asyncio"] = asyncio_paths.measure(
            url, progress=lambda s: progress(f"  {s}"), quick=quick
        )


def _cashews_probe(
    url: str, results: dict[str, Any], progress: Callable[[str], None]
) -> dict[str, str]:
    """Does cashews' client-side invalidation work with this redis-py? If not, try RESP2."""
    import asyncio

    db = cmod.REDIS_DBS["cashews"]
    prefix = f"hibench-{uuid.uuid4().hex[:8]}-cashewsprobe"
    default_ok = asyncio.run(
        cmod.cashews_invalidation_reaches_peers(cmod.redis_url_for(url, db, prefix), prefix)
    )
    if default_ok:
        return {}
    resp2_ok = asyncio.run(
        cmod.cashews_invalidation_reaches_peers(
            cmod.redis_url_for(url, db, prefix, protocol="2"), prefix
        )
    )
    note = (
        f"cashews {results['versions'].get('cashews')} with redis-py "
        f"{results['versions'].get('redis')}: with redis-py's default protocol (RESP3) a "
        f"delete in one process never evicts another process's client-side copy (probe: "
        f"still cached 0.5 s later); "
    )
    if resp2_ok:
        note += "the workload runs it with `?protocol=2` in the URL, where invalidation works."
        query = {"protocol": "2"}
    else:
        note += "with protocol=2 it does not work either; it runs as configured."
        query = {}
    results["notes"].append(note)
    progress(note)
    return query


def run_workload(
    args: argparse.Namespace,
    redis_url: str,
    pg_url: str,
    names: list[str],
    cashews_query: dict[str, str],
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Every contender ``repeats`` times, round robin, in one pool of worker processes."""
    from .workload import WorkerPool, run_contender

    cfg = workload_config(args)
    repeats = args.repeats or (1 if args.quick else 3)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    run_id = uuid.uuid4().hex[:8]
    progress(
        f"workload: {len(names)} contenders x {repeats} run(s) of {cfg.duration:g}s "
        f"(+{cfg.warmup:g}s warm-up)"
    )
    with WorkerPool(cfg.readers + 1) as pool:
        for rep in range(repeats):
            for name in names:
                result = run_contender(
                    name,
                    cfg,
                    redis_url,
                    pg_url,
                    run_id=f"{run_id}{rep}",
                    cashews_protocol=cashews_query.get("protocol"),
                    pool=pool,
                    progress=lambda s: progress(f"  workload: {s}"),
                )
                runs[name].append(result)
                if "error" not in result:
                    progress(
                        f"  workload: {name} run {rep + 1}/{repeats}: "
                        f"{result['reads_per_s']:,} reads/s, {result['stale']:,} stale "
                        f"(steady {result['phases']['steady']['stale']:,}, faults "
                        f"{result['phases']['faults']['stale']:,})"
                    )
    return {
        "config": asdict(cfg),
        "repeats": repeats,
        "contenders": {name: combine_runs(rs) for name, rs in runs.items()},
    }


def combine_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median throughput over runs; stale reads, queries and reads summed (every one counts)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0].get("error", "no run"), "runs": runs}
    phases: dict[str, dict[str, Any]] = {}
    for phase in ok[0]["phases"]:
        phases[phase] = {
            "reads": sum(r["phases"][phase]["reads"] for r in ok),
            "stale": sum(r["phases"][phase]["stale"] for r in ok),
            "reads_per_s": statistics.median(r["phases"][phase]["reads_per_s"] for r in ok),
        }
    reads = sum(r["reads"] for r in ok)
    queries = sum(r["queries"] for r in ok)
    samples = sorted(x for r in ok for x in r["latency_samples_ns"])
    ages_max = [r["stale_age_ms_max"] for r in ok if r["stale_age_ms_max"] is not None]
    combined: dict[str, Any] = {
        "label": ok[0]["label"],
        "reads_per_s": round(statistics.median(r["reads_per_s"] for r in ok)),
        "reads_per_s_runs": [r["reads_per_s"] for r in ok],
        "reads": reads,
        "queries": queries,
        "queries_per_1k_reads": round(1000 * queries / reads, 2) if reads else None,
        "writes": sum(r["writes"] for r in ok),
        "stale": sum(r["stale"] for r in ok),
        "stale_over_100ms": sum(r["stale_over_100ms"] for r in ok),
        "stale_age_ms_max": max(ages_max) if ages_max else None,
        "stale_examples": [e for r in ok for e in r["stale_examples"]][:5],
        "phases": phases,
        "errors": sum(r["errors"] for r in ok),
        "first_error": next((r["first_error"] for r in ok if r["first_error"]), ""),
        "read_latency_us": {
            "p50": round(samples[len(samples) // 2] / 1000, 2) if samples else None,
            "p99": round(samples[len(samples) * 99 // 100] / 1000, 2) if samples else None,
        },
        "latency_samples_ns": samples[:: max(1, len(samples) // 5000)],
        "faults": [f for r in ok for f in r["faults"]],
        "notes": ok[-1]["notes"],
        "runs": [
            {k: v for k, v in r.items() if k not in ("latency_samples_ns", "config")} for r in runs
        ],
    }
    if len(ok) < len(runs):
        combined["failed_runs"] = [r["error"] for r in runs if "error" in r]
    return combined


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """hybridinval's targets on this workload, each with the figure that decides it."""
    out: list[dict[str, Any]] = []

    def add(target: str, measured: str, met: bool) -> None:
        out.append({"target": target, "measured": measured, "met": bool(met)})

    c = results.get("core")
    if c:
        l1, l2, prop = c["l1_hit"], c["l2_hit"], c["propagation"]
        add("L1 hit < 6x dict.get", f"{l1['ratio_to_dict_get']}x", l1["ratio_to_dict_get"] < 6)
        add(
            "L1 hit <= cachetools.LRUCache.get",
            f"{l1['ratio_to_lru_get']}x",
            l1["ratio_to_lru_get"] <= 1,
        )
        add("L2 hit <= 1.2x raw GET", f"{l2['ratio_to_raw_get']}x", l2["ratio_to_raw_get"] <= 1.2)
        ours = prop["latency"]["hybridinval invalidate -> eviction"]
        add(
            "propagation p50 <= 1.5x raw PUBLISH",
            f"{prop['p50_ratio_to_raw']}x",
            prop["p50_ratio_to_raw"] <= 1.5,
        )
        add("propagation p99 < 2 ms", f"{ours['p99_us']} µs", ours["p99_us"] < 2000)
    a = results.get("asyncio")
    if a:
        l1, l2 = a["l1_hit"], a["l2_hit"]
        add(
            "asyncio: await get, L1 hit <= 2x a bare async def",
            f"{l1['ratio_to_bare_coroutine']}x",
            l1["ratio_to_bare_coroutine"] <= 2,
        )
        add(
            "asyncio: await get, L1 hit <= 0.15x cashews' client-side hit",
            f"{l1['ratio_to_cashews']}x",
            l1["ratio_to_cashews"] <= 0.15,
        )
        add(
            "asyncio: get_local as fast as the blocking L1 hit (<= 1.1x)",
            f"{l1['get_local_ratio_to_sync_get']}x",
            l1["get_local_ratio_to_sync_get"] <= 1.1,
        )
        add(
            "asyncio: L2 hit <= 1.2x redis.asyncio GET",
            f"{l2['ratio_to_raw_get']}x",
            l2["ratio_to_raw_get"] <= 1.2,
        )
    work = results.get("workload", {}).get("contenders", {})
    base = work.get("redis_only", {}).get("reads_per_s")
    hand = work.get("hand_rolled", {}).get("reads_per_s")
    for name in ("hybridinval", "hybridinval_core", "hybridinval_async"):
        w = work.get(name)
        if not w or "error" in w:
            continue
        label = cmod.CONTENDERS[name].label
        phases = w["phases"]
        add(
            f"{label}: zero stale reads in every phase",
            ", ".join(f"{p}: {v['stale']}" for p, v in phases.items()),
            all(v["stale"] == 0 for v in phases.values()),
        )
        if base:
            add(
                f"{label}: reads/s >= 20x redis only",
                f"{w['reads_per_s']:,} = {w['reads_per_s'] / base:.1f}x",
                w["reads_per_s"] >= 20 * base,
            )
        if hand:
            add(
                f"{label}: reads/s >= hand-rolled",
                f"{w['reads_per_s']:,} = {w['reads_per_s'] / hand:.2f}x",
                w["reads_per_s"] >= hand,
            )
    return out


def _write(
    out: Path,
    results: dict[str, Any],
    progress: Callable[[str], None],
    *,
    rewrite_json: bool = True,
) -> None:
    """Render every file, then move them into ``out`` (``out``/partial/ for a partial run).

    A failure while rendering leaves ``out`` as it was. Plots this run has no data for are
    removed, so that the folder never mixes two runs.
    """
    from .report import PLOTS, markdown, plots

    if results.get("partial"):
        progress(
            f"partial run ({'; '.join(results['partial'])}): writing {out / PARTIAL}/, "
            f"{out}/ keeps the last full run"
        )
        out = out / PARTIAL
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, suffix=".tmp"))  # same filesystem: renames
    try:
        table = markdown(results)
        (staging / "results.md").write_text(table)
        if rewrite_json:
            (staging / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        if results.get("workload") or results.get("micro"):
            plots(results, staging)
        written = sorted(p.name for p in staging.iterdir())
        for name in PLOTS:
            if name not in written:
                (out / name).unlink(missing_ok=True)
        for name in written:
            (staging / name).replace(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(table, flush=True)
    progress("wrote " + ", ".join(str(out / name) for name in written))


if __name__ == "__main__":
    raise SystemExit(main())
