"""The chaos suite's analysis on constructed histories: which commits count, from when, and
which stale reads a fault's documented bound allows. (The suite itself, ``make chaos``, runs
for minutes against real processes and servers; a checker that cannot tell a planted stale
read from an allowed one would make its figures meaningless.)"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the benchmarks package

from benchmarks.chaos import ChaosConfig, analyse

MS = 1_000_000


def reads(path: Path, reads: list[tuple[int, int, int]], lost: int = 0) -> str:
    rows, versions, starts = (np.asarray(x, dtype=np.int64) for x in zip(*reads, strict=True))
    np.savez(
        path,
        rows=rows,
        versions=versions,
        starts=starts,
        flushes=np.asarray([(0, 0), (10**12, 2)], dtype=np.int64),
        lost=np.asarray([(1, 1, 2)] * lost, dtype=np.int64).reshape(-1, 3),
    )
    return str(path)


def test_a_death_after_commit_is_allowed_its_bound_and_no_more(tmp_path: Path) -> None:
    cfg = ChaosConfig(delta_ms=10, outbox_grace=1.0, outbox_interval=0.5)
    log = tmp_path / "writes.log"
    # Row 1: v2 committed, then its writer died (K) before publishing: it counts from the death.
    # Row 2: the writer died before COMMIT (K), and the next writer wrote v2 again and committed.
    log.write_text(
        f"S 1 2 {100 * MS}\nK 1 2 {101 * MS}\n"
        f"S 2 2 {200 * MS}\nK 2 2 {201 * MS}\nS 2 2 {3000 * MS}\nD 2 2 {3001 * MS}\n"
    )
    out = reads(
        tmp_path / "r.npz",
        [
            (1, 1, 1000 * MS),  # 899 ms after the death: inside the crash bound
            (1, 1, 1700 * MS),  # 1,599 ms after: past it
            (2, 1, 2000 * MS),  # v2 of row 2 was not committed yet: fresh
            (2, 1, 3020 * MS),  # 19 ms after v2 committed (and returned): stale past δ
        ],
    )
    report = analyse(cfg, [out], str(log), {1: 2, 2: 2}, [("writer SIGKILL", 100 * MS)], 4000 * MS)
    kill = report["faults"]["writer SIGKILL"]
    assert kill["stale_past_delta"] == 2
    assert kill["oldest_stale_in_bound_ms"] == 899.0
    assert report["writer_deaths"] == 2 and report["deaths_after_commit"] == 1


def test_an_unknown_outcome_counts_only_if_it_committed(tmp_path: Path) -> None:
    cfg = ChaosConfig()
    log = tmp_path / "writes.log"
    # A terminated COMMIT (U) of row 1 v2 that did not commit: the retry wrote v2 again.
    log.write_text(f"S 1 2 {100 * MS}\nU 1 2 {101 * MS}\nS 1 2 {500 * MS}\nD 1 2 {501 * MS}\n")
    out = reads(tmp_path / "r.npz", [(1, 1, 300 * MS), (1, 2, 600 * MS)], lost=1)
    report = analyse(cfg, [out], str(log), {1: 2}, [("PG terminate", 100 * MS)], 700 * MS)
    assert report["faults"]["PG terminate"]["stale_past_delta"] == 0
    assert report["unknown_outcomes"] == 1
    assert report["lost_invalidations"] == 1
    # (row 1, seen 1, database 2): v2 was made by the commit after the fault
    assert report["faults"]["PG terminate"]["lost"] == 1
    assert report["faults"]["PG terminate"]["flushes"] == 2


def test_a_half_open_link_is_allowed_its_detection_bound(tmp_path: Path) -> None:
    cfg = ChaosConfig(delta_ms=10)
    log = tmp_path / "writes.log"
    log.write_text(f"S 1 2 {100 * MS}\nD 1 2 {101 * MS}\n")
    out = reads(
        tmp_path / "r.npz",
        [(1, 1, 600 * MS), (1, 1, 1200 * MS)],  # 500 ms and 1,100 ms after the fault
    )
    report = analyse(cfg, [out], str(log), {1: 2}, [("half-open link", 100 * MS)], 2000 * MS)
    half_open = report["faults"]["half-open link"]
    assert half_open["stale_past_delta"] == 1  # the detection bound is 1,010 ms
    assert half_open["recovery_ms"] == 1100.0
