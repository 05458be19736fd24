"""Child-process entry points for the SQLAlchemy tests (importable by name, as spawn requires).

Each child builds its own cache, engine and installed session factory, as a real web or worker
process would. Results travel back as plain tuples or JSON files.
"""

from __future__ import annotations

import json
import random
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from queue import Queue
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from hybridinval import HybridCache
from hybridinval.sqlalchemy import cached, install
from support.inspect import entries

from .sa_models import DbSpec, Item, TrackedSession, User


def slow_loader_reader(
    redis_url: str, namespace: str, db: DbSpec, loaded: Event, go: Event, out: Queue[Any]
) -> None:
    """Load user:1 through a session, but hold the row read until the parent says go.

    The parent commits a change (and publishes) between our read and our store: neither our L1
    nor L2 may keep what we read.
    """
    cache = HybridCache.from_url(redis_url, namespace=namespace)
    engine = db.engine()
    factory = sessionmaker(engine, class_=TrackedSession)
    installation = install(factory, cache)
    try:
        assert cache.wait_until_subscribed(10)
        with factory() as session:

            def loader() -> str:
                name: str = session.execute(select(User.name).where(User.id == 1)).scalar_one()
                loaded.set()
                if not go.wait(60):
                    raise TimeoutError("parent never said go")
                return name

            first = cached(session).get_or_set("user:1", loader)
        in_l1 = entries(cache).get("user:1", [None])[0]
        payload, _version = cache.l2.get("user:1")
        in_l2 = None if payload is None else cache.serializer.loads(payload)
        with factory() as session:
            again = cached(session).get_or_set(
                "user:1",
                lambda: session.execute(select(User.name).where(User.id == 1)).scalar_one(),
            )
        out.put(("ok", first, in_l1, in_l2, again, cache.stats()["l2_cas_rejections"]))
    except BaseException as exc:
        out.put(("error", repr(exc)))
        raise
    finally:
        installation.uninstall()
        cache.close()
        engine.dispose()


def soak_writer(
    redis_url: str,
    namespace: str,
    db: DbSpec,
    rows: int,
    commits: int,
    seed: int,
    ready: Event,
    start: Event,
    out_path: str,
    cache_options: dict[str, Any] | None = None,
) -> None:
    """Commit ``commits`` random updates to ``rows`` items, with rolled-back savepoints and
    rolled-back transactions mixed in; log (row, value, time before commit(), time commit()
    returned) for each commit that changed a row. A commit whose publish failed (a fault) is
    logged once the background retry has published it, with that time as the second: the
    promise is about reads after the invalidation went out, and the delay is reported."""
    rng = random.Random(seed)
    cache = HybridCache.from_url(redis_url, namespace=namespace, **(cache_options or {}))
    engine = db.engine()
    factory = sessionmaker(engine, class_=TrackedSession)
    installation = install(factory, cache)
    log: list[tuple[int, str, float, float]] = []
    rolled_back: list[str] = []
    delays: list[float] = []
    try:
        assert cache.wait_until_subscribed(10)
        ready.set()
        if not start.wait(60):
            raise TimeoutError("no start signal")
        seq = 0
        while len(log) < commits:
            seq += 1
            row = rng.randrange(rows)
            value = f"w{seq}"
            kind = rng.random()
            with factory() as session:
                if kind < 0.1:
                    session.get(Item, row).value = value + "-rolled-back"
                    rolled_back.append(value + "-rolled-back")
                    session.flush()
                    session.rollback()
                    continue
                if kind < 0.25:
                    other = rng.randrange(rows)
                    savepoint = session.begin_nested()
                    session.get(Item, other).value = value + "-savepoint"
                    rolled_back.append(value + "-savepoint")
                    session.flush()
                    savepoint.rollback()
                session.get(Item, row).value = value
                before = time.time()
                session.commit()
                after = time.time()
                if cache.pending_retries():
                    while cache.pending_retries():
                        time.sleep(0.001)
                    delays.append(time.time() - after)
                    after = time.time()
                log.append((row, value, before, after))
            if seq % 8 == 0:
                time.sleep(0.002)  # let the readers run on a 2-core machine
        stats = cache.stats()
        Path(out_path).write_text(
            json.dumps(
                {
                    "commits": log,
                    "rolled_back": rolled_back,
                    "publish_failures": stats["publish_failures"],
                    "publish_delays": delays,
                }
            )
        )
    finally:
        installation.uninstall()
        cache.close()
        engine.dispose()


def soak_reader(
    redis_url: str,
    namespace: str,
    db: DbSpec,
    rows: int,
    seed: int,
    ready: Event,
    start: Event,
    writer_done: Event,
    settled: Event,
    out_path: str,
    cache_options: dict[str, Any] | None = None,
) -> None:
    """Loop get_or_set over the items until the writer is done; log every read as
    (row, value, start, end); after the settle signal, dump L1 and the backplane stats."""
    rng = random.Random(seed)
    cache = HybridCache.from_url(redis_url, namespace=namespace, **(cache_options or {}))
    engine = db.engine()
    factory = sessionmaker(engine, class_=TrackedSession)
    installation = install(factory, cache)
    reads: list[tuple[int, str, float, float]] = []
    try:
        assert cache.wait_until_subscribed(10)
        ready.set()
        if not start.wait(60):
            raise TimeoutError("no start signal")
        n = 0
        while not writer_done.is_set():
            row = rng.randrange(rows)
            with factory() as session:
                began = time.time()
                value = cached(session).get_or_set(
                    f"item:{row}",
                    lambda row=row, session=session: session.execute(
                        select(Item.value).where(Item.id == row)
                    ).scalar_one(),
                )
                reads.append((row, value, began, time.time()))
            n += 1
            if n % 4 == 0:
                time.sleep(0.001)  # pace: a reader that never yields starves 2 cores
        if not settled.wait(60):
            raise TimeoutError("no settle signal")
        l1 = {k: e[0] for k, e in list(entries(cache).items())}
        Path(out_path).write_text(
            json.dumps(
                {
                    "reads": reads,
                    "l1": l1,
                    "stats": cache.stats(),
                }
            )
        )
    finally:
        installation.uninstall()
        cache.close()
        engine.dispose()


def outbox_writer(
    redis_url: str,
    namespace: str,
    db: DbSpec,
    user_id: int,
    new_name: str,
    outbox: bool,
    cut_redis: bool,
    conn: Any,
) -> None:
    """Commit ``users[user_id].name = new_name`` through an installed session factory, and die
    by SIGKILL at a forced point after the COMMIT, before the invalidation reached Redis.

    ``cut_redis=False``: killed inside the publish, before it sends anything. ``cut_redis=True``:
    the parent cuts this process's Redis link (``redis_url`` is a proxy) when told "cut"; the
    publish fails and is queued for retry in memory; the parent is told, and kills this process.
    """
    import os
    import signal

    from hybridinval.sqlalchemy import Outbox

    cache = HybridCache.from_url(redis_url, namespace=namespace)
    engine = db.engine()
    factory = sessionmaker(engine, class_=TrackedSession)
    install(factory, cache, outbox=Outbox(relay=False) if outbox else False)
    assert cache.wait_until_subscribed(10)
    publish = cache.invalidate_committed

    def die_before_publishing(keys: Any, **options: Any) -> bool:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")

    def publish_then_report(keys: Any, **options: Any) -> bool:
        sent = publish(keys, **options)
        conn.send(("published", sent))
        time.sleep(3600)  # the parent kills this process now
        return sent

    cache.invalidate_committed = (  # type: ignore[method-assign]
        publish_then_report if cut_redis else die_before_publishing
    )
    conn.send("ready")
    if cut_redis:
        assert conn.recv() == "cut"
    with factory.begin() as session:
        user = session.get(User, user_id)
        assert user is not None
        user.name = new_name
    raise AssertionError("the writer outlived its commit")


def outbox_relay(
    redis_url: str,
    namespace: str,
    db: DbSpec,
    batch: int,
    ready: Event,
    go: Event,
    out_path: str,
) -> None:
    """Run an outbox relay until the table holds no row of ``namespace``; write the keys each
    Redis round trip carried, in order, to ``out_path`` (JSON)."""
    from hybridinval.sqlalchemy import OutboxRelay

    from .sa_models import OUTBOX
    from .sa_spy import record_invalidations

    cache = HybridCache.from_url(redis_url, namespace=namespace)
    engine = db.engine()
    sent = record_invalidations(cache)
    relay = OutboxRelay(engine, OUTBOX, cache, grace=0.0, interval=0.05, batch=batch)
    with engine.connect():  # connected and imported: the race starts at `go`
        pass
    ready.set()
    go.wait(30)
    while relay.run_once():
        pass
    Path(out_path).write_text(json.dumps(sent))
    relay.stop()
    cache.close()
    engine.dispose()
