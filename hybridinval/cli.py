"""The ``hybridinval`` command: ``hybridinval demo [--duration SECONDS] ...``,
``hybridinval relay --namespace NS ...`` and ``hybridinval hub --namespace NS --socket PATH``.

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
    hub = commands.add_parser(
        "hub",
        help="hold this host's one backplane subscription and hand it to the local processes "
        "(CacheConfig.backplane_hub)",
        description="Subscribes to the namespace's backplane on Redis and relays every message "
        "to the processes connected to --socket, so that Redis serves one subscriber per host. "
        "A process behind a hub that stops or loses Redis is blind (L1 bypassed), never stale. "
        "Stops on Ctrl-C, SIGTERM or SIGHUP.",
    )
    hub.add_argument(
        "--redis-url",
        default=os.environ.get("HYBRIDINVAL_REDIS_URL"),
        help="Redis URL of the cache, as its processes give from_url() "
        "(default: $HYBRIDINVAL_REDIS_URL)",
    )
    hub.add_argument("--namespace", required=True, help="the cache's namespace")
    hub.add_argument("--socket", required=True, help="the Unix socket to listen on")
    hub.add_argument("--client-name", default=None, help="label of its Redis connections")
    hub.add_argument(
        "--socket-mode",
        default="600",
        help="the socket's permissions, in octal (default 600: this user only; 660 lets the "
        "group's processes connect)",
    )
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
    if args.command == "hub":
        return _run_hub(args)
    raise AssertionError(f"unhandled command {args.command!r}")


def _run_hub(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .hub import Hub

    if not args.redis_url:
        print(
            "hybridinval hub: --redis-url (or $HYBRIDINVAL_REDIS_URL) is required", file=sys.stderr
        )
        return 2
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set())
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        mode = int(args.socket_mode, 8)
    except ValueError:
        print(f"hybridinval hub: --socket-mode {args.socket_mode!r} is not octal", file=sys.stderr)
        return 2
    hub = Hub(
        args.redis_url,
        args.socket,
        namespace=args.namespace,
        client_name=args.client_name,
        socket_mode=mode,
    )
    try:
        hub.start()
        print(
            f"hybridinval hub: namespace {args.namespace!r} on {args.socket}; stop with Ctrl-C",
            flush=True,
        )
        stop.wait()
    finally:
        hub.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"hybridinval hub: stopped; {hub.messages} message(s) relayed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
