"""from_url() without a URL: every process of the user on the machine shares one embedded Redis.

Each test points HYBRIDINVAL_EMBEDDED_DIR at a directory of its own, so it starts (and watches
stop) a server nobody else uses.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.embedded_procs import reader, run_forked_pair, writer_then_invalidate
from support.waiting import wait_until

from hybridinval import BackendUnavailableError, HybridCache
from hybridinval import _embedded as embedded

GRACE = embedded._IDLE_GRACE


@pytest.fixture
def shared_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="hi-emb-", dir="/tmp")  # short: a Unix socket lives in it
    os.chmod(path, 0o700)
    monkeypatch.setenv("HYBRIDINVAL_EMBEDDED_DIR", path)
    yield path
    pids = _server_pids(path)
    for pid in pids:  # a failed test must not leave its server behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    shutil.rmtree(path, ignore_errors=True)


def _server_pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "supervisor.pid")) as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of ours would still "exist"; the supervisor is not our child (own session)
    return True


def _stopped(path: str, pids: list[int]) -> bool:
    return not os.path.exists(os.path.join(path, "redis.sock")) and not any(map(_alive, pids))


def test_two_spawned_processes_share_one_server_and_its_invalidations(
    shared_dir: str, namespace: str
) -> None:
    ctx = multiprocessing.get_context("spawn")
    w_parent, w_child = ctx.Pipe()
    r_parent, r_child = ctx.Pipe()
    writer = ctx.Process(target=writer_then_invalidate, args=(namespace, w_child))
    reading = ctx.Process(target=reader, args=(namespace, r_child))
    writer.start()
    try:
        assert w_parent.poll(30)
        _, writer_endpoint = w_parent.recv()
        reading.start()
        assert r_parent.poll(30)
        _, value, reader_endpoint, in_l1 = r_parent.recv()
        assert writer_endpoint == reader_endpoint == ("unix", f"{shared_dir}/redis.sock", 0)
        assert value == "v1", "a key set in one process reads in the other"
        assert in_l1
        w_parent.send("invalidate")
        assert w_parent.recv() == "invalidated"
        assert r_parent.poll(15)
        _, evicted, after = r_parent.recv()
        assert evicted and after is None, "the other process's invalidation evicted its L1"
    finally:
        for conn in (w_parent, r_parent):
            with contextlib.suppress(OSError):
                conn.send("done")
        for proc in (writer, reading):
            if proc.pid is not None:
                proc.join(30)
    assert writer.exitcode == 0 and reading.exitcode == 0


def test_a_forked_gunicorn_style_pair_shares_one_server(shared_dir: str, namespace: str) -> None:
    out = run_forked_pair(namespace)
    assert "writer ok" in out
    assert "reader saw from-writer evicted=True" in out


def test_the_server_outlives_its_starter_while_another_user_lives_then_stops(
    shared_dir: str, namespace: str
) -> None:
    first = HybridCache.from_url(namespace=namespace)
    first.set("k", 1)
    pids = _server_pids(shared_dir)
    assert len(pids) == 2  # the supervisor and its redis-server
    # A second user in another process (it takes its own claim).
    user = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, hybridinval; c = hybridinval.HybridCache.from_url(namespace=sys.argv[1]);"
            " print(c.get('k'), flush=True); sys.stdin.read(); c.close()",
            namespace,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert user.stdout is not None and user.stdout.readline().strip() == "1"
        first.close()  # the starter leaves
        time.sleep(GRACE + 1.0)
        assert _server_pids(shared_dir) == pids and all(map(_alive, pids))
        with HybridCache.from_url(namespace=namespace) as again:
            assert again.get("k") == 1, "the same server, still holding the data"
    finally:
        user.kill()  # SIGKILL: its claim must go with it (the kernel drops its lock)
        user.wait()
    wait_until(lambda: _stopped(shared_dir, pids), timeout=GRACE + 10, what="server stopped")


def test_a_new_user_after_the_stop_starts_a_fresh_server(shared_dir: str, namespace: str) -> None:
    with HybridCache.from_url(namespace=namespace) as cache:
        cache.set("k", 1)
        pids = _server_pids(shared_dir)
    wait_until(lambda: _stopped(shared_dir, pids), timeout=GRACE + 10, what="server stopped")
    with HybridCache.from_url(namespace=namespace) as cache:
        assert cache.get("k") is None
        assert _server_pids(shared_dir) != pids


def test_several_caches_of_one_process_share_one_claim(shared_dir: str, namespace: str) -> None:
    a = HybridCache.from_url(namespace=namespace)
    b = HybridCache.from_url(namespace=namespace)
    pids = _server_pids(shared_dir)
    a.close()
    time.sleep(GRACE + 1.0)
    assert all(map(_alive, pids)), "b still uses it"
    b.set("k", 2)
    b.close()
    wait_until(lambda: _stopped(shared_dir, pids), timeout=GRACE + 10, what="server stopped")


def test_a_directory_others_can_enter_is_refused(
    shared_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.chmod(shared_dir, 0o755)
    with pytest.raises(BackendUnavailableError, match="mode 0700"):
        HybridCache.from_url()


def test_a_private_server_lives_in_the_directory_given_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = embedded.EmbeddedRedis(directory=str(tmp_path))
    assert os.path.dirname(server.dir) == str(tmp_path) and _alive(server.pid)
    server.terminate()
    assert not os.path.exists(server.dir)
    # An interrupt while it waits for the server to answer stops the server too.
    started: list[int] = []
    real_popen = subprocess.Popen

    def recording_popen(*args: Any, **kwargs: Any) -> Any:
        proc = real_popen(*args, **kwargs)
        started.append(proc.pid)
        return proc

    def interrupted(self: embedded.EmbeddedRedis) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    monkeypatch.setattr(embedded.EmbeddedRedis, "_wait_ready", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded.EmbeddedRedis(directory=str(tmp_path))
    assert len(started) == 1
    wait_until(lambda: not _alive(started[0]), what="server stopped")
    assert os.listdir(tmp_path) == []
