"""The fan-out benchmark's harness on a tiny run: every row measured, nothing lost, the files
written beside (never over) the committed results. (``make fanout`` is the real run.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import support.repo  # noqa: F401 - the repository root (benchmarks/) on sys.path

from benchmarks import fanout

pytestmark = pytest.mark.slow  # forks subscriber processes


def test_a_tiny_fanout_run_measures_every_row(
    redis_url: str, amqp_url: str, redis_cli: str, tmp_path: Path
) -> None:
    argv = [
        "--redis-url", redis_url, "--amqp-url", amqp_url, "--amqp", "--cluster", "--sizes", "2",
        "--messages", "10", "--interval-ms", "5", "--throughput-seconds", "0.3",
        "--out", str(tmp_path), "--repeats", "1",
    ]  # fmt: skip
    assert fanout.main(argv) == 0
    written = tmp_path / "partial"  # not the full sizes: never over the committed results
    results = json.loads((written / "fanout.json").read_text())
    assert [r["mode"] for r in results["rows"]] == list(fanout.MODES)
    for row in results["rows"]:
        assert row["lost"] == 0 and row["slowest_p50_us"] and row["keys_per_s_4_writers"] > 0
        assert row["subscriber_cpu_us_per_message"] is not None
        assert (row["hub_cpu_us_per_message"] is not None) == row["mode"].endswith("hub)")
        if row["mode"] == "raw PUBLISH":  # its writers never subscribe: these are the subscribers
            assert row["pubsub_connections_during_throughput"] >= 2
    assert (written / "fanout.png").stat().st_size > 0
    assert "| hybridinval | 2 |" in (written / "fanout.md").read_text()
