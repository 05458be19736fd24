"""What the unit of work adds to ``Session.commit()``: the same commits without it, with it,
and with it and the transactional outbox (``install(..., outbox=True)``).

Each round updates one row of a tracked model and commits once on each side, a plain session
factory, an installed one and one installed with an outbox, all on the same engine, in an order
that rotates every round (so drift in the machine's load hits every side alike). Only
``commit()`` is timed: it includes the flush, the key collection, the database COMMIT and, for
the installed sides, the one Redis round trip that publishes (and, with the outbox, the INSERT
of its row before the COMMIT; the row's delete runs on the relay's thread).

    python benchmarks/commit_overhead.py                       # SQLite file + local Redis
    python benchmarks/commit_overhead.py --db postgresql+psycopg://postgres@127.0.0.1:5432/test

Prints medians, p90 and the ratio installed/plain. Tables are created in a fresh schema
(PostgreSQL) or a temporary file (SQLite) and removed afterwards.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import String, create_engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from hybridinval import HybridCache
from hybridinval.sqlalchemy import install, outbox_table, track


class Base(DeclarativeBase):
    pass


class BenchRow(Base):
    __tablename__ = "hi_bench_rows"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(100))
    value: Mapped[str] = mapped_column(String(100))


track(BenchRow, keys=["bench:{id}", "bench_by_email:{email}"])


class PlainSession(Session):
    pass


class CachedSession(Session):
    pass


class OutboxSession(Session):
    pass


def measure(
    db: str | None = None,
    redis_url: str = "redis://127.0.0.1:6379/0",
    rounds: int = 1000,
    rows: int = 100,
) -> dict[str, Any]:
    """Median and p90 ``commit()`` time of each side (µs), the ratios, and the outbox's row
    counts, from one run."""
    tmp = tempfile.TemporaryDirectory()
    url = db or f"sqlite:///{Path(tmp.name) / 'bench.db'}"
    schema = None
    engine = create_engine(url)
    if engine.dialect.name == "postgresql":
        schema = f"hi_bench_{uuid.uuid4().hex[:8]}"
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        engine = engine.execution_options(schema_translate_map={None: schema})
    outbox_table(Base.metadata)
    Base.metadata.create_all(engine)
    with Session(engine) as s, s.begin():
        s.add_all(BenchRow(id=i, email=f"r{i}@x", value="v") for i in range(rows))

    cache = HybridCache.from_url(redis_url, namespace=f"bench-{uuid.uuid4().hex[:8]}")
    cache.wait_until_subscribed(10)
    plain = sessionmaker(engine, class_=PlainSession)
    cached = sessionmaker(engine, class_=CachedSession)
    installation = install(cached, cache)
    with_outbox = sessionmaker(engine, class_=OutboxSession)
    outbox_installation = install(with_outbox, cache, outbox=True)
    publish_times: list[float] = []
    publish = cache.invalidate_committed

    def timed_publish(keys: Iterable[str], **options: Any) -> bool:
        started = time.perf_counter()
        try:
            return publish(keys, **options)
        finally:
            publish_times.append(time.perf_counter() - started)

    cache.invalidate_committed = timed_publish  # type: ignore[method-assign]

    def one_commit(factory: sessionmaker[Any], i: int) -> float:
        with factory() as s:
            row = s.get(BenchRow, i % rows)
            assert row is not None
            row.value = f"v{i}"
            started = time.perf_counter()
            s.commit()
            return time.perf_counter() - started

    try:
        for i in range(50):  # warm up pools, statement caches, the Redis script cache
            one_commit(plain, i)
            one_commit(cached, i)
            one_commit(with_outbox, i)
        times: dict[str, list[float]] = {"plain": [], "installed": [], "outbox": []}
        publish_times.clear()
        sides: list[tuple[str, sessionmaker[Any]]] = [
            ("plain", plain),
            ("installed", cached),
            ("outbox", with_outbox),
        ]
        for i in range(rounds):
            # Rotated: whichever commit runs first pays for what the previous one left behind
            # (fsync, WAL checkpoint, a cold cache line), so each side takes each place in turn.
            shift = i % len(sides)
            for name, factory in sides[shift:] + sides[:shift]:
                times[name].append(one_commit(factory, i))
        published = installation.stats()["commits_published"]
        outbox_stats = outbox_installation.stats()
    finally:
        installation.uninstall()
        outbox_installation.uninstall()
        cache.close()
        if schema is not None:
            with create_engine(url).begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()
        tmp.cleanup()

    def p90(xs: list[float]) -> float:
        return sorted(xs)[int(len(xs) * 0.9)]

    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "database": engine.dialect.name,
        "rounds": rounds,
        "published_commits": published,
        "median_us": {k: round(v * 1e6, 1) for k, v in med.items()},
        "p90_us": {k: round(p90(v) * 1e6, 1) for k, v in times.items()},
        "ratio_to_plain": {k: round(med[k] / med["plain"], 2) for k in ("installed", "outbox")},
        "outbox_to_installed": round(med["outbox"] / med["installed"], 2),
        "publish_median_us": round(statistics.median(publish_times) * 1e6, 1),
        "outbox_rows": {
            "written": outbox_stats["outbox_rows_written"],
            "deleted": outbox_stats["outbox_rows_deleted"],
            "republished": outbox_stats["relay_rows_published"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default=None, help="SQLAlchemy URL (default: a SQLite file)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=1000, help="commits per side")
    parser.add_argument("--rows", type=int, default=100)
    args = parser.parse_args()
    r = measure(args.db, args.redis, args.rounds, args.rows)
    print(
        f"database: {r['database']}  rounds per side: {r['rounds']}  "
        f"published commits: {r['published_commits']}"
    )
    for name in ("plain", "installed", "outbox"):
        print(
            f"  {name:>9}: median {r['median_us'][name]:8.1f} us   p90 {r['p90_us'][name]:8.1f} us"
        )
    for name in ("installed", "outbox"):
        print(
            f"  {name} overhead: +{r['median_us'][name] - r['median_us']['plain']:.1f} us "
            f"per commit, ratio {r['ratio_to_plain'][name]:.2f}x"
        )
    print(f"  outbox vs installed: ratio {r['outbox_to_installed']:.2f}x")
    rows_ = r["outbox_rows"]
    print(
        f"  outbox rows written {rows_['written']}, deleted {rows_['deleted']}, "
        f"republished by the relay {rows_['republished']}"
    )
    print(
        f"  of which the publish (one Redis round trip, inside commit()): median "
        f"{r['publish_median_us']:.1f} us"
    )


if __name__ == "__main__":
    main()
