"""The processes the demo starts: each the leader of a process group of its own, stopped (and
the group killed) on every exit path."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from . import DemoError
from .signals import Interrupts

__all__ = ["Processes", "Started", "free_port", "group_members", "wait_for"]

STARTUP_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (Linux ``/proc``; elsewhere just the leader)."""
    proc = Path("/proc")
    if not proc.is_dir():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, 0)
            return [pgid]
        return []
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            state = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != b"Z":
            members.append(int(entry.name))
    return members


@dataclass
class Started:
    """One process the demo started, leader of its own process group."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    seen_pids: set[int] = field(default_factory=set)

    @property
    def pgid(self) -> int:
        return self.proc.pid

    def note_members(self) -> None:
        self.seen_pids.update(group_members(self.pgid))

    def stop(self, timeout: float) -> None:
        """SIGTERM (graceful: the processes publish their stats), then SIGKILL the group."""
        self.note_members()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        self.kill()

    def kill(self) -> None:
        deadline = time.monotonic() + 10
        while group_members(self.pgid) and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, signal.SIGKILL)
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if not self.log_file.closed:
            self.log_file.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """Everything the demo started; :meth:`stop_all` runs on every exit path."""

    def __init__(
        self, workdir: Path, env: dict[str, str], cwd: Path, interrupts: Interrupts
    ) -> None:
        self.interrupts = interrupts
        self.workdir = workdir
        self.env = env
        self.cwd = cwd
        self.started: list[Started] = []

    def start(self, name: str, args: Sequence[str]) -> Started:
        log_path = self.workdir / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed by Started.kill()
        # No Ctrl-C between the fork and the bookkeeping: a process must never go unrecorded.
        # (Deferred, not blocked: a blocked signal mask would be inherited by the child.)
        with self.interrupts.deferred():
            proc = subprocess.Popen(
                list(args),
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # Its own group: a Ctrl-C in the terminal reaches the demo only, which then
                # stops everything in order, and the demo can kill exactly what it started.
                start_new_session=True,
            )
            started = Started(name, proc, log_path, log_file)
            self.started.append(started)
        return started

    def check_alive(self) -> None:
        for started in self.started:
            if started.proc.poll() is not None:
                raise DemoError(
                    f"{started.name} exited with {started.proc.returncode}:\n{started.log_tail()}"
                )

    def stop_all(self, timeout: float) -> None:
        """Stop in parallel (each waits for its own graceful exit), then make sure."""
        threads = [
            threading.Thread(target=s.stop, args=(timeout,), daemon=True) for s in self.started
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout + 15)
        for started in self.started:
            started.kill()

    def leftovers(self) -> list[int]:
        return [pid for s in self.started for pid in group_members(s.pgid)]


def wait_for(
    what: str, check: Callable[[], bool], processes: Processes, timeout: float = STARTUP_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        processes.check_alive()
        with contextlib.suppress(Exception):
            if check():
                return
        if time.monotonic() > deadline:
            raise DemoError(f"{what} did not become ready within {timeout:.0f}s")
        time.sleep(0.1)
