"""``redis+cluster://``: L2 on a real Redis Cluster (3 masters, a replica each), the backplane on
sharded Pub/Sub (a channel per bucket, published by the scripts), through a slot moved under
the subscribers and a master killed under load."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.cluster
from support.caches import FAST, subscribed_caches
from support.cluster import LocalCluster
from support.inspect import entries
from support.load import Load
from support.waiting import wait_until

from hybridinval import AsyncHybridCache, HybridCache
from hybridinval._l2_cluster import RedisClusterL2
from hybridinval._message import decode_message
from hybridinval.errors import BackendUnavailableError
from hybridinval.hub import Hub
from hybridinval.testing import L2StoreContract, RecordingListener, TransportContract
from hybridinval.transports import Transport
from hybridinval.transports.redis_sharded import RedisShardedPubSubTransport

pytestmark = pytest.mark.slow  # a cluster takes seconds to form


@pytest.fixture(scope="module")
def cluster(redis_cli: str) -> Iterator[LocalCluster]:
    with LocalCluster(masters=3, replicas=1) as started:
        yield started


def cluster_url(cluster: LocalCluster) -> str:
    return "redis+cluster://" + ",".join(f"{n.host}:{n.port}" for n in cluster.nodes[:3])


class TestRedisClusterL2(L2StoreContract):
    publishes_notify = True  # each bucket's script publishes on its sharded channel

    @pytest.fixture(autouse=True)
    def _cluster(self, cluster: LocalCluster) -> None:
        self.cluster = cluster

    def make_store(self) -> RedisClusterL2:
        node = self.cluster.nodes[0]
        return RedisClusterL2(
            lambda: redis.cluster.RedisCluster(host=node.host, port=node.port, protocol=2),
            f"contract-{uuid.uuid4().hex[:8]}",
            version_ttl=60.0,
        )


@pytest.fixture
def make_cache(cluster: LocalCluster, namespace: str) -> Iterator[Callable[..., HybridCache]]:
    with subscribed_caches(namespace, cluster_url(cluster)) as make:
        yield make


def test_a_batch_invalidation_is_one_script_per_bucket_across_the_nodes(
    make_cache: Callable[..., HybridCache], cluster: LocalCluster
) -> None:
    """One pipelined script per bucket; each publishes, on its bucket's sharded channel, the
    part of the message that names the bucket's keys (one commit: one sender and sequence)."""
    a, b = make_cache(), make_cache()
    l2: Any = a.l2
    spy = RedisShardedPubSubTransport(l2, [(n.host, n.port) for n in cluster.masters()])
    heard = RecordingListener()
    spy.start(heard)
    assert heard.connected.wait(10)
    keys = [f"user:{i}" for i in range(500)]
    for key in keys[:50]:
        b.get_or_set(key, lambda key=key: key)
    scripts: list[int] = []
    real = l2.client.pipeline

    def counting_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = real(*args, **kwargs)
        queued = [0]
        evalsha, execute = pipe.evalsha, pipe.execute

        def queue(*a: Any, **k: Any) -> Any:
            queued[0] += 1
            return evalsha(*a, **k)

        def counted(*a: Any, **k: Any) -> Any:
            scripts.append(queued[0])
            return execute(*a, **k)

        pipe.evalsha, pipe.execute = queue, counted
        return pipe

    l2.client.pipeline = counting_pipeline
    a.invalidate_many(keys)
    assert scripts == [len({l2.bucket(k) for k in keys})]  # one pipeline, a script per bucket
    slots = {l2.client.keyslot(l2.names(k)[0]) for k in keys}
    assert len(slots) == len({l2.bucket(k) for k in keys})
    buckets = len({l2.bucket(k) for k in keys})
    wait_until(lambda: not entries(b), what="b evicts all 50")
    wait_until(lambda: len(heard.messages) == buckets, what="a message per bucket")
    spy.stop()
    assert b.stats()["invalidations_received"] == buckets
    parts = [decode_message(m) for m in heard.messages]
    assert sorted(k for part in parts for k in part.keys) == sorted(keys)
    assert all(len({l2.bucket(k) for k in part.keys}) == 1 for part in parts)
    assert len({(part.sender, part.seq) for part in parts}) == 1
    assert all(b.get(k) is None for k in keys[:50])


def test_fill_guard_and_cas_hold_on_the_cluster(make_cache: Callable[..., HybridCache]) -> None:
    a, b = make_cache(), make_cache()
    assert a.get_or_set("k", lambda: "v1") == "v1"
    assert b.get("k") == "v1"  # from L2
    a.set("k", "v2")
    wait_until(lambda: "k" not in entries(b), what="b evicts")
    assert b.get("k") == "v2"


def test_the_asyncio_cache_on_the_cluster(cluster: LocalCluster, namespace: str) -> None:
    async def main() -> None:
        async with AsyncHybridCache.from_url(
            cluster_url(cluster), namespace=namespace, **FAST
        ) as cache:
            assert await cache.wait_until_subscribed(10)
            await cache.set("k", [1, 2])
            cache.clear_local()
            assert await cache.get("k") == [1, 2]
            await cache.invalidate("k")
            assert await cache.get("k") is None

    asyncio.run(main())


class TestRedisShardedPubSubTransport(TransportContract):
    @pytest.fixture(autouse=True)
    def _cluster(self, cluster: LocalCluster) -> None:
        self.cluster = cluster

    def make_transports(self, n: int) -> list[Transport]:
        node = self.cluster.nodes[0]
        l2 = RedisClusterL2(
            lambda: redis.cluster.RedisCluster(host=node.host, port=node.port, protocol=2),
            f"contract-{uuid.uuid4().hex[:8]}",
        )
        seeds = [(n.host, n.port) for n in self.cluster.nodes]
        return [
            RedisShardedPubSubTransport(
                l2, seeds, health_check_interval=0.2, health_check_timeout=0.3
            )
            for _ in range(n)
        ]


def test_each_bucket_is_subscribed_on_its_master_and_the_anchors_name_it(
    make_cache: Callable[..., HybridCache], cluster: LocalCluster
) -> None:
    cache = make_cache()
    l2: Any = cache.l2
    ids = {cluster.node_id(node): node for node in cluster.masters()}
    for bucket in range(l2.buckets):
        owner = cluster.master_of_slot(l2.client.keyslot(l2.channel(bucket)))
        with cluster.client(owner) as client:
            anchor = client.get(l2.anchor(bucket))
            channels: Any = client.execute_command("PUBSUB", "SHARDCHANNELS", l2.channel(bucket))
        assert anchor is not None and ids[anchor.decode()] is owner
        assert channels == [l2.channel(bucket).encode()]


def test_a_master_that_no_longer_vouches_for_its_slots_makes_its_subscribers_blind(
    make_cache: Callable[..., HybridCache], cluster: LocalCluster
) -> None:
    """The ownership probe: a master whose answer about a bucket's anchor is not itself (here
    the anchor names another node, as after subscribers registered elsewhere; a master cut off
    from its cluster answers CLUSTERDOWN) makes its subscribers blind within a health check,
    though their subscribed connections are fine; they register again, which writes the
    anchor back."""
    reader = make_cache()
    l2: Any = reader.l2
    reader.get_or_set("k", lambda: "v1")
    owner = cluster.master_of_slot(l2.client.keyslot(l2.anchor(0)))
    with cluster.client(owner) as client:
        mine = client.get(l2.anchor(0))
        client.set(l2.anchor(0), "somebody-else")
    wait_until(lambda: reader.stats()["blind_periods"] == 1, what="blind")
    wait_until(lambda: reader.subscribed, what="registered again")
    with cluster.client(owner) as client:
        assert client.get(l2.anchor(0)) == mine


def test_a_slot_that_moved_publishes_nothing_until_its_subscribers_follow(
    make_cache: Callable[..., HybridCache], cluster: LocalCluster
) -> None:
    """The fence, in the middle of a migration held open: the slot's keys are on the new
    master, while the old one (where every subscriber of the bucket listens) still owns the
    slot, so nobody is unsubscribed, and sends writers of moved keys to the new master. A script
    there would publish where no one listens and leave the reader's L1 stale with no blind
    period; the anchor makes it refuse, the committed invalidation waits in the retry, and goes
    through once the move completes (the old master unsubscribes everyone: blind) and the
    reader registered on the new master."""
    reader, writer = make_cache(), make_cache()
    l2: Any = reader.l2
    key, other = "moving", "moving-78"
    assert l2.bucket(key) == l2.bucket(other)
    for k in (key, other):
        writer.set(k, "v1")  # a version key too: all the script's keys move (else TRYAGAIN)
    wait_until(lambda: reader.stats()["invalidations_received"] == 2, what="both sets heard")
    for k in (key, other):
        assert reader.get_or_set(k, lambda: "?") == "v1"
    assert key in entries(reader) and other in entries(reader)
    slot = l2.client.keyslot(l2.names(key)[0])
    source = cluster.master_of_slot(slot)
    target = next(node for node in cluster.masters() if node is not source)
    versions_before = l2.versions([key, other])
    cluster.move_slot_keys(slot, source, target)
    try:
        with pytest.raises(BackendUnavailableError):  # redis-py retried the TRYAGAIN, gave up
            writer.set(other, "v2")
        assert writer.invalidate_committed([key]) is False
        assert writer.pending_retries() == 1
        assert l2.versions([key, other]) == versions_before  # refused before writing anything
        assert reader.stats()["blind_periods"] == 0
        assert key in entries(reader) and other in entries(reader)  # and still right
    finally:
        cluster.finish_slot_move(slot, target)
    wait_until(lambda: reader.stats()["blind_periods"] == 1, what="unsubscribed: blind")
    wait_until(lambda: writer.pending_retries() == 0, timeout=20, what="the retry went through")
    assert l2.versions([key]) != versions_before[:1]
    wait_until(lambda: reader.subscribed, what="resubscribed")
    assert key not in entries(reader)
    assert reader.get_or_set(key, lambda: "v2") == "v2"
    writer.invalidate(key)
    wait_until(lambda: key not in entries(reader), what="evicted via the new master")


def test_a_hub_relays_the_sharded_backplane(
    make_cache: Callable[..., HybridCache], cluster: LocalCluster, namespace: str, tmp_path: Path
) -> None:
    """The hub holds one connection per master; its processes' leases check all of them."""
    path = str(tmp_path / "hub.sock")
    with Hub(cluster_url(cluster), path, namespace=namespace, **FAST) as hub:
        reader, writer = make_cache(backplane_hub=path), make_cache()
        assert len(hub.progress.socks or ()) == 3
        keys = [f"user:{i}" for i in range(40)]
        for key in keys:
            reader.get_or_set(key, lambda key=key: key)
        writer.invalidate_many(keys)
        wait_until(lambda: not entries(reader), what="all evicted through the hub")
        assert reader.get_or_set(keys[0], lambda: "new") == "new"
        assert reader.stats()["lease_flushes"] == 0


def test_a_killed_master_is_a_blind_period_and_a_new_incarnation(
    make_cache: Callable[..., HybridCache], cluster: LocalCluster
) -> None:
    """Kill, under load, the master a key lives on: every cache goes blind (each subscribes on
    every master), no read is stale, nothing set aside survives a changed set of masters, and
    reads and invalidations work again once the replica took over and the subscribers
    registered there. (Last in this module: it uses up a replica.)"""
    reader, writer = make_cache(), make_cache()
    reader.get_or_set("before", lambda: "v1")
    l2: Any = reader.l2
    victim = cluster.master_of_slot(l2.client.keyslot(l2.names("before")[0]))
    old_incarnation = reader._coherence._incarnation
    load = Load(make_cache(), make_cache())
    time.sleep(0.5)
    killed_at = time.time()
    victim.kill()
    wait_until(lambda: reader.stats()["blind_periods"] >= 1, timeout=20, what="blind")
    cluster.wait_ok(timeout=60)
    wait_until(lambda: reader.subscribed, timeout=30, what="subscribed elsewhere")
    wait_until(
        lambda: reader._coherence._incarnation not in ("", old_incarnation),
        timeout=30,
        what="a new incarnation",
    )
    assert "before" not in entries(reader)

    def works() -> bool:
        try:
            writer.set("after", "x")
            return True
        except Exception:
            return False

    wait_until(works, timeout=30, what="writes after the failover")
    wait_until(lambda: writer.subscribed, timeout=30, what="writer subscribed")
    reader.get_or_set("after2", lambda: "loaded")
    writer.invalidate("after2")
    wait_until(lambda: "after2" not in entries(reader), what="eviction after the failover")
    assert l2.buckets > 1
    time.sleep(0.5)
    stale = load.stop()
    assert len(load.reads) > 100 and stale == []
    # The kill hit the load: its reader went blind, and its writer went on after the failover
    # (redis-py retries through it, or our background retry does).
    assert load.reader.stats()["blind_periods"] >= 1
    assert any(at > killed_at + 1.0 for done in load.published.values() for _, at in done)
    wait_until(lambda: load.writer.pending_retries() == 0, timeout=20, what="retries done")


def test_an_unreachable_cluster_is_a_backend_failure_like_any_other(namespace: str) -> None:
    """redis-py's cluster errors are not RedisErrors: they must still read as "Redis is down"
    (reads fall back to the loader, a committed publish goes to the retry), never escape."""
    cache = HybridCache.from_url(
        "redis+cluster://127.0.0.1:1", namespace=namespace, socket_timeout=0.3
    )
    try:
        assert cache.get_or_set("k", lambda: "loaded") == "loaded"
        assert cache.stats()["l2_errors"] >= 1
        assert cache.invalidate_committed(["k"]) is False
        assert cache.pending_retries() == 1
    finally:
        cache.close()
