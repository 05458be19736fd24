"""Turn a results dict into ``results.md`` (tables) and PNG plots.

Every figure in the tables carries its ratio to the baseline measured in the same run: absolute
numbers on a shared 2-core machine drift from run to run, ratios measured side by side hold.
This module only formats; it never measures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import contenders as cmod
from .core import markdown as core_markdown

__all__ = ["PLOTS", "markdown", "plots"]

# Every file plots() may write; a run writes those it has data for.
PLOTS = ("latency.png", "throughput_vs_stale.png")

# Which micro-benchmark row stands for each contender in the side-by-side table.
_L1_ROW = {
    "hybridinval": "hybridinval cached(session).get_or_set",
    "hybridinval_core": "hybridinval get_or_set",
    "hand_rolled": "hand-rolled get_or_set",
    "dogpile_memory_redis": "dogpile memory->redis get_or_create",
    "cashews": "cashews get (client-side hit)",
}
_L2_ROW = {
    "hybridinval": "hybridinval get (L1 disabled)",
    "hybridinval_core": "hybridinval get (L1 disabled)",
    "hand_rolled": "redis only get_or_set",  # the same GET + json.loads path
    "redis_only": "redis only get_or_set",
    "dogpile_redis": "dogpile redis region.get",
    "dogpile_memory_redis": "dogpile redis region.get",
    "cashews": "cashews get (redis backend)",
}
_PROP_ROW = {
    "hybridinval": "hybridinval",
    "hybridinval_core": "hybridinval",
    "hand_rolled": "hand_rolled",
    "cashews": "cashews",
}
_MEM_ROW = {
    "hybridinval": "hybridinval MemoryL1",
    "hybridinval_core": "hybridinval MemoryL1",
    "hand_rolled": "cachetools.TTLCache (hand-rolled L1)",
    "dogpile_memory_redis": "dogpile memory backend",
    "cashews": "cashews Memory (client-side local cache)",
}


def _fmt(value: Any, unit: str = "", ratio: Any = None, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    text = f"{value:,.{digits}f}{unit}" if isinstance(value, float) else f"{value:,}{unit}"
    return f"{text} ({ratio}x)" if ratio is not None else text


def _contender_rows(results: dict[str, Any]) -> list[str]:
    micro = results.get("micro", {})
    l1, l2 = micro.get("l1_hit", {}), micro.get("l2_hit", {})
    prop, mem = micro.get("propagation", {}), micro.get("memory", {})
    work = results.get("workload", {}).get("contenders", {})
    redis_only_rate = work.get("redis_only", {}).get("reads_per_s")
    rows = []
    for name, cls in cmod.CONTENDERS.items():
        if name not in work and name not in results.get("contenders_run", []):
            continue
        w = work.get(name, {})
        if not cls.has_l1:
            l1_cell = "no L1"
        elif _L1_ROW.get(name) in l1.get("ns", {}):
            # The ratio to LRUCache.get: a few ns of dict.get left after subtracting the call
            # overhead make ratios to it swing 3-10x between runs (it is in results.json).
            key = _L1_ROW[name]
            l1_cell = _fmt(l1["ns"][key], " ns", l1["ratio_to_lru_get"][key])
        else:
            l1_cell = "n/a"
        if not cls.has_l2:
            l2_cell = "no L2"
        elif _L2_ROW.get(name) in l2.get("us", {}):
            key = _L2_ROW[name]
            l2_cell = _fmt(l2["us"][key], " µs", l2["ratio_to_raw_get"][key], 2)
        else:
            l2_cell = "n/a"
        if cls.cross_process_l1 == "no":
            l1_ttl = results.get("workload", {}).get("config", {}).get("l1_ttl")
            prop_cell = "never (until the L1 TTL" + (f", {l1_ttl} s)" if l1_ttl else ")")
        elif _PROP_ROW.get(name) in prop.get("latency", {}):
            p = prop["latency"][_PROP_ROW[name]]
            prop_cell = (
                f"{_fmt(p['p50_us'], '', p['p50_ratio_to_raw'])} / "
                f"{_fmt(p['p99_us'], '', p['p99_ratio_to_raw'])}"
            )
        else:
            prop_cell = "n/a (no L1)"
        if "error" in w:
            rows.append(
                f"| {cls.label} | {l1_cell} | {l2_cell} | {prop_cell} | "
                f"failed: {w['error'][:120]} | | | |"
            )
            continue
        mem_cell = "no L1"
        if cls.has_l1 and _MEM_ROW.get(name) in mem.get("bytes_per_entry", {}):
            key = _MEM_ROW[name]
            mem_cell = _fmt(mem["bytes_per_entry"][key], " B", mem["ratio_to_dict"][key])
        if w:
            rate = w.get("reads_per_s")
            ratio = round(rate / redis_only_rate, 1) if rate and redis_only_rate else None
            phases = w.get("phases", {})
            rate_cell = _fmt(rate, "", ratio)
            queries_cell = _fmt(w.get("queries_per_1k_reads"))
            stale_cell = (
                f"{_fmt(phases.get('steady', {}).get('stale'))} / "
                f"{_fmt(phases.get('faults', {}).get('stale'))} "
                f"({_fmt(w.get('stale_over_100ms'))})"
            )
        else:  # the workload did not run (no PostgreSQL, or --skip workload)
            rate_cell = queries_cell = stale_cell = "not run"
        rows.append(
            f"| {cls.label} | {l1_cell} | {l2_cell} | {prop_cell} | {rate_cell} | "
            f"{queries_cell} | {stale_cell} | {mem_cell} |"
        )
    csc = results.get("unsupported", {}).get(cmod.REDIS_PY_CSC)
    if csc:
        rows.append(f"| {cmod.REDIS_PY_CSC_LABEL} | not run: {csc} | | | | | | |")
    return rows


def markdown(results: dict[str, Any]) -> str:
    """The whole ``results.md``: core hot paths, the side-by-side table, targets, notes."""
    out: list[str] = [
        f"Run: `{results.get('command', 'python -m benchmarks')}` on "
        f"{results.get('cpus')} CPUs, Python {results.get('python')}, Redis "
        f"{results.get('redis_version')}, PostgreSQL "
        f"{results.get('postgres_version', 'not used')}; {results.get('seconds')} s.",
        "",
    ]
    partial = results.get("partial")
    if partial:
        out += [f"**Partial run** ({'; '.join(partial)}): not comparable to a full run.", ""]
    if "core" in results:
        out += [
            "### Hot paths (hybridinval vs the baseline on the same row)",
            "",
            core_markdown(results["core"]).rstrip(),
            "",
        ]
    micro = results.get("micro", {})
    work = results.get("workload", {})
    if micro or work:
        cfg = work.get("config", {})
        base_l1 = micro.get("l1_hit", {}).get("ns", {})
        base_l2 = micro.get("l2_hit", {}).get("us", {})
        raw_prop = micro.get("propagation", {}).get("latency", {}).get("raw", {})
        out += [
            "### Side by side",
            "",
            f"Baselines from this run: `dict.get` {base_l1.get('dict.get', 'n/a')} ns, "
            f"`cachetools.LRUCache.get` {base_l1.get('cachetools.LRUCache.get', 'n/a')} ns; "
            f"redis-py `GET` + `json.loads` {base_l2.get('redis-py GET + json.loads', 'n/a')} µs; "
            f"raw `PUBLISH` -> subscriber p50/p99 {raw_prop.get('p50_us', 'n/a')} / "
            f"{raw_prop.get('p99_us', 'n/a')} µs; 1 bytes-per-entry baseline = a plain `dict` "
            f"({micro.get('memory', {}).get('bytes_per_entry', {}).get('dict', 'n/a')} B).",
            "",
            (
                f"Workload: {cfg.get('readers', '?')} reader processes + 1 writer on PostgreSQL, "
                f"{cfg.get('rows', '?')} rows, Zipf s={cfg.get('zipf_s', '?')}, writer "
                f"{cfg.get('write_rate', '?')} commits/s, {cfg.get('duration', '?')} s per run x "
                f"{work.get('repeats', '?')} runs per contender (round robin; reads/s is the "
                f"median run, stale reads the sum); pub/sub connections killed at "
                f"{', '.join(f'{x:.0%}' for x in cfg.get('fault_at', ()))} of each run, each "
                f"time for {cfg.get('fault_hold', '?')} s. Stale = returned a version older than "
                f"one committed more than {cfg.get('grace_ms', '?')} ms before the read began."
                if work
                else "Workload: not run (see the notes)."
            ),
            "",
            "| contender | L1 hit (x LRUCache.get) | L2 hit (x raw GET) | propagation p50 / p99 µs "
            "(x raw) | reads/s (x redis only) | DB queries / 1k reads | stale reads: steady / "
            "faults (of which > 100 ms) | bytes per L1 entry (x dict) |",
            "|---|---|---|---|---|---|---|---|",
            *_contender_rows(results),
            "",
        ]
    if work.get("contenders"):
        out += [
            "Per contender (all runs): reads/s in each phase (median run), sampled read "
            "latency, how late the stalest read was, writes committed, and what the "
            "contender reported.",
            "",
            "| contender | reads/s steady / faults | read latency p50 / p99 µs | oldest stale "
            "read (ms after the newer commit) | writes | reported |",
            "|---|---|---|---|---|---|",
        ]
        for name, w in work["contenders"].items():
            if "error" in w:
                continue
            lat = w.get("read_latency_us", {})
            notes = "; ".join(w.get("notes", [])) or ""
            ph = w.get("phases", {})
            rates = (
                f"{ph.get('steady', {}).get('reads_per_s', 0):,.0f} / "
                f"{ph.get('faults', {}).get('reads_per_s', 0):,.0f}"
            )
            out.append(
                f"| {w.get('label', name)} | {rates} | {lat.get('p50')} / "
                f"{lat.get('p99')} | {w.get('stale_age_ms_max') or '-'} | "
                f"{w.get('writes'):,} | {notes} |"
            )
        out.append("")
    commit = results.get("commit")
    if commit:
        med, p90, ratio = commit["median_us"], commit["p90_us"], commit["ratio_to_plain"]
        rows = commit["outbox_rows"]
        out += [
            "### Commit latency (PostgreSQL)",
            "",
            f"`Session.commit()` of a one-row update, {commit['rounds']} commits per side, the "
            "sides rotated in one run on one engine. Installed: one Redis round trip publishes "
            "inside `commit()`. Outbox: also the row's INSERT before the COMMIT (its delete runs "
            "on the relay's thread).",
            "",
            "| side | median µs | p90 µs | x plain |",
            "|---|---|---|---|",
            f"| plain SQLAlchemy | {med['plain']} | {p90['plain']} | 1.0x |",
            f"| installed | {med['installed']} | {p90['installed']} | {ratio['installed']}x |",
            f"| installed, `outbox=True` | {med['outbox']} | {p90['outbox']} | "
            f"{ratio['outbox']}x ({commit['outbox_to_installed']}x installed) |",
            "",
            f"Outbox rows written {rows['written']:,}, deleted by their writer "
            f"{rows['deleted']:,}, republished by a relay {rows['republished']:,}.",
            "",
        ]
    asyncio_results = results.get("asyncio")
    if asyncio_results:
        from .asyncio_paths import markdown as asyncio_markdown

        busy = asyncio_results["busy_loop"]
        out += [
            "### asyncio paths",
            "",
            "`AsyncHybridCache` in one event loop, every statement timed in turn each round "
            "(medians). Eviction: another process invalidates a key while this loop awaits "
            f"(idle) or spins in a CPU-bound handler that never yields (busy), {busy['windows']} "
            "times each; from the sender's call to the subscriber thread's eviction.",
            "",
            asyncio_markdown(asyncio_results),
        ]
    targets = results.get("targets")
    if targets:
        out += ["### hybridinval targets", "", "| target | measured | met |", "|---|---|---|"]
        out += [
            f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |"
            for t in targets
        ]
        out.append("")
    notes = results.get("notes", [])
    if notes:
        out += ["### Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(out)


def plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """``latency.png`` (read and propagation latency CDFs) and ``throughput_vs_stale.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written: list[Path] = []
    work = results.get("workload", {}).get("contenders", {})
    prop = results.get("micro", {}).get("propagation", {})
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for name, w in work.items():
        samples = w.get("latency_samples_ns") or []
        if samples:
            xs = np.sort(np.asarray(samples, dtype=float) / 1000)
            left.plot(xs, np.linspace(0, 1, len(xs)), label=cmod.CONTENDERS[name].label)
    left.set(
        xscale="log",
        xlabel="read latency in the workload (µs, log)",
        ylabel="fraction of reads",
        title="Read latency under load (sampled)",
    )
    for name, samples in prop.get("samples_us", {}).items():
        if samples:
            xs = np.sort(np.asarray(samples, dtype=float))
            right.plot(xs, np.linspace(0, 1, len(xs)), label=prop["latency"][name]["label"])
    right.set(
        xscale="log",
        xlabel="commit-side call -> evicted in another process (µs, log)",
        ylabel="fraction of messages",
        title="Propagation latency",
    )
    for axes, part in ((left, "workload"), (right, "micro")):
        axes.grid(True, which="both", alpha=0.3)
        if axes.lines:
            axes.legend(fontsize=7)
        else:
            axes.text(0.5, 0.5, f"{part} not run", ha="center", transform=axes.transAxes)
    fig.tight_layout()
    path = out_dir / "latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    if not any("reads_per_s" in w for w in work.values()):
        return written  # no workload figures to plot
    fig, ax = plt.subplots(figsize=(10, 6))
    for n, (name, w) in enumerate(work.items()):
        if "reads_per_s" not in w:
            continue
        color = f"C{n}"
        x = w["reads_per_s"]
        ax.scatter(x, w["stale"] + 1, s=70, color=color, label=cmod.CONTENDERS[name].label)
        ax.scatter(
            x, w["stale_over_100ms"] + 1, s=70, facecolors="none", edgecolors=color, marker="s"
        )
        ax.annotate(
            name, (x, w["stale"] + 1), fontsize=8, xytext=(6, 4), textcoords="offset points"
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="reads/s across the reader processes (log)",
        ylabel="stale reads + 1 (log)",
        title="Throughput vs stale reads (filled: stale > grace; open squares: > 100 ms)",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = out_dir / "throughput_vs_stale.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
