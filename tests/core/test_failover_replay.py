"""Failover replay: a store that comes back as a new incarnation without the last writes its
predecessor acknowledged (a replica promoted after its master died) must not serve the values
those writes deleted. Each process invalidates again what it wrote lately."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis
from support.caches import subscribed_caches
from support.proxy import TcpProxy
from support.servers import RedisServer
from support.waiting import wait_until

from hybridinval import CacheConfig, HybridCache
from hybridinval._replay import RecentKeys


@pytest.fixture
def make_cache(tcp_proxy: TcpProxy, namespace: str) -> Iterator[Callable[..., HybridCache]]:
    with subscribed_caches(namespace, tcp_proxy.url_for(0)) as make:
        yield make


def promote_a_replica_that_missed(
    redis_server: RedisServer, tcp_proxy: TcpProxy, snapshot: dict[bytes, bytes]
) -> None:
    """What a failover can do: the caches lose the store, which comes back as a new server
    (new run id) holding an older state: ``snapshot``, from before the last writes."""
    tcp_proxy.refuse()
    tcp_proxy.cut()
    redis_server.kill()
    redis_server.start()
    with redis.Redis(host=redis_server.host, port=redis_server.port) as admin:
        for name, value in snapshot.items():
            admin.set(name, value)
    tcp_proxy.accept_again()


@pytest.mark.parametrize("replay", [True, False])
def test_what_the_new_master_lost_is_invalidated_again(
    make_cache: Callable[..., HybridCache],
    redis_server: RedisServer,
    tcp_proxy: TcpProxy,
    replay: bool,
) -> None:
    writer = make_cache(failover_replay=30.0 if replay else 0)
    reader = make_cache()
    assert reader.get_or_set("user:1", lambda: "old") == "old"
    with redis.Redis(host=redis_server.host, port=redis_server.port) as admin:
        names = [n for n in admin.keys("*user:1*")]
        snapshot = {n: admin.get(n) for n in names}  # value and version: what the replica had
    assert snapshot  # the value (its version key too, once the key has one)
    writer.invalidate("user:1")  # acknowledged by the master, never replicated
    promote_a_replica_that_missed(redis_server, tcp_proxy, snapshot)
    wait_until(lambda: reader.subscribed and writer.subscribed, timeout=15, what="back")
    if replay:
        wait_until(lambda: writer.stats()["keys_replayed"] == 1, what="the replay")
        wait_until(lambda: reader.get("user:1") is None, what="the lost delete, done again")
        assert reader.get_or_set("user:1", lambda: "new") == "new"
    else:  # what the replay prevents: the deleted value, served as current
        wait_until(lambda: writer._coherence._known_incarnation != "", what="incarnation")
        assert reader.get_or_set("user:1", lambda: "new") == "old"
        assert writer.stats()["keys_replayed"] == 0


def test_the_window_and_the_bound() -> None:
    recent = RecentKeys(window=30.0, max_keys=5)
    recent.add(["a", "b"])
    recent.add(["b", "c"])
    assert recent.keys() == ["a", "b", "c"]
    recent.add(["d", "e", "f"])  # 7 kept keys > 5: the oldest batch goes
    assert recent.keys() == ["b", "c", "d", "e", "f"]
    off = RecentKeys(window=0, max_keys=5)
    off.add(["a"])
    assert off.keys() == []
    expired = RecentKeys(window=0.001, max_keys=5)
    expired.add(["a"])
    wait_until(lambda: expired.keys() == [], what="aged out")


def test_bad_replay_settings_are_named() -> None:
    with pytest.raises(ValueError, match="failover_replay"):
        CacheConfig(failover_replay=-1)
    with pytest.raises(ValueError, match="max_replayed"):
        CacheConfig(max_replayed=0)
