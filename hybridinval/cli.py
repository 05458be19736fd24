"""The ``hybridinval`` command: ``hybridinval demo [--duration SECONDS] ...``.

Subcommands are registered in :func:`build_parser`; each is implemented in its own module and
imported only when run, so ``hybridinval --help`` needs none of the optional dependencies.

This module must never do work at import, and never swallow a subcommand's exit status.
"""

from __future__ import annotations

import argparse
import logging
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
    return parser


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
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
