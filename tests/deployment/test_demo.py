"""``hybridinval demo`` end to end, as a user on a fresh machine runs it: no
HYBRIDINVAL_REDIS_URL, no HYBRIDINVAL_DATABASE_URL (embedded Redis, a temporary SQLite file), 2 web
processes and a prefork worker.

The demo runs in a session of its own with a private TMPDIR; the harness records every
descendant it sees while the demo runs and checks that none outlives it and that the TMPDIR is
empty: after a normal end, after Ctrl-C, SIGTERM or a closed terminal, each while the workload
runs and while the processes are still starting, and after SIGKILL (then the demo's watchdog
cleans up).
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, text
from support.celery_worker import pid_alive
from support.demo_harness import Demo, fresh_env
from support.migrations import private_schema

from hybridinval.keyspace import Keyspace

pytestmark = pytest.mark.slow  # the whole demo

DURATION_S = 4


@pytest.fixture
def demo_factory(tmp_path: Path) -> Iterator[Any]:
    demos: list[Demo] = []

    def start(*args: str, **options: Any) -> Demo:
        home = tmp_path / f"demo-{len(demos)}"
        home.mkdir()
        demo = Demo(home, *args, **options)
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
    # Nothing it started outlives it: not the web processes, the worker, the embedded Redis,
    # nor its watchdog; and it left no temporary file.
    assert len(demo.seen) >= 8, demo.seen  # 2 gunicorn masters + 2 workers, celery + 2, redis,
    assert result["leftovers"] == [] and demo.survivors() == []  # and the watchdog
    assert not any(pid_alive(pid) for pid in result["pids"])
    assert demo.leftover_files() == []


def test_behind_a_host_hub_every_process_hears_every_commit(
    demo_factory: Any, tmp_path: Path
) -> None:
    """``--hub``: the processes subscribe through one ``hybridinval hub``; no read is stale,
    every process hears invalidations, and the hub goes with the rest."""
    report = tmp_path / "report.json"
    demo = demo_factory("--duration", str(DURATION_S), "--hub", "--json", str(report))
    code = demo.watch(timeout=150)
    output = demo.output()
    assert code == 0, output[-4000:]
    assert "all behind a host hub" in output
    assert "stale reads: 0" in output and output.rstrip().endswith("OK"), output[-2000:]
    result = json.loads(report.read_text())
    assert result["stale"] == 0 and result["errors"] == []
    assert all(row["invalidations_received"] > 0 for row in result["rows"]), result["rows"]
    assert result["leftovers"] == [] and demo.survivors() == []
    assert demo.leftover_files() == []


def test_ctrl_c_stops_everything_the_demo_started(demo_factory: Any) -> None:
    demo = demo_factory("--duration", "120")
    assert demo.watch(timeout=120, until="started:") is None, demo.output()[-3000:]
    demo.watch(timeout=20, until=" reads ")  # the workload runs (first progress line)
    assert len(demo.seen) >= 8, demo.seen
    # A terminal's Ctrl-C goes to the foreground process group: the demo's, and only the demo
    # is in it (everything it starts is in a session of its own).
    os.killpg(demo.proc.pid, signal.SIGINT)
    code = demo.watch(timeout=60)
    assert code == 130, demo.output()[-3000:]
    assert "interrupted" in demo.output()
    assert demo.survivors() == [] and demo.leftover_files() == []


SIGNALS = [signal.SIGHUP, signal.SIGTERM, signal.SIGINT]


def _send(demo: Demo, signum: signal.Signals) -> None:
    if signum == signal.SIGINT:
        demo.ctrl_c()
    elif signum == signal.SIGHUP:
        demo.hang_up()
    else:
        os.kill(demo.proc.pid, signum)


@pytest.mark.parametrize("phase", ["starting", "running"])
@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
def test_a_signal_stops_everything_and_removes_every_temporary_file(
    demo_factory: Any, signum: signal.Signals, phase: str
) -> None:
    """On a terminal: SIGINT is ^C typed on it, SIGHUP the terminal closing, SIGTERM a kill."""
    demo = demo_factory("--duration", "120", terminal=True)
    if phase == "starting":  # a web process runs, the others are still to come or booting
        assert demo.watch(timeout=120, starting=True) is None, demo.output()[-3000:]
    else:
        assert demo.watch(timeout=120, until=" reads ") is None, demo.output()[-3000:]
        assert len(demo.seen) >= 8, demo.describe(list(demo.seen))
    _send(demo, signum)
    code = demo.watch(timeout=60)
    # Everything is stopped and removed before the demo exits (it waits for its watchdog).
    assert demo.survivors() == [], demo.describe(demo.survivors())
    assert demo.leftover_files() == []
    assert code == 128 + signum, demo.output()[-3000:]
    if signum != signal.SIGHUP:  # (after a hangup nobody sees the terminal any more)
        assert f"interrupted ({signum.name})" in demo.output(), demo.output()[-3000:]


@pytest.mark.parametrize("phase", ["starting", "running"])
def test_a_killed_demo_leaves_nothing_behind(demo_factory: Any, phase: str) -> None:
    """SIGKILL, which no handler sees: the demo's watchdog stops what it started."""
    demo = demo_factory("--duration", "120")
    if phase == "starting":
        assert demo.watch(timeout=120, starting=True) is None, demo.output()[-3000:]
    else:
        assert demo.watch(timeout=120, until=" reads ") is None, demo.output()[-3000:]
    demo.proc.kill()
    assert demo.watch(timeout=10) == -signal.SIGKILL
    demo.wait_until_clean(timeout=30)


def test_on_a_users_redis_and_database_the_demo_leaves_nothing_there(
    demo_factory: Any, redis_url: str, postgres_url: str
) -> None:
    """HYBRIDINVAL_REDIS_URL / HYBRIDINVAL_DATABASE_URL: the demo's namespace, its Celery queue
    and the users it created are gone afterwards (the schema is this test's own)."""
    with private_schema(postgres_url, "demo") as database_url:
        env = fresh_env(HYBRIDINVAL_REDIS_URL=redis_url, HYBRIDINVAL_DATABASE_URL=database_url)
        demo = demo_factory("--duration", "2", env=env)
        code = demo.watch(timeout=150)
        output = demo.output()
        assert code == 0, output[-4000:]
        assert "stale reads: 0" in output and "(HYBRIDINVAL_REDIS_URL)" in output
        namespace = re.search(r"namespace: (\S+)", output)
        assert namespace is not None, output
        engine = create_engine(database_url)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM users")).scalar() == 0
        finally:
            engine.dispose()
    with redis.Redis.from_url(redis_url) as client:
        left = [
            *client.scan_iter(match=Keyspace(namespace[1]).pattern),
            *client.scan_iter(match=f"*{namespace[1]}*"),  # the queue and kombu's bindings
        ]
    assert left == []
    assert demo.survivors() == [] and demo.leftover_files() == []
