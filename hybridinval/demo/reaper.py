"""The demo's watchdog: when the demo process ends, however it ends (SIGKILL, a crash, or after
its own cleanup), this stops whatever the demo started that is still running and removes the
demo's temporary directory.

The demo starts it first (``python -m hybridinval.demo.reaper``), in a session of its own, so
that neither a terminal's Ctrl-C nor its hangup reaches it, and writes one line to its stdin
for each thing to clean up, as soon as that thing exists::

    process <pid> <start>    a process the demo started: it and every process of the group it
                             leads (gunicorn's workers, Celery's children)
    dir <path>               a directory to remove once those processes are gone

``<start>`` is the process's start time (``/proc/<pid>/stat``), so that a pid the system has
since given to another process is never taken for it. End of file (the demo has exited) starts
the cleanup: SIGTERM to each recorded process, up to :data:`GRACE` seconds for them and their
groups to exit, then SIGKILL to what is left; then the directories go. After a clean demo
there is nothing left to do. The exit status is the number of processes it had to signal.

This module must never signal a process it was not told about or that does not descend from
one (same group, started later), and must import only the standard library: the demo's own
process uses its helpers too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

__all__ = ["GRACE", "ProcStat", "Record", "children", "group_members", "main", "start_time"]

GRACE = 5.0
"""Seconds between SIGTERM and SIGKILL."""
KILL_TIMEOUT = 10.0

PROC = Path("/proc")


class ProcStat(NamedTuple):
    pid: int
    ppid: int
    pgid: int
    zombie: bool
    start: int  # clock ticks since boot


def _stat(pid: int | str) -> ProcStat | None:
    try:
        raw = (PROC / str(pid) / "stat").read_bytes()
        # The fields after the command (which may hold spaces and parentheses); field 22 of
        # proc(5), the start time, is the 20th of them.
        fields = raw.rsplit(b")", 1)[1].split()
        state, ppid, pgid, start = fields[0], int(fields[1]), int(fields[2]), int(fields[19])
        return ProcStat(int(pid), ppid, pgid, state == b"Z", start)
    except (OSError, IndexError, ValueError):
        return None


def _all() -> Iterator[ProcStat]:
    """Every process (Linux ``/proc``; elsewhere none)."""
    with contextlib.suppress(OSError):
        for entry in os.listdir(PROC):
            if entry.isdigit() and (stat := _stat(entry)) is not None:
                yield stat


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None if it is gone or unknowable."""
    stat = _stat(pid)
    return None if stat is None else stat.start


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (without ``/proc``: the leader, if it lives)."""
    if not PROC.is_dir():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, 0)
            return [pgid]
        return []
    return [s.pid for s in _all() if s.pgid == pgid and not s.zombie]


def children(pid: int) -> list[int]:
    """Live child processes of ``pid``."""
    return [s.pid for s in _all() if s.ppid == pid and not s.zombie]


class Record(NamedTuple):
    """A process the demo started (and the group it may lead)."""

    pid: int
    start: int | None  # None: not known (no /proc)

    def line(self) -> str:
        return f"process {self.pid} {'-' if self.start is None else self.start}"

    def live(self, processes: Iterable[ProcStat]) -> list[int]:
        """The live processes this record covers: the process itself and the members of the
        group it leads that started no earlier than it; none once its pid is another's."""
        if self.start is None:  # no /proc: trust the group id while its leader lives
            return group_members(self.pid)
        processes = list(processes)
        leader = next((s for s in processes if s.pid == self.pid), None)
        if leader is not None and leader.start != self.start:
            return []  # the pid, and any group of that id, belong to another process now
        started = self.start
        return [
            s.pid
            for s in processes
            if not s.zombie and (s.pid == self.pid or (s.pgid == self.pid and s.start >= started))
        ]


def read_records(stream: BinaryIO) -> tuple[list[Record], list[Path]]:
    """The demo's lines, until end of file."""
    records, dirs = [], []
    for raw in stream:
        kind, _, rest = raw.decode(errors="replace").strip().partition(" ")
        if kind == "process":
            pid, _, start = rest.partition(" ")
            records.append(Record(int(pid), None if start == "-" else int(start)))
        elif kind == "dir" and rest:
            dirs.append(Path(rest))
    return records, dirs


def _live(records: list[Record]) -> list[int]:
    processes = list(_all()) if PROC.is_dir() else []
    return sorted({pid for record in records for pid in record.live(processes)})


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def reap(records: list[Record], dirs: list[Path]) -> int:
    """Stop what the records cover, remove ``dirs``; the number of processes signalled."""
    live = _live(records)
    signalled = set(live)
    _signal((r.pid for r in records if r.pid in live), signal.SIGTERM)  # each stops its group
    deadline = time.monotonic() + GRACE
    while live and time.monotonic() < deadline:
        time.sleep(0.1)
        live = _live(records)
    deadline = time.monotonic() + KILL_TIMEOUT
    while live and time.monotonic() < deadline:
        signalled |= set(live)
        _signal(live, signal.SIGKILL)
        time.sleep(0.05)
        live = _live(records)
    for directory in dirs:
        shutil.rmtree(directory, ignore_errors=True)
    return len(signalled)


def main() -> int:
    # A terminal's signals are meant for the demo, which is still stopping everything itself.
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    records, dirs = read_records(sys.stdin.buffer)
    return min(reap(records, dirs), 100)


if __name__ == "__main__":
    sys.exit(main())
