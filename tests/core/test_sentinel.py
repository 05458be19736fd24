"""``redis+sentinel://``: L2 and the backplane on the master a Sentinel set names, through a
failover (a master of ours, killed; its replica promoted)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest
from support.caches import FAST, subscribed_caches
from support.inspect import entries
from support.load import Load
from support.sentinel import SentinelSet
from support.waiting import wait_until

from hybridinval import AsyncHybridCache, HybridCache
from hybridinval._sentinel import SentinelTarget

pytestmark = pytest.mark.slow  # a sentinel set takes seconds to agree


@pytest.fixture(scope="module")
def sentinels() -> Iterator[SentinelSet]:
    with SentinelSet() as started:
        yield started


@pytest.fixture
def make_cache(sentinels: SentinelSet, namespace: str) -> Iterator[Callable[..., HybridCache]]:
    with subscribed_caches(namespace, sentinels.url) as make:
        yield make


def test_sentinel_urls_parse_and_bad_ones_are_refused() -> None:
    target = SentinelTarget.parse("redis+sentinel://:s3cret@h1:26379,h2:26380/shop/2")
    assert target.sentinels == (("h1", 26379), ("h2", 26380))
    assert (target.service, target.db, target.password) == ("shop", 2, "s3cret")
    for bad in (
        "redis+sentinel://h1:26379",
        "redis+sentinel://h1/shop",
        "redis+sentinel://h1:26379/shop/x",
    ):
        with pytest.raises(ValueError, match="sentinel"):
            SentinelTarget.parse(bad)


def test_invalidations_flow_on_the_master_the_sentinels_name(
    make_cache: Callable[..., HybridCache],
) -> None:
    a, b = make_cache(), make_cache()
    assert a.transport.script_channel(a.l2) is not None  # one round trip, as on one Redis
    b.get_or_set("k", lambda: "old")
    a.set("k", "new")
    wait_until(lambda: "k" not in entries(b), what="b evicts")
    assert b.get("k") == "new"


def test_asyncio_cache_on_sentinel(sentinels: SentinelSet, namespace: str) -> None:
    async def main() -> None:
        async with AsyncHybridCache.from_url(sentinels.url, namespace=namespace, **FAST) as c:
            assert await c.wait_until_subscribed(10)
            await c.set("k", {"v": 1})
            c.clear_local()
            assert await c.get("k") == {"v": 1}  # an L2 read through the sentinel client
            await c.invalidate("k")
            assert await c.get("k") is None

    asyncio.run(main())


def test_a_failover_is_a_new_incarnation(
    make_cache: Callable[..., HybridCache], sentinels: SentinelSet
) -> None:
    """Kill the master, under load: the caches go blind, find the promoted replica through
    the sentinels, subscribe there, and keep nothing set aside from before (its run id is
    new), then carry on: reads and invalidations work on the new master, and no read of the
    load was stale. (Last in this module: it uses up the set's replica.)"""
    reader, writer = make_cache(), make_cache()
    reader.get_or_set("kept?", lambda: "v1")
    old_incarnation = reader._coherence._incarnation
    load = Load(make_cache(), make_cache())
    time.sleep(0.5)
    failed_at = time.time()
    sentinels.fail_over()
    wait_until(lambda: reader.stats()["blind_periods"] >= 1, what="blind")
    wait_until(lambda: reader.subscribed, timeout=30, what="subscribed to the new master")
    wait_until(
        lambda: reader._coherence._incarnation not in ("", old_incarnation),
        timeout=30,
        what="the new master's incarnation",
    )
    assert "kept?" not in entries(reader)
    assert reader.stats()["l1_quarantine_dropped"] >= 1 and reader.stats()["l1_restored"] == 0
    wait_until(lambda: writer.subscribed, timeout=30, what="writer subscribed")

    def works() -> bool:
        try:
            writer.set("after", "x")
        except Exception:
            return False
        return True

    wait_until(works, timeout=30, what="writes on the new master")
    reader.get_or_set("after", lambda: "loaded")
    writer.invalidate("after")
    wait_until(lambda: "after" not in entries(reader), what="eviction after the failover")
    wait_until(
        lambda: any(at > failed_at + 1.0 for done in load.published.values() for _, at in done),
        timeout=30,
        what="the load's writer going on after the failover",
    )
    stale = load.stop()
    assert len(load.reads) > 100 and stale == []
    assert load.reader.stats()["blind_periods"] >= 1
