"""The run, in the order of the package docstring, and its cleanup.

Everything the run starts or creates goes onto one :class:`contextlib.ExitStack` the moment it
exists (inside :meth:`~.signals.Interrupts.deferred`), and the stack unwinds on every way out: the
end, a failure, a signal. The watchdog (:mod:`.reaper`) learns of each process and of the
workdir at the same moment, and finishes the job if this process is killed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from . import DemoError
from .history import History
from .processes import Processes, Reaper, free_port, wait_for
from .reaper import children
from .report import Outcome, Output, format_table, outcome
from .signals import Interrupted, Interrupts
from .workload import Workload, http

__all__ = ["run"]

log = logging.getLogger("hybridinval.demo")

STOP_TIMEOUT = 20.0
"""The graceful stop at the end, when each process leaves its stats."""
HURRIED_STOP_TIMEOUT = 3.0
"""Any other stop (a signal, a failure): nobody will read the stats."""


EXAMPLE = f"{__package__}.example"
"""The example deployment: the repository's ``workers/``, which the wheel ships under this name
(an editable install maps the name onto ``workers/``)."""


def find_example() -> Path:
    """The directory of the example package (without importing it: the demo process does not
    run it), or :class:`DemoError` if this copy of hybridinval does not have it."""
    spec = importlib.util.find_spec(EXAMPLE)
    if spec is None or spec.origin is None:
        raise DemoError(
            f"{EXAMPLE} is not installed: install hybridinval (pip install 'hybridinval[demo]', "
            "or pip install -e '.[demo]' in a checkout) rather than running it from a source tree"
        )
    return Path(spec.origin).parent


def example_module(name: str) -> Any:
    """A module of the example, imported by name (mypy reads the source tree, where the example
    is ``workers/``, not ``hybridinval/demo/example/``)."""
    return importlib.import_module(f"{EXAMPLE}.{name}")


def migrations_dir() -> Path:
    """The example's Alembic scripts: ``migrations/`` in this package in a wheel (the
    repository's ``alembic/``, shipped as ``hybridinval.demo.migrations``), ``alembic/`` beside
    ``workers/`` in a checkout."""
    candidates = [Path(__file__).resolve().parent / "migrations", find_example().parent / "alembic"]
    for candidate in candidates:
        if (candidate / "env.py").is_file():
            return candidate
    raise DemoError(f"the example's migrations are in none of {', '.join(map(str, candidates))}")


def run(args: argparse.Namespace, out: IO[str] = sys.stdout) -> int:
    """Run the demo; returns the process exit status: 0 if no read was stale (and everything
    else held), 1 otherwise, 128 + the signal's number if a signal stopped it."""
    say = Output(out)
    interrupts = Interrupts()
    demo = Run(args, say, interrupts)
    result: Outcome | None = None
    failure: str | None = None
    try:
        # The handlers stay installed until the cleanup (leaving `demo`) is over.
        with interrupts.installed(), demo:
            result = demo.execute()
    except Interrupted:
        pass
    except DemoError as exc:
        failure = str(exc)
    reaped = demo.reaped
    if reaped:
        say(f"the demo's watchdog had to stop {reaped} process(es) that its cleanup left")
    if args.keep:
        say(f"kept:     {demo.workdir}")
    if interrupts.exit_status is not None:
        say(f"\ninterrupted ({interrupts.name}): everything the demo started has been stopped")
        return interrupts.exit_status
    if failure is not None or result is None:
        say(f"demo failed: {failure}")
        return 1
    say(format_table(result, args))
    if args.json:
        Path(args.json).write_text(json.dumps(result.__dict__, indent=2, default=str))
    return 0 if result.ok and not reaped else 1


@contextlib.contextmanager
def _temporary_files_in(directory: Path) -> Iterator[None]:
    """``tempfile``'s default directory is ``directory`` inside the block (the embedded Redis
    makes its directory with ``tempfile``: inside the workdir, it goes with it, whatever
    happens to this process)."""
    previous, tempfile.tempdir = tempfile.tempdir, str(directory)
    try:
        yield
    finally:
        tempfile.tempdir = previous


class Run:
    """One run of the demo; leaving ``with run:`` stops and removes all it started."""

    def __init__(self, args: argparse.Namespace, say: Output, interrupts: Interrupts) -> None:
        self.args = args
        self.say = say
        self.interrupts = interrupts
        self.cleanup = contextlib.ExitStack()
        self.namespace = f"demo-{uuid.uuid4().hex[:8]}"
        self.workdir = Path()
        self.reaped = 0

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        self.interrupts.disarm()  # from here on, a signal only hurries the cleanup
        return bool(self.cleanup.__exit__(exc_type, exc, traceback))

    def execute(self) -> Outcome:
        scripts = migrations_dir()  # (first: it says what is wrong if the example is missing)
        settings = example_module("settings")
        self._start_watchdog()
        redis_url = self._redis(settings.REDIS_URL)
        external_db = bool(os.environ.get(settings.DATABASE_URL))
        database_url = os.environ.get(settings.DATABASE_URL) or f"sqlite:///{self.workdir}/demo.db"
        self.say(f"database: {_safe(database_url)}")
        self.say(f"workdir:  {self.workdir}  namespace: {self.namespace}")
        _migrate(scripts, database_url)
        base = random.randrange(10**6, 10**9) if external_db else 1
        user_ids = [base + i for i in range(self.args.users)]
        if external_db:  # (runs once the processes have stopped: callbacks run in reverse)
            self.cleanup.callback(_delete_users, database_url, user_ids)
        env = dict(os.environ)
        env.update(
            {
                settings.REDIS_URL: redis_url,
                settings.BROKER_URL: os.environ.get(settings.BROKER_URL) or redis_url,
                settings.DATABASE_URL: database_url,
                settings.NAMESPACE: self.namespace,
                "PYTHONUNBUFFERED": "1",
                "TMPDIR": str(self.workdir),  # their temporary files go with the workdir
            }
        )
        if self.args.hub:
            env[settings.BACKPLANE_HUB] = self._hub_socket()
        else:
            env.pop(settings.BACKPLANE_HUB, None)
        queue, broker_url = f"{self.namespace}.tasks", env[settings.BROKER_URL]
        # What the run writes to its embedded Redis goes with it; from any other, it is removed
        # (once the processes have stopped).
        embedded = None if os.environ.get(settings.REDIS_URL) else redis_url
        self.cleanup.callback(
            _forget_run,
            None if embedded else redis_url,
            None if broker_url == embedded else broker_url,
            self.namespace,
            queue,
        )
        processes = Processes(self.workdir, env, self.interrupts, self.reaper)
        self.cleanup.callback(processes.stop_all, HURRIED_STOP_TIMEOUT)
        return self._drive(processes, redis_url, broker_url, queue, user_ids)

    def _start_watchdog(self) -> None:
        with self.interrupts.deferred():
            self.reaper = Reaper()
            self.cleanup.callback(self._close_watchdog)
            # Named and recorded before it exists, so that no moment leaves it unrecorded.
            self.workdir = Path(tempfile.gettempdir()) / f"hybridinval-demo-{uuid.uuid4().hex}"
            if not self.args.keep:
                self.reaper.watch_dir(self.workdir)
                self.cleanup.callback(shutil.rmtree, self.workdir, ignore_errors=True)
            self.workdir.mkdir(mode=0o700)

    def _hub_socket(self) -> str:
        """A path for the hub's socket: in the workdir unless that is too long for a socket's
        address, then in a short directory of its own (watched and removed like the workdir)."""
        path = self.workdir / "hub.sock"
        if len(os.fsencode(str(path))) <= 100:
            return str(path)
        with self.interrupts.deferred():
            short = Path(tempfile.mkdtemp(prefix="hi-hub-", dir="/tmp"))
            self.reaper.watch_dir(short)
            self.cleanup.callback(shutil.rmtree, short, ignore_errors=True)
        return str(short / "hub.sock")

    def _close_watchdog(self) -> None:
        self.reaped = self.reaper.close()

    def _redis(self, variable: str) -> str:
        url = os.environ.get(variable)
        if url:
            self.say(f"redis:    {url} ({variable})")
            return url
        from hybridinval import EmbeddedRedis, HybridInvalError

        with self.interrupts.deferred(), _temporary_files_in(self.workdir):
            before = set(children(os.getpid()))
            try:
                server = EmbeddedRedis.start()
            except HybridInvalError as exc:
                raise DemoError(f"the embedded Redis did not start: {exc}") from exc
            finally:
                for pid in sorted(set(children(os.getpid())) - before):
                    self.reaper.watch(pid)
            self.cleanup.callback(server.stop)
        self.say(f"redis:    embedded, {server.url}")
        return server.url

    def _drive(
        self,
        processes: Processes,
        redis_url: str,
        broker_url: str,
        queue: str,
        user_ids: list[int],
    ) -> Outcome:
        from celery import Celery

        args, namespace = self.args, self.namespace
        ports = [free_port() for _ in range(args.web)]
        api_ports = [free_port() for _ in range(args.api)]
        web_urls = [f"http://127.0.0.1:{port}" for port in ports]
        api_urls = [f"http://127.0.0.1:{port}" for port in api_ports]
        python = sys.executable
        hub = processes.env.get("HYBRIDINVAL_BACKPLANE_HUB")
        if hub:
            processes.start(
                "hub",
                [python, "-m", "hybridinval.cli", "hub", "--redis-url", redis_url,
                 "--namespace", namespace, "--socket", hub],
            )  # fmt: skip
            wait_for("the hub's socket", lambda: os.path.exists(hub), processes)
        for i, port in enumerate(api_ports):
            processes.start(
                f"api-{i + 1}",
                [
                    python,
                    "-m",
                    "uvicorn",
                    f"{EXAMPLE}.api:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--no-access-log",
                ],
            )
        for i, port in enumerate(ports):
            processes.start(
                f"web-{i + 1}",
                [
                    python,
                    "-m",
                    "gunicorn",
                    "-c",
                    f"python:{EXAMPLE}.gunicorn_conf",
                    "-b",
                    f"127.0.0.1:{port}",
                    "-w",
                    "1",
                    f"{EXAMPLE}.web:app",
                ],
            )
        processes.start(
            "worker",
            [
                python,
                "-m",
                "celery",
                "-A",
                f"{EXAMPLE}.celery_app",
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
            f"demo-{namespace}", broker=broker_url, backend=broker_url, set_as_current=False
        )
        self.cleanup.callback(celery.close)
        # Abandoned driver threads may still wait on results when Redis goes: no retry noise.
        self.cleanup.callback(logging.getLogger("celery.backends.redis").setLevel, logging.CRITICAL)
        history = History()
        for url in web_urls:
            wait_for(f"web process at {url}", _healthy(url), processes)
        for url in api_urls:
            wait_for(f"asyncio API process at {url}", _healthy(url), processes)
        wait_for(
            "the Celery worker",
            lambda: bool(celery.send_task("workers.stats", queue=queue).get(timeout=5)),
            processes,
        )
        self.say(
            f"started:  {args.web} web processes (Flask), {args.api} asyncio API processes "
            f"(FastAPI), a Celery worker with {args.concurrency} children"
            + (", all behind a host hub" if hub else "")
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
        workload = Workload(web_urls + api_urls, celery, queue, user_ids, history, args.readers)
        workload.start()
        self.cleanup.callback(workload.stop.set)  # daemon threads: abandoned, not waited for
        _progress(args, self.say, history, workload, processes)
        workload.join()
        for started in processes.started:
            started.note_members()
        # Stop the deployment before reading the stats: each process leaves them as it exits.
        processes.stop_all(STOP_TIMEOUT)
        stats = _collect_stats(redis_url, namespace)
        return outcome(args, history, stats, processes)


def _healthy(url: str) -> Callable[[], bool]:
    return lambda: bool(http("GET", f"{url}/healthz").get("ok"))


def _progress(
    args: argparse.Namespace,
    say: Output,
    history: History,
    workload: Workload,
    processes: Processes,
) -> None:
    tty = say.isatty()
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
            say(f"\r{line}" if tty else line, end="" if tty else "\n")
        time.sleep(0.25 if tty else 0.1)
    if tty:
        say()


def _collect_stats(redis_url: str, namespace: str) -> dict[str, dict[str, Any]]:
    import redis

    key = example_module("store").stats_key(namespace)
    with redis.Redis.from_url(redis_url, socket_timeout=5) as client:
        raw: dict[bytes, bytes] = client.hgetall(key)
        client.delete(key)
    return {k.decode(): json.loads(v) for k, v in raw.items()}


def _forget_run(redis_url: str | None, broker_url: str | None, namespace: str, queue: str) -> None:
    """Remove what the run wrote to a Redis (``redis_url``) and a broker it did not start: its
    namespace's keys, and its Celery queue (whose bindings kombu would keep forever)."""
    try:
        if redis_url:
            import redis

            from hybridinval.keyspace import Keyspace

            with redis.Redis.from_url(redis_url, socket_timeout=5) as client:
                keys = list(client.scan_iter(match=Keyspace(namespace).pattern, count=1000))
                for i in range(0, len(keys), 500):
                    client.delete(*keys[i : i + 500])
        if broker_url:
            from celery import Celery

            app = Celery(f"demo-{namespace}", broker=broker_url, set_as_current=False)
            app.conf.task_default_queue = queue  # as the example's app has it: its exchange too
            with app.connection_for_write() as connection:
                bound = app.amqp.queues[queue](connection.default_channel)
                bound.declare()  # (a channel deletes the bindings it knows of)
                bound.delete()
            app.close()
    except Exception as exc:  # the cleanup goes on; the user is told what may be left
        log.warning("could not remove the demo's keys and queue (%s): %s", namespace, exc)


def _delete_users(database_url: str, user_ids: list[int]) -> None:
    """Remove the users the run created in a database it did not create."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            for user_id in user_ids:
                conn.execute(text("DELETE FROM cards WHERE user_id = :id"), {"id": user_id})
                conn.execute(text("DELETE FROM users WHERE id = :id"), {"id": user_id})
    except Exception as exc:  # the cleanup goes on; the user is told what may be left
        log.warning("could not delete the %d users the demo created: %s", len(user_ids), exc)
    finally:
        engine.dispose()


def _migrate(scripts: Path, database_url: str) -> None:
    """``alembic upgrade head`` with the example's scripts (no ``alembic.ini``: the options it
    would give are set here)."""
    from alembic import command
    from alembic import config as alembic_config

    config = alembic_config.Config()
    config.set_main_option("script_location", str(scripts))
    config.set_main_option("path_separator", "os")
    config.set_main_option("example_package", EXAMPLE)
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    try:
        command.upgrade(config, "head")
    except ModuleNotFoundError as exc:  # the database's driver, e.g. psycopg for PostgreSQL
        hint = " (pip install 'hybridinval[postgres]')" if "psycopg" in str(exc.name) else ""
        raise DemoError(
            f"migrating {_safe(database_url)} needs {exc.name!r}, which is not installed{hint}"
        ) from exc


def _safe(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url
