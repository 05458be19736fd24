"""The benchmark harness can see staleness, and hybridinval shows none.

Two layers:

* the checker (:mod:`benchmarks.staleness`) on constructed histories: it must flag a planted
  stale read and nothing else, at the grace boundary exactly;
* the ``--quick`` staleness harness on PostgreSQL for a few seconds, subscriber connections
  killed mid-run: the hand-rolled contender's run carries one planted stale read that must come
  out in the totals (its organic stale reads are counted but luck decides how many), and
  hybridinval must report zero.

The harness runs with 2 readers instead of 4, for a few seconds. The hand-rolled run's readers
pause 1 ms after every 100 reads (a web worker between requests); hybridinval's readers do not
pause at all: CPU-bound readers are the case where a subscriber thread waits longest for the
scheduler and the GIL, and the L1 lease must still keep every read within the grace.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the benchmarks package

from benchmarks.__main__ import parse_args, workload_config
from benchmarks.staleness import WriteLog, find_stale, stale_by_phase
from benchmarks.workload import WorkerPool, WorkloadConfig, run_contender

pytestmark = pytest.mark.slow  # the benchmark harness

MS = 1_000_000


def reads(*records: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, versions, starts = zip(*records, strict=True)
    return (
        np.array(rows, dtype=np.int64),
        np.array(versions, dtype=np.int64),
        np.array(starts, dtype=np.int64),
    )


# -- the checker on constructed histories --------------------------------------------------------


def test_a_read_after_the_grace_that_returns_the_old_version_is_stale() -> None:
    # Row 1 went to version 2 at t=100 ms.
    writes = WriteLog.from_lists([1], [2], [100 * MS])
    report = find_stale(*reads((1, 1, 111 * MS), (1, 2, 111 * MS), (1, 1, 109 * MS)), writes)
    # Old version 11 ms after the commit: stale. New version: fresh. Old version 9 ms after:
    # within the delivery grace, not counted.
    assert report.stale.tolist() == [True, False, False]
    assert report.count == 1
    assert report.age_ns[0] == 11 * MS


def test_the_grace_boundary_is_strict() -> None:
    writes = WriteLog.from_lists([1], [2], [100 * MS])
    exactly = find_stale(*reads((1, 1, 110 * MS)), writes, grace_ns=10 * MS)
    just_after = find_stale(*reads((1, 1, 110 * MS + 2)), writes, grace_ns=10 * MS)
    assert exactly.count == 0  # committed exactly grace before: not "more than"
    assert just_after.count == 1


def test_rows_do_not_interfere_and_unwritten_rows_are_never_stale() -> None:
    writes = WriteLog.from_lists([1, 2, 1], [2, 2, 3], [100 * MS, 200 * MS, 300 * MS])
    report = find_stale(
        *reads(
            (2, 1, 150 * MS),  # row 2 not yet written then: version 1 is right
            (1, 2, 250 * MS),  # row 1 at version 2 is right until 300 ms (+ grace)
            (1, 2, 400 * MS),  # ...and stale after: version 3 committed at 300 ms
            (3, 1, 900 * MS),  # row 3 never written
            (2, 1, 900 * MS),  # row 2 version 2 committed at 200 ms: stale
        ),
        writes,
    )
    assert report.stale.tolist() == [False, False, True, False, True]
    assert report.age_ns[2] == 100 * MS  # since version 3, the first newer than 2
    assert report.age_ns[4] == 700 * MS


def test_the_age_counts_from_the_first_newer_version() -> None:
    writes = WriteLog.from_lists([5, 5, 5], [2, 3, 4], [10 * MS, 20 * MS, 30 * MS])
    report = find_stale(*reads((5, 1, 100 * MS), (5, 3, 100 * MS)), writes)
    assert report.stale.tolist() == [True, True]
    assert report.age_ns.tolist() == [90 * MS, 70 * MS]


def test_write_log_order_does_not_matter() -> None:
    ordered = WriteLog.from_lists([1, 2, 1], [2, 2, 3], [10 * MS, 20 * MS, 30 * MS])
    shuffled = WriteLog.from_lists([1, 1, 2], [3, 2, 2], [30 * MS, 10 * MS, 20 * MS])
    batch = reads((1, 2, 50 * MS), (1, 1, 25 * MS), (2, 1, 35 * MS), (2, 2, 35 * MS))
    assert (find_stale(*batch, ordered).stale == find_stale(*batch, shuffled).stale).all()
    assert find_stale(*batch, ordered).stale.tolist() == [True, True, True, False]


def test_no_writes_means_no_stale_reads_and_phases_split_by_start_time() -> None:
    empty = WriteLog.from_lists([], [], [])
    batch = reads((1, 1, 5), (2, 1, 15))
    assert find_stale(*batch, empty).count == 0
    writes = WriteLog.from_lists([1, 2], [2, 2], [0, 0])
    report = find_stale(*reads((1, 1, 20 * MS), (2, 1, 40 * MS)), writes)
    phases = stale_by_phase(
        report,
        np.array([20 * MS, 40 * MS], dtype=np.int64),
        [("steady", 0, 30 * MS), ("faults", 30 * MS, 60 * MS)],
    )
    assert phases == {"steady": {"reads": 1, "stale": 1}, "faults": {"reads": 1, "stale": 1}}


# -- the harness on PostgreSQL --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    with WorkerPool(3) as workers:  # 1 writer + 2 readers, shared by both runs
        yield workers


def quick_config(*, plant_stale: bool = False, pause: float = 0.001) -> WorkloadConfig:
    config: WorkloadConfig = workload_config(parse_args(["--quick"]))
    return dataclasses.replace(
        config, readers=2, duration=3.0, pause_per_session=pause, plant_stale=plant_stale
    )


@pytest.mark.timeout(90)
def test_harness_detects_staleness_in_the_hand_rolled_contender(
    pool: WorkerPool, redis_url: str, postgres_url: str
) -> None:
    result = run_contender(
        "hand_rolled",
        quick_config(plant_stale=True),
        redis_url,
        postgres_url,
        pool=pool,
        progress=lambda s: None,
    )
    assert "error" not in result, result.get("error")
    assert result["reads"] > 0 and result["writes"] > 0
    assert sum(f["connections_killed"] for f in result["faults"]) > 0
    # At least the planted read; usually also organic ones (lost messages, stale sets).
    assert result["stale"] >= 1, result
    assert result["errors"] == 0, result["first_error"]


@pytest.mark.timeout(90)
def test_hybridinval_serves_no_stale_read_through_subscriber_kills(
    pool: WorkerPool, redis_url: str, postgres_url: str
) -> None:
    result = run_contender(
        "hybridinval",
        quick_config(pause=0.0),
        redis_url,
        postgres_url,
        pool=pool,
        progress=lambda s: None,
    )
    assert "error" not in result, result.get("error")
    assert result["reads"] > 0 and result["writes"] > 0
    assert sum(f["connections_killed"] for f in result["faults"]) > 0, "no fault was injected"
    assert result["errors"] == 0, result["first_error"]
    assert {p: v["stale"] for p, v in result["phases"].items()} == {"steady": 0, "faults": 0}, (
        result["stale_examples"],
        result["notes"],
    )
