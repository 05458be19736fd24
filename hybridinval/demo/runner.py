"""The run: Redis, the database and its migrations, the deployment's processes, the workload,
the stats, and the cleanup on every path."""

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
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from . import DemoError
from .history import History
from .processes import Processes, free_port, wait_for
from .report import Outcome, outcome, print_table
from .signals import Interrupts
from .workload import Workload, http

__all__ = ["run"]

log = logging.getLogger("hybridinval.demo")

STOP_TIMEOUT = 20.0


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
    from hybridinval import EmbeddedRedis

    server = EmbeddedRedis.start()
    print(f"redis:    embedded, {server.url}", file=out)
    try:
        yield server.url
    finally:
        server.stop()


def _run(args: argparse.Namespace, out: IO[str], interrupts: Interrupts) -> Outcome:
    settings = example_module("settings")
    scripts = migrations_dir()
    workdir = Path(tempfile.mkdtemp(prefix="hybridinval-demo-"))
    namespace = f"demo-{uuid.uuid4().hex[:8]}"
    processes: Processes | None = None
    try:
        with _redis(out) as redis_url:
            external_db = bool(os.environ.get(settings.DATABASE_URL))
            database_url = os.environ.get(settings.DATABASE_URL) or f"sqlite:///{workdir}/demo.db"
            print(f"database: {_safe(database_url)}", file=out)
            print(f"workdir:  {workdir}  namespace: {namespace}", file=out)
            _migrate(scripts, database_url)
            env = dict(os.environ)
            env.update(
                {
                    settings.REDIS_URL: redis_url,
                    settings.BROKER_URL: os.environ.get(settings.BROKER_URL) or redis_url,
                    settings.DATABASE_URL: database_url,
                    settings.NAMESPACE: namespace,
                    "PYTHONUNBUFFERED": "1",
                }
            )
            # Run from the empty workdir: nothing in the user's directory can shadow a module.
            processes = Processes(workdir, env, workdir, interrupts)
            try:
                return _drive(args, out, processes, redis_url, database_url, namespace, external_db)
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
    processes: Processes,
    redis_url: str,
    database_url: str,
    namespace: str,
    external_db: bool,
) -> Outcome:
    from celery import Celery

    settings = example_module("settings")

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
                f"python:{EXAMPLE}.gunicorn_conf",
                "-b",
                f"127.0.0.1:{port}",
                "-w",
                "1",
                f"{EXAMPLE}.web:app",
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
        f"demo-{namespace}",
        broker=processes.env[settings.BROKER_URL],
        backend=processes.env[settings.BROKER_URL],
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
        stats = _collect_stats(redis_url, namespace)
        if external_db:
            _delete_users(database_url, user_ids)
    finally:
        celery.close()
    return outcome(args, history, stats, processes)


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

    key = example_module("store").stats_key(namespace)
    with redis.Redis.from_url(redis_url, socket_timeout=5) as client:
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
