"""Run a real ``celery worker`` (or any server) subprocess for a test, and always stop it.

The worker runs in a new session (its own process group), so the test can end it and every
child it forked, and only those: the group id is the one this helper created, never looked up by
name. :meth:`CeleryWorker.stop` is a warm shutdown (SIGTERM to the main process, bounded wait),
then SIGKILL to the group if anything is left; :meth:`CeleryWorker.close` is safe to call from a
``finally`` and again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .closing import ClosesOnExit

__all__ = ["CeleryWorker", "Spawned", "descendants", "group_members", "pid_alive"]

TESTS_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = TESTS_DIR.parent


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != b"Z"


def group_members(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (Linux ``/proc``)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.getpgid(pid) == pgid and pid_alive(pid):
                members.append(pid)
        except (ProcessLookupError, PermissionError):
            continue
    return members


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (Linux ``/proc``), found through parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if pid_alive(child):
                found.append(child)
                todo.append(child)
    return found


class Spawned(ClosesOnExit):
    """A command in a new session (its own process group), output to ``log_path``."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str],
        log_path: Path,
        cwd: Path | None = None,
        extra_pythonpath: Sequence[Path] = (TESTS_DIR,),
    ) -> None:
        self.log_path = log_path
        full_env = dict(os.environ)
        full_env.update(env)
        paths = [str(p) for p in (*extra_pythonpath, REPO_ROOT)]
        if full_env.get("PYTHONPATH"):
            paths.append(full_env["PYTHONPATH"])
        full_env["PYTHONPATH"] = os.pathsep.join(paths)
        full_env["PYTHONUNBUFFERED"] = "1"
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            list(args),
            env=full_env,
            cwd=cwd or REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.proc.pid  # also the process group id (start_new_session)
        self.exit_code: int | None = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def members(self) -> list[int]:
        """Live processes of the worker's group (main process and pool children)."""
        return group_members(self.pid)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Warm shutdown; returns the exit code, or None if it had to be killed."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.exit_code = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.exit_code = None
        else:
            self.exit_code = self.proc.returncode
        self._kill_group()
        return self.exit_code

    def _kill_group(self) -> None:
        deadline = time.monotonic() + 10
        while self.members() and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def close(self) -> None:
        """Stop (if running) and release the log file. Idempotent."""
        try:
            if self.proc.poll() is None or self.members():
                self.stop(timeout=15.0)
        finally:
            if not self._log.closed:
                self._log.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pid={self.pid} alive={self.alive()}>"


class CeleryWorker(Spawned):
    """``python -m celery -A <app> worker`` with the given options and environment."""

    def __init__(
        self,
        app: str,
        *,
        env: Mapping[str, str],
        log_path: Path,
        pool: str = "prefork",
        concurrency: int = 2,
        queues: str | None = None,
        extra_args: Sequence[str] = (),
        cwd: Path | None = None,
        extra_pythonpath: Sequence[Path] = (TESTS_DIR,),
    ) -> None:
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "-P",
            pool,
            "-c",
            str(concurrency),
            "--loglevel",
            "INFO",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            "-n",
            f"w{os.getpid()}-{time.monotonic_ns()}@%h",
            *(["-Q", queues] if queues else []),
            *extra_args,
        ]
        super().__init__(
            args, env=env, log_path=log_path, cwd=cwd, extra_pythonpath=extra_pythonpath
        )
