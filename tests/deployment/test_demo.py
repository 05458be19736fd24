"""``hybridinval demo`` end to end, as a user on a fresh machine runs it: no
HYBRIDINVAL_REDIS_URL, no HYBRIDINVAL_DATABASE_URL (embedded Redis, a temporary SQLite file), 2 web
processes and a prefork worker.

The demo runs in a session of its own; the test records every descendant it sees while the demo
runs and checks that none outlives it, after a normal end and after a Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.celery_worker import descendants, group_members, pid_alive
from support.repo import REPO_ROOT

pytestmark = pytest.mark.slow  # the whole demo

DURATION_S = 4


class Demo:
    """The demo as a subprocess in its own session; killed (its group and every descendant seen)
    at the end of the test whatever happens."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if k
            not in (
                "HYBRIDINVAL_REDIS_URL",
                "HYBRIDINVAL_DATABASE_URL",
                "HYBRIDINVAL_BROKER_URL",
                "HYBRIDINVAL_NAMESPACE",
            )
        }
        env["PYTHONUNBUFFERED"] = "1"
        self.out_path = tmp_path / "demo.out"
        self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hybridinval.cli", "demo", *args],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.seen: set[int] = set()

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def watch(self, timeout: float, until: str | None = None) -> int | None:
        """Record descendants until the demo exits (or ``until`` appears in its output)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.seen.update(descendants(self.proc.pid))
            if self.proc.poll() is not None:
                return self.proc.returncode
            if until is not None and until in self.output():
                return None
            time.sleep(0.2)
        raise AssertionError(f"demo still running after {timeout}s:\n{self.output()[-3000:]}")

    def survivors(self) -> list[int]:
        return [pid for pid in self.seen if pid_alive(pid)] + group_members(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.survivors():  # only processes the demo started (seen as descendants)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._out.close()


@pytest.fixture
def demo_factory(tmp_path: Path) -> Iterator[Any]:
    demos: list[Demo] = []

    def start(*args: str) -> Demo:
        demo = Demo(tmp_path, *args)
        demos.append(demo)
        return demo

    try:
        yield start
    finally:
        for demo in demos:
            demo.close()


def test_demo_runs_on_a_fresh_machine_with_no_stale_reads(
    demo_factory: Any, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    demo = demo_factory("--duration", str(DURATION_S), "--json", str(report))
    code = demo.watch(timeout=150)
    output = demo.output()
    assert code == 0, output[-4000:]
    assert "embedded" in output and "sqlite" in output
    assert "stale reads: 0" in output and output.rstrip().endswith("OK"), output[-2000:]
    result = json.loads(report.read_text())
    assert result["stale"] == 0 and result["missing"] == [] and result["errors"] == []
    assert result["reads"] > 0 and result["writes"] > 0
    roles = sorted(row["process"].split(":")[0] for row in result["rows"])
    assert roles.count("web") == 2 and roles.count("task") >= 2, roles
    for row in result["rows"]:
        assert row["reads"] > 0, row
    # The demo printed a table row per process; the backplane was exercised.
    assert sum(row["invalidations_received"] for row in result["rows"]) > 0
    # Nothing it started outlives it: not the web processes, the worker, nor the embedded Redis.
    assert len(demo.seen) >= 7, demo.seen  # 2 gunicorn masters + 2 workers, celery + 2, redis
    assert result["leftovers"] == [] and demo.survivors() == []
    assert not any(pid_alive(pid) for pid in result["pids"])


def test_ctrl_c_stops_everything_the_demo_started(demo_factory: Any) -> None:
    demo = demo_factory("--duration", "120")
    assert demo.watch(timeout=120, until="started:") is None, demo.output()[-3000:]
    demo.watch(timeout=20, until=" reads ")  # the workload runs (first progress line)
    assert len(demo.seen) >= 7, demo.seen
    # A terminal's Ctrl-C goes to the foreground process group: the demo and its Redis.
    os.killpg(demo.proc.pid, signal.SIGINT)
    code = demo.watch(timeout=60)
    assert code == 130, demo.output()[-3000:]
    assert "interrupted" in demo.output()
    assert demo.survivors() == []
