"""A partial benchmark run (no PostgreSQL, parts skipped) reports cleanly and leaves the
committed results alone.

The report code runs on the committed ``benchmarks/results/results.json`` with parts taken out;
the harness runs with its PostgreSQL URL pointed at a closed port and the slow parts skipped, so
these tests take seconds and are not marked slow.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from support import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the benchmarks package

from benchmarks import __main__ as bench
from benchmarks import report

COMMITTED = bench.RESULTS / "results.json"
FILES = ("results.json", "results.md", *report.PLOTS)


@pytest.fixture(scope="module")
def full_results() -> dict[str, Any]:
    results: dict[str, Any] = json.loads(COMMITTED.read_text())
    assert all(part in results for part in bench.PARTS), "the committed results are partial"
    return results


def without(results: dict[str, Any], *parts: str) -> dict[str, Any]:
    """``results`` as a run in which ``parts`` did not run would have them."""
    out = copy.deepcopy(results)
    for part in parts:
        del out[part]
    if "workload" in parts:
        del out["postgres_version"]
    out["targets"] = bench.targets(out)
    out["partial"] = [f"no {part} part" for part in parts]
    return out


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """A results folder holding a full run's files, as the committed folder does."""
    folder = tmp_path / "results"
    folder.mkdir()
    for name in FILES:
        (folder / name).write_text(f"committed {name}\n")
    return folder


def assert_untouched(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == sorted(FILES)
    for name in FILES:
        assert (folder / name).read_text() == f"committed {name}\n", f"{name} was overwritten"
    assert not list(folder.glob("*.tmp")), "a staging folder was left behind"


def test_the_report_of_a_run_without_the_workload_says_it_did_not_run(
    full_results: dict[str, Any],
) -> None:
    text = report.markdown(without(full_results, "workload"))
    assert "Workload: not run" in text
    assert "PostgreSQL not used" in text
    assert "**Partial run** (no workload part)" in text
    rows = [line for line in text.splitlines() if line.startswith("| hybridinval ")]
    assert rows and all("| not run | not run | not run |" in row for row in rows)
    targets = " ".join(t["target"] for t in bench.targets(without(full_results, "workload")))
    assert "L1 hit" in targets and "reads/s" not in targets


@pytest.mark.parametrize(
    "missing",
    [("core",), ("micro",), ("core", "micro"), ("core", "workload"), ("micro", "workload")],
)
def test_the_report_renders_whatever_parts_ran(
    full_results: dict[str, Any], missing: tuple[str, ...]
) -> None:
    text = report.markdown(without(full_results, *missing))
    assert ("### Hot paths" in text) == ("core" not in missing)
    assert ("### Side by side" in text) == ("micro" not in missing or "workload" not in missing)


def test_without_the_workload_only_the_latency_plot_is_drawn(
    full_results: dict[str, Any], tmp_path: Path
) -> None:
    written = report.plots(without(full_results, "workload"), tmp_path)
    assert [p.name for p in written] == ["latency.png"]
    assert (tmp_path / "latency.png").stat().st_size > 0


def test_a_run_without_postgresql_writes_beside_the_committed_results(
    out: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    closed = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"
    argv = ["--skip", "core,micro,asyncio", "--contenders", "hybridinval", "--out", str(out)]
    assert bench.main([*argv, "--redis-url", redis_url, "--postgres-url", closed]) == 0
    printed = capsys.readouterr().out
    assert f"workload skipped: PostgreSQL unavailable at {closed}" in printed
    assert f"writing {out / 'partial'}/, {out}/ keeps the last full run" in printed
    assert_untouched(out)
    partial = json.loads((out / "partial" / "results.json").read_text())
    assert "no workload part" in partial["partial"]
    assert any(n.startswith("workload skipped: PostgreSQL unavailable") for n in partial["notes"])
    assert "**Partial run**" in (out / "partial" / "results.md").read_text()


def test_a_failed_render_leaves_the_results_as_they_were(
    full_results: dict[str, Any], out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
        (out_dir / "latency.png").write_text("half a plot")
        raise RuntimeError("matplotlib fell over")

    monkeypatch.setattr(report, "plots", broken_plots)
    with pytest.raises(RuntimeError, match="fell over"):
        bench._write(out, copy.deepcopy(full_results), lambda message: None)
    assert_untouched(out)


def test_a_full_run_replaces_every_file(full_results: dict[str, Any], out: Path) -> None:
    bench._write(out, copy.deepcopy(full_results), lambda message: None)
    assert json.loads((out / "results.json").read_text()) == full_results
    for name in FILES:
        assert not (out / name).read_text(errors="replace").startswith("committed")
    assert not (out / "partial").exists()
    assert not list(out.glob("*.tmp"))
