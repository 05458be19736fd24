"""What the unit of work adds to ``Session.commit()``: the same commits with and without it.

Each round updates one row of a tracked model and commits, alternating between a plain session
factory and an installed one on the same engine (so drift in the machine's load hits both
sides alike). Only ``commit()`` is timed: it includes the flush, the key collection, the
database COMMIT and, for the installed side, the one Redis round trip that publishes.

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
from hybridinval.sqlalchemy import install, track


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default=None, help="SQLAlchemy URL (default: a SQLite file)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=1000, help="commits per side")
    parser.add_argument("--rows", type=int, default=100)
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    url = args.db or f"sqlite:///{Path(tmp.name) / 'bench.db'}"
    schema = None
    engine = create_engine(url)
    if engine.dialect.name == "postgresql":
        schema = f"hi_bench_{uuid.uuid4().hex[:8]}"
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        engine = engine.execution_options(schema_translate_map={None: schema})
    Base.metadata.create_all(engine)
    with Session(engine) as s, s.begin():
        s.add_all(BenchRow(id=i, email=f"r{i}@x", value="v") for i in range(args.rows))

    cache = HybridCache.from_url(args.redis, namespace=f"bench-{uuid.uuid4().hex[:8]}")
    cache.wait_until_subscribed(10)
    plain = sessionmaker(engine, class_=PlainSession)
    cached = sessionmaker(engine, class_=CachedSession)
    installation = install(cached, cache)
    publish_times: list[float] = []
    publish = cache.invalidate_committed

    def timed_publish(keys: Iterable[str]) -> bool:
        started = time.perf_counter()
        try:
            return publish(keys)
        finally:
            publish_times.append(time.perf_counter() - started)

    cache.invalidate_committed = timed_publish  # type: ignore[method-assign]

    def one_commit(factory: sessionmaker[Any], i: int) -> float:
        with factory() as s:
            row = s.get(BenchRow, i % args.rows)
            assert row is not None
            row.value = f"v{i}"
            started = time.perf_counter()
            s.commit()
            return time.perf_counter() - started

    try:
        for i in range(50):  # warm up pools, statement caches, the Redis script cache
            one_commit(plain, i)
            one_commit(cached, i)
        times: dict[str, list[float]] = {"plain": [], "installed": []}
        publish_times.clear()
        sides: list[tuple[str, sessionmaker[Any]]] = [("plain", plain), ("installed", cached)]
        for i in range(args.rounds):
            # ABBA order: whichever commit runs first in a pair pays for what the previous one
            # left behind (fsync, WAL checkpoint, a cold cache line), so alternate the order.
            for name, factory in sides if i % 2 == 0 else sides[::-1]:
                times[name].append(one_commit(factory, i))
        published = installation.stats()["commits_published"]
    finally:
        installation.uninstall()
        cache.close()
        if schema is not None:
            with create_engine(url).begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()
        tmp.cleanup()

    def p90(xs: list[float]) -> float:
        return sorted(xs)[int(len(xs) * 0.9)]

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"database: {engine.dialect.name}  rounds per side: {args.rounds}  "
        f"published commits: {published}"
    )
    for name in ("plain", "installed"):
        print(
            f"  {name:>9}: median {med[name] * 1e6:8.1f} us   p90 {p90(times[name]) * 1e6:8.1f} us"
        )
    print(
        f"  overhead: +{(med['installed'] - med['plain']) * 1e6:.1f} us per commit, "
        f"ratio {med['installed'] / med['plain']:.2f}x"
    )
    print(
        f"  of which the publish (one Redis round trip, inside commit()): median "
        f"{statistics.median(publish_times) * 1e6:.1f} us"
    )


if __name__ == "__main__":
    main()
