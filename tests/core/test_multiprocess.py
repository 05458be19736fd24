"""Real OS processes: cross-process eviction, and fork safety (README, Guarantees)."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time

import pytest
from support.inspect import entries
from support.procs import l1_reader
from support.waiting import wait_until

from hybridinval import HybridCache


def test_invalidate_in_one_process_evicts_l1_in_another(redis_url: str, namespace: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=l1_reader, args=(redis_url, namespace, "user:1", theirs))
    child.start()
    writer = HybridCache.from_url(redis_url, namespace=namespace)
    try:
        assert ours.poll(30), "child did not start"
        tag, child_id, cached = ours.recv()
        assert tag == "ready" and cached and child_id != writer.instance_id
        ours.send(time.time_ns())
        writer.set("user:1", "changed")
        assert ours.poll(10)
        tag, evicted, _lag_ns, stats, after = ours.recv()
    finally:
        child.join(10)
        writer.close()
    assert tag == "evicted" and evicted
    assert after == "changed"
    assert stats["invalidations_received"] >= 1 and stats["lag_samples"] >= 1
    assert stats["lag_p50_us"] is not None
    assert child.exitcode == 0


def test_invalidate_reaches_the_other_process_and_reports_lag(
    redis_url: str, namespace: str
) -> None:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=l1_reader, args=(redis_url, namespace, "k", theirs))
    child.start()
    writer = HybridCache.from_url(redis_url, namespace=namespace)
    try:
        assert ours.poll(30)
        assert ours.recv()[0] == "ready"
        ours.send(time.time_ns())
        writer.invalidate("k")
        assert ours.poll(10)
        _tag, evicted, lag_ns, stats, after = ours.recv()
    finally:
        child.join(10)
        writer.close()
    assert evicted and after is None
    assert 0 < lag_ns < 10 * 10**9
    assert stats["lag_samples"] == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_forked_child_gets_its_own_identity_l1_connections_and_subscriber(
    redis_url: str, namespace: str
) -> None:
    parent = HybridCache.from_url(redis_url, namespace=namespace)
    writer = HybridCache.from_url(redis_url, namespace=namespace)
    try:
        assert parent.wait_until_subscribed(10) and writer.wait_until_subscribed(10)
        parent.get_or_set("shared", lambda: "parent-value")
        parent_id = parent.instance_id
        read_fd, write_fd = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, then exit without running pytest's teardown
            code = 1
            try:
                os.close(read_fd)
                report: dict[str, object] = {
                    "id_changed": parent.instance_id != parent_id,
                    "l1_empty": entries(parent) == {},
                    "threads": [t.name for t in threading.enumerate()],
                }
                report["subscribed"] = parent.wait_until_subscribed(10)
                parent.get_or_set("shared", lambda: "child-value")
                report["cached"] = "shared" in entries(parent)
                os.write(write_fd, b"x")  # tell the parent we hold the key in L1
                os.read(go_r, 1)  # wait until the writer has invalidated it
                deadline = time.monotonic() + 10
                while "shared" in entries(parent) and time.monotonic() < deadline:
                    time.sleep(0.001)
                report["evicted_by_own_subscriber"] = "shared" not in entries(parent)
                report["received"] = parent.stats()["invalidations_received"]
                parent.close()
                os.write(write_fd, json.dumps(report).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        assert os.read(read_fd, 1) == b"x"
        writer.invalidate("shared")
        os.write(go_w, b"g")
        chunks = []
        while chunk := os.read(read_fd, 65536):
            chunks.append(chunk)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        report = json.loads(b"".join(chunks))
        assert report["id_changed"] and report["l1_empty"] and report["subscribed"]
        assert report["cached"] and report["evicted_by_own_subscriber"]
        assert report["received"] >= 1
        # No thread of the parent's survives in the child until the child starts its own.
        assert not any(name.startswith("hybridinval-sub") for name in report["threads"])  # type: ignore[attr-defined]
        # The parent is unaffected: same identity, still subscribed, its own cache intact.
        assert parent.instance_id == parent_id and parent.subscribed
        wait_until(lambda: "shared" not in entries(parent), what="parent evicts too")
        parent.get_or_set("shared", lambda: "again")
        assert "shared" in entries(parent)
    finally:
        parent.close()
        writer.close()
