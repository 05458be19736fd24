"""The demo's two defences, each on its own: how a signal becomes a clean stop
(``hybridinval.demo.signals``), and the watchdog that cleans up after a demo that was killed
(``hybridinval.demo.reaper``). ``test_demo.py`` runs them together, with the whole demo."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.celery_worker import pid_alive

from hybridinval.demo.processes import GATE
from hybridinval.demo.reaper import Record, start_time
from hybridinval.demo.signals import Interrupted, Interrupts

SIGNALS = [signal.SIGHUP, signal.SIGTERM, signal.SIGINT]


def _deliver(signum: signal.Signals) -> None:
    """Send ``signum`` to this process and let its handler run (handlers run in the main
    thread, between bytecodes)."""
    os.kill(os.getpid(), signum)
    for _ in range(100):
        time.sleep(0.001)


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
def test_each_signal_interrupts_and_sets_the_exit_status(signum: signal.Signals) -> None:
    previous = signal.getsignal(signum)
    interrupts = Interrupts()
    with pytest.raises(Interrupted) as info, interrupts.installed():
        _deliver(signum)
    assert info.value.signum == signum and isinstance(info.value, KeyboardInterrupt)
    assert interrupts.exit_status == 128 + signum
    assert signal.getsignal(signum) == previous, "the handler is restored"


def test_a_signal_while_deferred_is_raised_when_the_block_ends() -> None:
    interrupts = Interrupts()
    reached_the_end = False
    with pytest.raises(Interrupted), interrupts.installed():
        with interrupts.deferred():
            _deliver(signal.SIGTERM)  # between a fork and its bookkeeping, say
            reached_the_end = True
        raise AssertionError("not reached: raised as the block ended")
    assert reached_the_end
    assert interrupts.exit_status == 143


def test_signals_during_the_cleanup_only_hurry_it() -> None:
    interrupts = Interrupts()
    with interrupts.installed():
        with contextlib.suppress(Interrupted):
            _deliver(signal.SIGINT)
        interrupts.disarm()
        assert not interrupts.hurry.is_set()
        _deliver(signal.SIGHUP)  # the terminal closed during the cleanup after a Ctrl-C
        _deliver(signal.SIGINT)
    assert interrupts.hurry.is_set()
    assert interrupts.exit_status == 130, "the first signal decides the exit status"


def test_a_second_signal_never_raises_again() -> None:
    interrupts = Interrupts()
    with interrupts.installed():
        with contextlib.suppress(Interrupted):
            _deliver(signal.SIGTERM)
        _deliver(signal.SIGTERM)  # still unwinding towards the cleanup: no second exception
    assert interrupts.hurry.is_set()


# -- the watchdog ---------------------------------------------------------------------------


class Watchdog:
    """``python -m hybridinval.demo.reaper``, fed like the demo feeds it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hybridinval.demo.reaper"],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )

    def send(self, *lines: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("".join(f"{line}\n" for line in lines).encode())
        self.proc.stdin.flush()

    def close(self, timeout: float = 30) -> int:
        """End of file, as when the demo exits; its exit status."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout)


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts (in sessions of their own); killed at the end if still there."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _group(procs: list[subprocess.Popen[bytes]], script: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    procs.append(proc)
    return proc


def _group_pids(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry)) == pgid and pid_alive(int(entry)):
                    found.append(int(entry))
    return found


def test_the_watchdog_stops_what_it_was_told_of_and_removes_the_directory(
    spawn: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    # A leader with a child in its group (a gunicorn master and its worker, say).
    leader = _group(spawn, "sleep 60 & exec sleep 61")
    workdir = tmp_path / "workdir"
    (workdir / "sub").mkdir(parents=True)
    (workdir / "sub" / "file").write_text("x")
    deadline = time.monotonic() + 10
    while len(_group_pids(leader.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    members = _group_pids(leader.pid)
    assert len(members) == 2
    watchdog = Watchdog()
    watchdog.send(Record(leader.pid, start_time(leader.pid)).line(), f"dir {workdir}")
    assert watchdog.proc.poll() is None, "it waits for the end of file"
    assert watchdog.close() == 2  # the processes it had to signal
    leader.wait(10)
    assert not any(pid_alive(pid) for pid in members)
    assert not workdir.exists()


def test_the_watchdog_leaves_a_reused_pid_alone(spawn: list[subprocess.Popen[bytes]]) -> None:
    other = _group(spawn, "exec sleep 60")
    start = start_time(other.pid)
    assert start is not None
    watchdog = Watchdog()
    # The pid as the demo recorded it: a process that started earlier, since gone.
    watchdog.send(Record(other.pid, start - 1).line())
    assert watchdog.close() == 0
    assert other.poll() is None, "another process's now: never signalled"


def test_after_a_clean_demo_the_watchdog_has_nothing_to_do(
    spawn: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    gone = _group(spawn, "exit 0")
    record = Record(gone.pid, start_time(gone.pid)).line()
    gone.wait(10)
    watchdog = Watchdog()
    watchdog.send(record, f"dir {tmp_path / 'never-made'}")
    started = time.monotonic()
    assert watchdog.close() == 0
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("recorded", [True, False])
def test_a_started_process_runs_its_command_only_once_recorded(
    recorded: bool, tmp_path: Path
) -> None:
    """Between the fork and the record no deferral helps against SIGKILL: each process waits
    at the gate until the demo has recorded it, and exits if the demo died first."""
    marker = tmp_path / "ran"
    gate, opener = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", GATE, str(gate), "touch", str(marker)],
        pass_fds=(gate,),
    )
    os.close(gate)
    time.sleep(0.2)
    assert not marker.exists(), "it waits"
    if recorded:
        os.write(opener, b"\n")
    os.close(opener)  # the demo's end: closed when it exits, however it exits
    assert proc.wait(10) == (0 if recorded else 1)
    assert marker.exists() == recorded
