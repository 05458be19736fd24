"""The outcome of a run, the table the demo prints, and the printing."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import IO, Any

from .history import History
from .processes import Processes

__all__ = ["Outcome", "Output", "format_table", "outcome"]


class Output:
    """The demo's terminal, whose failures never fail the demo: after SIGHUP the terminal is
    gone (writes fail with EIO), and a pipe whose reader quit is broken; the demo must still
    clean up, and the interpreter must not fail flushing at exit."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lost = False

    def isatty(self) -> bool:
        with contextlib.suppress(OSError, ValueError):
            return not self.lost and self.stream.isatty()
        return False

    def __call__(self, text: str = "", end: str = "\n") -> None:
        if self.lost:
            return
        try:
            self.stream.write(text + end)
            self.stream.flush()
        except (OSError, ValueError):
            self.lost = True
            with contextlib.suppress(OSError, ValueError):  # what is still buffered goes nowhere
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.stream.fileno())
                os.close(devnull)


@dataclass
class Outcome:
    rows: list[dict[str, Any]]
    reads: int
    writes: int
    stale: int
    missing: list[str]
    errors: list[str]
    pids: list[int]
    leftovers: list[int]
    examples: list[str]

    @property
    def ok(self) -> bool:
        return (
            not self.stale
            and not self.missing
            and not self.errors
            and self.reads > 0
            and self.writes > 0
            and not self.leftovers
        )


def outcome(
    args: argparse.Namespace,
    history: History,
    stats: dict[str, dict[str, Any]],
    processes: Processes,
) -> Outcome:
    stale = history.stale(int(args.delta_ms * 1e6))
    stale_by: dict[str, int] = defaultdict(int)
    for read, _ in stale:
        stale_by[read.process] += 1
    reads_by: dict[str, int] = defaultdict(int)
    for read in history.reads:
        reads_by[read.process] += 1
    rows = []
    order = {"web": 0, "api": 1}
    for name in sorted(stats, key=lambda n: (order.get(n.split(":")[0], 2), n)):
        row = dict(stats[name])
        row["process"] = name
        row["stale"] = stale_by.get(name, 0)
        rows.append(row)
    # Every process that served a read must have reported; and the deployment's shape.
    missing = sorted(set(reads_by) - set(stats))
    roles = [n.split(":")[0] for n in stats]
    if roles.count("web") < args.web:
        missing.append(f"{args.web - roles.count('web')} web process(es)")
    if roles.count("api") < args.api:
        missing.append(f"{args.api - roles.count('api')} asyncio API process(es)")
    if roles.count("task") < 1:
        missing.append("every Celery child")
    examples = [
        f"{r.process} read user {r.user_id} v{r.version} < v{need}" for r, need in stale[:5]
    ]
    pids = sorted({pid for s in processes.started for pid in s.seen_pids})
    return Outcome(
        rows,
        len(history.reads),
        history.writes,
        len(stale),
        missing,
        list(history.errors),
        pids,
        processes.leftovers(),
        examples,
    )


def format_table(outcome: Outcome, args: argparse.Namespace) -> str:
    """The table (a row per process) and the verdict."""
    lines: list[str] = []
    header = (
        f"{'process':<14} {'reads':>8} {'L1 hit':>7} {'inval rx':>9} {'lag p50':>9} "
        f"{'lag p99':>9} {'stale':>6}"
    )
    lines.append("")
    lines.append(header)
    lines.append("-" * len(header))
    for row in outcome.rows:
        ratio = row.get("l1_hit_ratio")
        lines.append(
            f"{row['process']:<14} {row['reads']:>8} "
            f"{'-' if ratio is None else f'{ratio:.1%}':>7} "
            f"{row['invalidations_received']:>9} {_us(row.get('lag_p50_us')):>9} "
            f"{_us(row.get('lag_p99_us')):>9} {row['stale']:>6}"
        )
    lines.append("-" * len(header))
    blank = f"{'':>7} {'':>9} {'':>9} {'':>9}"
    lines.append(f"{'checked':<14} {outcome.reads:>8} {blank} {outcome.stale:>6}")
    lines.append(
        "(a process's reads include its own, e.g. refresh_card's; 'checked' are the reads "
        "the driver made and checked)"
    )
    lines.append(
        f"\ncommitted updates: {outcome.writes}; δ = {args.delta_ms:g} ms; "
        f"stale reads: {outcome.stale}"
    )
    for example in outcome.examples:
        lines.append(f"  stale: {example}")
    for name in outcome.missing:
        lines.append(f"  no stats from {name}")
    for error in outcome.errors:
        lines.append(f"  driver error: {error}")
    if outcome.leftovers:
        lines.append(f"  processes still running: {outcome.leftovers}")
    lines.append("OK" if outcome.ok else "FAILED")
    return "\n".join(lines)


def _us(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f}ms"
