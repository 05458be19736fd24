"""``hybridinval relay``: an outbox relay as a process of its own, for deployments that prefer
one (or a few) to a relay in every process (``install(..., outbox=Outbox(relay=False))``).

Runs until SIGINT, SIGTERM or SIGHUP, then deletes what it published and exits 0."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger("hybridinval.sqlalchemy")


def run(args: Any) -> int:
    from sqlalchemy import MetaData, create_engine

    from .._cache import HybridCache
    from ._outbox import DEFAULT_TABLE_NAME, Outbox, outbox_table
    from ._relay import OutboxRelay

    for name in ("database_url", "redis_url"):
        if not getattr(args, name):
            flag = "--" + name.replace("_", "-")
            env = "HYBRIDINVAL_" + name.upper()
            raise SystemExit(f"hybridinval relay: {flag} (or ${env}) is required")
    options = Outbox(grace=args.grace, interval=args.interval, batch=args.batch)
    table = outbox_table(MetaData(), args.table or DEFAULT_TABLE_NAME, schema=args.schema)
    engine = create_engine(args.database_url)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {
        sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    cache = HybridCache.from_url(args.redis_url, namespace=args.namespace)
    relay = OutboxRelay(
        engine,
        table,
        cache,
        grace=options.grace,
        interval=options.interval,
        batch=options.batch,
    )
    try:
        relay.start()
        print(
            f"hybridinval relay: {table.fullname} of {engine.url!r} -> namespace "
            f"{args.namespace!r}; stop with Ctrl-C",
            flush=True,
        )
        while not stop.wait(1.0):
            if not relay.running:
                log.error("the relay thread ended")
                return 1
    finally:
        relay.stop()
        cache.close()
        engine.dispose()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stats = relay.stats()
    print(f"hybridinval relay: stopped; {stats['relay_rows_published']} row(s) republished")
    return 0
