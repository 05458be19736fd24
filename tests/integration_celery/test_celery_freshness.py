"""Freshness across processes: a "web" process (this test) commits, Celery tasks read.

Bounded staleness (README, Guarantees) seen from Celery: a task that starts in any prefork
child more than δ after ``commit()`` returned reads the new value through that child's cache;
and a task sent with ``enqueue_on_commit`` is sent only after the commit *and* its
invalidations, so it never reads the old value, and is never sent for a transaction that
rolled back.

The database is a SQLite file (WAL) shared by this process and the worker's children; the
children's L1s are warmed with the old value first, so a missing or late invalidation would show
up as a stale read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.canvas import Signature
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker
from support import celery_fixtures
from support.celery_app import Base, Item, item_key
from support.celery_fixtures import StartWorker, run, tagged

from hybridinval import HybridCache
from hybridinval.keyspace import Keyspace
from hybridinval.sqlalchemy import install

pytestmark = pytest.mark.slow  # real Celery workers

broker = celery_fixtures.broker
client = celery_fixtures.client
start_worker = celery_fixtures.start_worker

DELTA_S = 0.05
ROUNDS = 12


class Web:
    """This process acting as the web tier: its own cache and an installed session factory."""

    def __init__(self, db_url: str, redis_url: str, namespace: str) -> None:
        self.engine = create_engine(db_url)
        with self.engine.begin() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        Base.metadata.create_all(self.engine)
        self.cache = HybridCache.from_url(redis_url, namespace=namespace)
        self.Sessions: sessionmaker[Session] = sessionmaker(self.engine)
        self.installation = install(self.Sessions, self.cache)
        self.commits: list[tuple[int, int]] = []  # (version, time.time_ns() after commit)

    def create(self, item_id: int) -> None:
        with self.Sessions.begin() as session:
            session.add(Item(id=item_id, name="v0", version=0))
        self.commits.append((0, time.time_ns()))

    def update(self, item_id: int, version: int) -> None:
        with self.Sessions.begin() as session:
            item = session.get(Item, item_id)
            assert item is not None
            item.version, item.name = version, f"v{version}"
        self.commits.append((version, time.time_ns()))

    def close(self) -> None:
        self.installation.uninstall()
        self.cache.close()
        self.engine.dispose()


@pytest.fixture
def web(tmp_path: Path, redis_url: str, namespace: str) -> Iterator[Web]:
    web = Web(f"sqlite:///{tmp_path / 'items.db'}", redis_url, namespace)
    try:
        yield web
    finally:
        web.close()


def start(start_worker: StartWorker, web: Web, redis_url: str, namespace: str) -> Any:
    return start_worker(
        tagged(redis_url, namespace), env={"HI_TEST_DATABASE_URL": str(web.engine.url)}
    )


def reads(
    n: int, item_id: int = 1, sleep: float = 0.0
) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    return [("hi_test.read_item", (item_id,), {"sleep": sleep})] * n


def warm(client: Celery, worker: Any) -> dict[int, str]:
    """Read until both children hold the item in L1 (a second read in a child hits L1)."""
    seen: dict[int, str] = {}
    hits: dict[int, int] = {}
    for _ in range(10):
        for r in run(client, worker, reads(4, sleep=0.05)):
            seen[r["pid"]] = r["instance_id"]
            hits[r["pid"]] = max(hits.get(r["pid"], 0), r["l1_hits"])
        if len(seen) == 2 and all(hits[p] > 0 for p in seen):
            return seen
    raise AssertionError(f"both children never served from L1: {hits}\n{worker.log_tail()}")


def latest_committed_before(commits: list[tuple[int, int]], started_ns: int) -> int:
    """The newest version whose commit returned more than δ before ``started_ns``."""
    limit = started_ns - int(DELTA_S * 1e9)
    return max(v for v, at in commits if at < limit)


def test_tasks_starting_delta_after_a_commit_read_the_new_value_in_every_child(
    start_worker: StartWorker, client: Celery, web: Web, redis_url: str, namespace: str
) -> None:
    web.create(1)
    worker = start(start_worker, web, redis_url, namespace)
    children = warm(client, worker)
    served: dict[int, int] = dict.fromkeys(children, 0)
    received: dict[int, int] = dict.fromkeys(children, 0)
    for version in range(1, ROUNDS + 1):
        web.update(1, version)
        time.sleep(DELTA_S)
        for r in run(client, worker, reads(4)):
            value = r["value"]
            assert value is not None
            assert value["version"] >= latest_committed_before(web.commits, r["started_ns"])
            assert value["version"] == version, (version, r)
            served[r["pid"]] += 1
            received[r["pid"]] = r["invalidations_received"]
    assert set(served) == set(children), "only the warmed children serve"
    assert all(n > 0 for n in served.values()), f"both children served reads: {served}"
    # The children were told (not merely missing L1): each received the invalidations.
    assert all(n >= 1 for n in received.values()), received


class SpySignature(Signature):
    """A real signature that records, when it is sent, what the cache's Redis holds."""

    def __init__(self, *args: Any, probe: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._probe = probe
        self.sends: list[Any] = []
        self.result: Any = None

    def apply_async(self, *args: Any, **kwargs: Any) -> Any:
        self.sends.append(self._probe())
        self.result = super().apply_async(*args, **kwargs)
        return self.result


def test_enqueue_on_commit_sends_after_the_invalidation_and_never_after_a_rollback(
    start_worker: StartWorker, client: Celery, web: Web, redis_url: str, namespace: str
) -> None:
    from hybridinval.sqlalchemy import enqueue_on_commit

    web.create(1)
    worker = start(start_worker, web, redis_url, namespace)
    warm(client, worker)
    version_key = Keyspace(namespace).version(f"{item_key(1)}")
    with redis.Redis.from_url(redis_url) as admin:

        def signature() -> SpySignature:
            return SpySignature(
                "hi_test.read_item", args=(1,), app=client, probe=lambda: admin.get(version_key)
            )

        for version in range(1, 4):
            before = admin.get(version_key)
            sig = signature()
            with web.Sessions.begin() as session:
                item = session.get(Item, 1)
                assert item is not None
                item.version = version
                enqueue_on_commit(session, sig)
                session.flush()
                # A task sent now would find the old row and the children's old L1 entries.
                time.sleep(0.2)
                assert sig.sends == [], "sent before the commit"
            assert len(sig.sends) == 1, "sent exactly once, after the commit"
            assert sig.sends[0] != before, "sent before the invalidation reached Redis"
            result = sig.result.get(timeout=celery_fixtures.TASK_TIMEOUT)
            assert result["value"]["version"] == version, result

        # Rolled back: never sent, and the row is unchanged.
        sig = signature()
        with web.Sessions() as session:
            session.begin()
            item = session.get(Item, 1)
            assert item is not None
            item.version = 999
            enqueue_on_commit(session, sig)
            session.flush()
            session.rollback()
        assert sig.sends == []
        after = run(client, worker, reads(2))
        assert {r["value"]["version"] for r in after} == {3}
