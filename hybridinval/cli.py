"""The ``hybridinval`` command: ``hybridinval demo [--duration SECONDS] ...`` and
``hybridinval relay --namespace NS ...``.

Subcommands are registered in :func:`build_parser`; each is implemented in its own module and
imported only when run, so ``hybridinval --help`` needs none of the optional dependencies.

This module must never do work at import, and never swallow a subcommand's exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .errors import MissingExtraError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridinval",
        description="An in-process L1 cache over Redis, kept coherent by commit-driven "
        "invalidation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run web processes and a Celery worker on embedded Redis and SQLite, drive a "
        "workload, and check that no read was stale",
        description="Runs the example deployment (the repository's workers/, which the "
        "package ships) on this machine: an embedded Redis and a temporary SQLite database "
        "unless HYBRIDINVAL_REDIS_URL/HYBRIDINVAL_DATABASE_URL are set, 2 web processes and a "
        "Celery worker with 2 children; drives reads and committed updates, then prints "
        "per-process stats. Exits 1 on any stale read. Ctrl-C, SIGTERM or closing the "
        "terminal stops everything it started.",
    )
    from .demo import add_arguments

    add_arguments(demo)
    relay = commands.add_parser(
        "relay",
        help="republish the invalidations of committed transactions whose writers did not "
        "(the transactional outbox's relay, as a process of its own)",
        description="Republishes outbox rows older than --grace, oldest first, and deletes "
        "them; several relays may run at once. Needs the sqlalchemy extra. Stops on Ctrl-C, "
        "SIGTERM or SIGHUP.",
    )
    _add_relay_arguments(relay)
    return parser


def _add_relay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        default=os.environ.get("HYBRIDINVAL_DATABASE_URL"),
        help="SQLAlchemy URL of the database that holds the outbox (a synchronous driver; "
        "default: $HYBRIDINVAL_DATABASE_URL)",
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("HYBRIDINVAL_REDIS_URL"),
        help="Redis URL of the cache (default: $HYBRIDINVAL_REDIS_URL)",
    )
    parser.add_argument("--namespace", required=True, help="the cache's namespace")
    parser.add_argument("--table", default=None, help="outbox table (default: hybridinval_outbox)")
    parser.add_argument("--schema", default=None, help="the outbox table's schema")
    parser.add_argument("--grace", type=float, default=1.0, help="seconds before a row is due")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between looks")
    parser.add_argument("--batch", type=int, default=500, help="rows per Redis round trip")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command == "demo":
        from .demo import DemoError, run

        try:
            return run(args)
        except MissingExtraError as exc:  # one line, naming the extra to install
            print(exc, file=sys.stderr)
            return 1
        except DemoError as exc:
            print(f"hybridinval demo: {exc}", file=sys.stderr)
            return 1
    if args.command == "relay":
        try:
            from .sqlalchemy._relay_cli import run as run_relay
        except ImportError as exc:
            print(
                f"hybridinval relay needs the sqlalchemy extra: pip install "
                f"'hybridinval[sqlalchemy]' ({exc})",
                file=sys.stderr,
            )
            return 1
        return run_relay(args)
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
