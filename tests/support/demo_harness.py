"""``hybridinval demo`` as a user runs it, watched from outside.

The demo runs in a session of its own with a private ``TMPDIR``, its output in a file or, with
``terminal=True``, on a pseudo-terminal it controls, so that Ctrl-C is a real ``^C`` and closing
the terminal a real hangup. While it runs, :meth:`Demo.watch` records every descendant with its
start time (from ``/proc``, independently of the demo's own bookkeeping), so that afterwards
:meth:`Demo.survivors` can tell exactly which of the processes the demo started are still
running, and :meth:`Demo.close` stops those and nothing else. A process forked after the last
look and orphaned before the next (the demo killed in between) is still found: its environment
holds the private ``TMPDIR``, which only the demo's processes inherit.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from support.repo import REPO_ROOT

__all__ = ["Demo", "fresh_env"]

# What a fresh machine does not have set: the demo then uses an embedded Redis and SQLite.
SETTINGS = (
    "HYBRIDINVAL_REDIS_URL",
    "HYBRIDINVAL_DATABASE_URL",
    "HYBRIDINVAL_BROKER_URL",
    "HYBRIDINVAL_NAMESPACE",
)


def fresh_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _stat(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _processes() -> dict[int, tuple[int, int, int]]:
    """Live (not zombie) processes: pid -> (parent, process group, start time)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) and fields[0] != b"Z":
            found[int(entry)] = (int(fields[1]), int(fields[2]), int(fields[19]))
    return found


def _environ_has(pid: int, needle: bytes) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Demo:
    """One ``hybridinval demo`` process (see the module docstring)."""

    def __init__(
        self,
        tmp_path: Path,
        *args: str,
        command: Sequence[str] = (sys.executable, "-m", "hybridinval.cli"),
        cwd: Path = REPO_ROOT,
        terminal: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.tmpdir = tmp_path / "tmp"  # where the demo's temporary files must all go, and go
        self.tmpdir.mkdir()
        full_env = fresh_env() if env is None else dict(env)
        full_env["TMPDIR"] = str(self.tmpdir)
        self.out_path = tmp_path / "demo.out"
        self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in close()
        self._master: int | None = None
        self._reader: threading.Thread | None = None
        self._stop_reading = threading.Event()
        argv = [*command, "demo", *args]
        if terminal:
            master, slave = os.openpty()
            self._master = master
            self.proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=full_env,
                # A session leader whose controlling terminal is the pty, as in a terminal
                # emulator: ^C is SIGINT for its foreground group, a hangup SIGHUP for it.
                preexec_fn=lambda: os.login_tty(slave),
            )
            os.close(slave)
            self._reader = threading.Thread(target=self._read_terminal, daemon=True)
            self._reader.start()
        else:
            self.proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=self._out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.seen: dict[int, int] = {}  # every descendant seen: pid -> start time
        self.seen_commands: dict[int, str] = {}

    def _read_terminal(self) -> None:
        assert self._master is not None
        while not self._stop_reading.is_set():
            ready, _, _ = select.select([self._master], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: the demo and everything on the terminal are gone
                return
            if not data:
                return
            self._out.write(data)
            self._out.flush()

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def _record(self) -> None:
        processes = _processes()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in processes.items():
            children.setdefault(ppid, []).append(pid)
        todo = [self.proc.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in self.seen:
                    self.seen[child] = processes[child][2]
                    self.seen_commands[child] = _cmdline(child)
                todo.append(child)

    def starting(self) -> bool:
        """The demo has started a web process but has not said that all are up."""
        return any("gunicorn" in c for c in self.seen_commands.values()) and (
            "started:" not in self.output()
        )

    def watch(self, timeout: float, until: str | None = None, starting: bool = False) -> int | None:
        """Record descendants until the demo exits (its status), or until ``until`` appears in
        its output or, with ``starting``, it is starting its processes (None)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._record()
            if self.proc.poll() is not None:
                return self.proc.returncode
            if until is not None and until in self.output():
                return None
            if starting and self.starting():
                return None
            time.sleep(0.05)
        raise AssertionError(f"demo still running after {timeout}s:\n{self.output()[-3000:]}")

    def ctrl_c(self) -> None:
        """^C on the demo's terminal (without one: SIGINT to its process group, as a shell
        would send it)."""
        if self._master is not None:
            os.write(self._master, b"\x03")
        else:
            os.killpg(self.proc.pid, signal.SIGINT)

    def hang_up(self) -> None:
        """Close the terminal: the kernel sends SIGHUP to the demo, its controlling process."""
        assert self._master is not None and self._reader is not None, "not on a terminal"
        self._stop_reading.set()
        self._reader.join(5)
        os.close(self._master)
        self._master = None

    def survivors(self) -> list[int]:
        """The processes the demo started that still run: each one seen (the same process:
        same start time), any member of a group one of them leads, started since, and any with
        the demo's TMPDIR in its environment."""
        processes = _processes()
        marker = f"TMPDIR={self.tmpdir}".encode()
        left = {pid for pid in processes if pid != os.getpid() and _environ_has(pid, marker)}
        for pid in left - self.seen.keys():  # for describe() and close()
            self.seen[pid], self.seen_commands[pid] = processes[pid][2], _cmdline(pid)
        for pid, (_, pgid, start) in processes.items():
            leader = processes.get(pgid)
            in_group = pgid in self.seen and start >= self.seen[pgid]
            if leader is not None and leader[2] != self.seen.get(pgid):
                in_group = False  # the group of a process that has the leader's pid now
            if self.seen.get(pid) == start or in_group:
                left.add(pid)
        return sorted(left)

    def leftover_files(self) -> list[str]:
        return sorted(str(p.relative_to(self.tmpdir)) for p in self.tmpdir.rglob("*"))

    def wait_until_clean(self, timeout: float) -> None:
        """Nothing the demo started runs and its TMPDIR is empty, within ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.survivors() or self.leftover_files():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"after {timeout}s: still running {self.describe(self.survivors())}, "
                    f"files left {self.leftover_files()}\n{self.output()[-2000:]}"
                )
            time.sleep(0.1)

    def describe(self, pids: list[int]) -> list[str]:
        return [f"{pid} {self.seen_commands.get(pid) or _cmdline(pid)}"[:160] for pid in pids]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.survivors():  # only processes the demo started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._stop_reading.set()
        if self._reader is not None:
            self._reader.join(5)
        if self._master is not None:
            os.close(self._master)
            self._master = None
        self._out.close()
