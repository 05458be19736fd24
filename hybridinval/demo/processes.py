"""The processes the demo starts: each the leader of a process group of its own (so that the
demo can stop exactly what it started, group and all), recorded with the watchdog before it
runs its command (:data:`GATE`), and stopped on every exit path."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from . import DemoError
from .reaper import GRACE, KILL_TIMEOUT, Record, group_members, start_time
from .signals import Interrupts

__all__ = ["Processes", "Reaper", "Started", "free_port", "wait_for"]

log = logging.getLogger("hybridinval.demo")

STARTUP_TIMEOUT = 60.0

GATE = """\
import os, sys
gate = int(sys.argv[1])
if not os.read(gate, 1):
    sys.exit(1)  # the demo died before it recorded this process: never become the command
os.close(gate)
os.execvp(sys.argv[2], sys.argv[2:])
"""
"""What each process the demo starts runs first, in the same process (``exec`` keeps its pid
and start time): it waits until the demo has recorded it with the watchdog. A demo killed in
between (SIGKILL, which no deferral holds off) closes the pipe, and the process exits instead of
running unrecorded."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Reaper:
    """The demo's end of its watchdog (:mod:`.reaper`), started before anything else."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"{__package__}.reaper"],
            # Where this hybridinval is installed: the same package, whatever the user's cwd.
            cwd=Path(__file__).resolve().parents[2],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # out of reach of the terminal's SIGINT and SIGHUP
        )

    def watch(self, pid: int) -> None:
        """Record a process the demo started (call it before anything that can be cut short)."""
        self._send(Record(pid, start_time(pid)).line())

    def watch_dir(self, path: Path) -> None:
        self._send(f"dir {path}")

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"{line}\n".encode())
            self.proc.stdin.flush()
        except OSError as exc:  # it died: the demo's own cleanup still runs
            log.warning("the demo's watchdog is gone (%s); %s is not recorded", exc, line)

    def close(self) -> int:
        """End of file: it checks that nothing recorded is left (else stops it) and exits.
        Returns how many processes it had to stop."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            return max(self.proc.wait(timeout=GRACE + KILL_TIMEOUT + 10), 0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return 0


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

    def stop(self, timeout: float, hurry: threading.Event) -> None:
        """SIGTERM (graceful: the processes publish their stats), then SIGKILL the group after
        ``timeout`` seconds, or as soon as ``hurry`` is set."""
        self.note_members()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not hurry.is_set():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=0.1)
                    break
        self.kill()

    def kill(self) -> None:
        # The leader is not reaped before its group is empty: until then its pid, the group's
        # id, cannot be another process's.
        deadline = time.monotonic() + KILL_TIMEOUT
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
        self, workdir: Path, env: dict[str, str], interrupts: Interrupts, reaper: Reaper
    ) -> None:
        self.interrupts = interrupts
        self.reaper = reaper
        self.workdir = workdir
        self.env = env
        self.started: list[Started] = []

    def start(self, name: str, args: Sequence[str]) -> Started:
        """Start ``args`` in the workdir (where nothing can shadow a module), logging there."""
        log_path = self.workdir / f"{name}.log"
        # No signal between the fork and the bookkeeping: a process must never go unrecorded.
        # (Deferred, not blocked: a blocked signal mask would be inherited by the child.)
        with self.interrupts.deferred():
            log_file = open(log_path, "ab")  # noqa: SIM115 - closed by Started.kill()
            gate, opener = os.pipe()  # (neither end is inherited but the one passed)
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", GATE, str(gate), *args],
                    pass_fds=(gate,),
                    cwd=self.workdir,
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
                self.reaper.watch(proc.pid)
                os.write(opener, b"\n")  # recorded: go
            finally:
                os.close(gate)
                os.close(opener)
        return started

    def check_alive(self) -> None:
        for started in self.started:
            if started.proc.poll() is not None:
                raise DemoError(
                    f"{started.name} exited with {started.proc.returncode}:\n{started.log_tail()}"
                )

    def stop_all(self, timeout: float) -> None:
        """Stop in parallel (each waits for its own graceful exit, cut short by a signal), then
        make sure."""
        threads = [
            threading.Thread(target=s.stop, args=(timeout, self.interrupts.hurry), daemon=True)
            for s in self.started
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
