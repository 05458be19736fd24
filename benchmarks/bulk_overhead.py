"""What the unit of work adds to bulk statements: the same UPDATEs with and without it.

Each round runs one bulk statement over ``--rows`` rows of a tracked model and commits,
alternating between a plain session factory and an installed one on the same engine (so drift
in the machine's load hits both sides alike). The installed side pays for the key SELECT (locked,
with the statement's own WHERE), the read-back by primary key when a key field changes, and the
publish of the keys.

    python benchmarks/bulk_overhead.py --db postgresql+psycopg://postgres@127.0.0.1:5432/test

Prints the median per side and the ratio installed/plain. Tables live in a fresh schema that is
dropped afterwards.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import String, create_engine, insert, text, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from hybridinval import HybridCache
from hybridinval.sqlalchemy import install, track


class Base(DeclarativeBase):
    pass


class BulkRow(Base):
    __tablename__ = "hi_bulk_rows"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(100))
    name: Mapped[str] = mapped_column(String(100))


track(BulkRow, keys=["row:{id}", "row_by_email:{email}"])


def cases(n: int) -> dict[str, Callable[[Session, int], Any]]:
    return {
        "executemany UPDATE by primary key": lambda s, k: s.execute(
            update(BulkRow), [{"id": i, "name": f"n{k}"} for i in range(n)]
        ),
        "UPDATE ... WHERE, no key field": lambda s, k: s.execute(
            update(BulkRow).where(BulkRow.id < n).values(name=f"m{k}")
        ),
        "UPDATE ... WHERE, a key field": lambda s, k: s.execute(
            update(BulkRow).where(BulkRow.id < n).values(email=BulkRow.email + "x")
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=15, help="statements per side and case")
    args = parser.parse_args()
    schema = "hi_bulk_" + uuid.uuid4().hex[:8]
    base = create_engine(args.db)
    with base.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    engine = base.execution_options(schema_translate_map={None: schema})
    cache = HybridCache.from_url(args.redis, namespace="bench-" + uuid.uuid4().hex[:8])
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            s.execute(
                insert(BulkRow),
                [{"id": i, "email": f"e{i}", "name": "n"} for i in range(args.rows)],
            )
            s.commit()

        class Tracked(Session):
            pass

        installation = install(Tracked, cache)
        sides = {"plain": sessionmaker(engine), "installed": sessionmaker(engine, class_=Tracked)}
        print(f"rows: {args.rows}  rounds per side: {args.rounds}")
        for name, run in cases(args.rows).items():
            times: dict[str, list[float]] = {side: [] for side in sides}
            for k in range(args.rounds):
                for side, factory in sides.items():
                    with factory() as s:
                        start = time.perf_counter()
                        run(s, k)
                        s.commit()
                        times[side].append(time.perf_counter() - start)
            plain, installed = (statistics.median(times[s]) for s in ("plain", "installed"))
            print(
                f"{name:36} plain {plain * 1e3:8.2f} ms  installed {installed * 1e3:8.2f} ms  "
                f"ratio {installed / plain:5.2f}x"
            )
        installation.uninstall()
    finally:
        cache.close()
        with base.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        base.dispose()


if __name__ == "__main__":
    main()
