"""The kombu backplane on a real RabbitMQ: the transport contract, what a per-process queue
buys over Pub/Sub (a short disconnect misses nothing), and what still is a gap.

Faults go through a TCP proxy in front of the broker that the test controls.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from kombu.connection import Connection
from support import TcpProxy
from support.inspect import entries
from support.waiting import wait_until

from hybridinval import HybridCache
from hybridinval.testing import TransportContract
from hybridinval.testing._contracts import RecordingListener
from hybridinval.transports.kombu import KombuTransport

FAST: dict[str, Any] = {"heartbeat": 1.0, "connect_timeout": 1.0, "reconnect_backoff": (0.02, 0.2)}


@pytest.fixture
def amqp_proxy(amqp_url: str) -> Iterator[TcpProxy]:
    parts = urlsplit(amqp_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    try:
        yield proxy
    finally:
        proxy.close()


def via(proxy: TcpProxy, amqp_url: str) -> str:
    parts = urlsplit(amqp_url)
    return amqp_url.replace(f"{parts.hostname}:{parts.port or 5672}", f"127.0.0.1:{proxy.port}")


@pytest.fixture
def transports(amqp_url: str) -> Iterator[Callable[..., KombuTransport]]:
    made: list[KombuTransport] = []
    exchange = f"hi:t-{uuid.uuid4().hex[:12]}:inval"

    def make(url: str | None = None, **options: Any) -> KombuTransport:
        transport = KombuTransport(url or amqp_url, exchange, **{**FAST, **options})
        made.append(transport)
        return transport

    yield make
    for transport in made:
        transport.stop()


class TestKombuTransportContract(TransportContract):
    @pytest.fixture(autouse=True)
    def _broker(self, amqp_url: str) -> None:
        self.url = amqp_url
        self.exchange = f"hi:t-{uuid.uuid4().hex[:12]}:inval"

    def make_transports(self, n: int) -> list[Any]:
        return [KombuTransport(self.url, self.exchange, **FAST) for _ in range(n)]


class Listener(RecordingListener):
    """Also records which messages had been applied when each event came."""

    def __init__(self) -> None:
        super().__init__()
        self.applied_at: list[list[bytes]] = []

    def on_resumed(self) -> None:
        self.applied_at.append(list(self.messages))
        super().on_resumed()


def started(transport: KombuTransport) -> Listener:
    listener = Listener()
    transport.start(listener)
    assert listener.connected.wait(10)
    return listener


def test_a_short_disconnect_misses_nothing_and_is_a_resume(
    transports: Callable[..., KombuTransport], amqp_proxy: TcpProxy, amqp_url: str
) -> None:
    """Cut the subscriber's connection, publish while it is away, let it back in: every
    message arrives, and it is told "resumed" (nothing missed), not "connected" (a gap)."""
    sender = transports()
    receiver = transports(via(amqp_proxy, amqp_url))
    listener = started(receiver)
    sender.publish(b"before")
    wait_until(lambda: listener.messages == [b"before"], what="first message")
    amqp_proxy.refuse()
    amqp_proxy.cut()
    wait_until(lambda: "blind" in listener.events, what="blind")
    sent_while_away = [b"away-%d" % i for i in range(20)]
    for message in sent_while_away:
        sender.publish(message)
    amqp_proxy.accept_again()
    wait_until(lambda: listener.events[-1:] == ["resumed"], timeout=20, what="resumed")
    assert listener.events == ["connected", "blind", "resumed"]
    # Told "resumed" only once the backlog had been applied.
    assert listener.applied_at == [[b"before", *sent_while_away]]
    sender.publish(b"after")
    wait_until(lambda: listener.messages[-1:] == [b"after"], what="live again")


def test_a_queue_gone_while_away_is_a_gap(
    transports: Callable[..., KombuTransport], amqp_proxy: TcpProxy, amqp_url: str
) -> None:
    receiver = transports(via(amqp_proxy, amqp_url))
    listener = started(receiver)
    amqp_proxy.refuse()
    amqp_proxy.cut()
    wait_until(lambda: "blind" in listener.events, what="blind")
    with Connection(amqp_url) as conn:  # what an expiry or a broker restart does to it
        conn.connect()
        conn.connection.channel().queue_delete(receiver.queue)
    amqp_proxy.accept_again()
    wait_until(lambda: len(listener.events) == 3, timeout=20, what="subscribed again")
    assert listener.events == ["connected", "blind", "connected"]


def test_a_half_open_link_loses_nothing_sent_into_it(
    transports: Callable[..., KombuTransport], amqp_proxy: TcpProxy, amqp_url: str
) -> None:
    """Black-hole the link: heartbeats notice it; a message the broker delivered into the dead
    link comes back once the broker drops that connection, and before "resumed" (the new
    consumer is exclusive, so it starts only after the old one's deliveries were requeued)."""
    sender = transports()
    receiver = transports(via(amqp_proxy, amqp_url), heartbeat=1.0)
    listener = started(receiver)
    amqp_proxy.blackhole()
    started_at = time.monotonic()
    sender.publish(b"into the void")  # delivered to the old consumer, never acknowledged
    wait_until(lambda: "blind" in listener.events, timeout=10, what="blind on a silent link")
    noticed = time.monotonic() - started_at
    assert receiver.caught_up(0.0) is not None  # blind: nothing to wait for
    amqp_proxy.heal()
    wait_until(lambda: "resumed" in listener.events, timeout=30, what="resumed")
    assert listener.applied_at == [[b"into the void"]]
    print(f"half-open noticed after {noticed:.2f} s")


def test_a_reconnect_waits_for_the_broker_to_drop_the_old_consumer(
    transports: Callable[..., KombuTransport], amqp_proxy: TcpProxy, amqp_url: str
) -> None:
    """Forced interleaving: this side knows its link is dead (its socket is shut down) while
    the broker still holds the old connection, with a delivery in it, for a few heartbeats. The
    reconnect must not resume before that delivery is requeued and applied."""
    sender = transports()
    receiver = transports(via(amqp_proxy, amqp_url), heartbeat=2.0)
    listener = started(receiver)
    amqp_proxy.blackhole()  # the broker's side stays open, and hears nothing more
    sender.publish(b"held by the old consumer")
    time.sleep(0.2)
    receiver._conn.connection.sock.shutdown(socket.SHUT_RDWR)  # this side: dead now
    wait_until(lambda: "blind" in listener.events, timeout=10, what="blind")
    amqp_proxy.heal()
    # Until resumed, the queue never has two consumers (round robin between the dead one and
    # the new one could hand the marker to either, so the outcome alone is a coin toss).
    consumers = []
    with Connection(amqp_url) as conn:
        conn.connect()
        channel = conn.connection.channel()
        deadline = time.monotonic() + 30
        while "resumed" not in listener.events and time.monotonic() < deadline:
            consumers.append(channel.queue_declare(receiver.queue, passive=True).consumer_count)
            time.sleep(0.02)
    assert "resumed" in listener.events
    assert max(consumers) == 1, consumers
    assert listener.applied_at == [[b"held by the old consumer"]]


# -- a HybridCache on Redis L2 with the AMQP backplane ------------------------------------------


@pytest.fixture
def make_cache_amqp(
    redis_url: str, namespace: str, amqp_url: str
) -> Iterator[Callable[..., HybridCache]]:
    caches: list[HybridCache] = []

    def make(backplane: str | None = None, **options: Any) -> HybridCache:
        cache = HybridCache.from_url(
            redis_url,
            namespace=namespace,
            backplane=backplane or amqp_url,
            **{"health_check_interval": 0.5, "health_check_timeout": 0.5, **options},
        )
        caches.append(cache)
        assert cache.wait_until_subscribed(10)
        return cache

    yield make
    for cache in caches:
        cache.close()


def test_invalidations_cross_the_broker_after_the_l2_writes(
    make_cache_amqp: Callable[..., HybridCache],
) -> None:
    a, b = make_cache_amqp(), make_cache_amqp()
    assert isinstance(a.transport, KombuTransport) and a.l1_lease is not None
    assert b.get_or_set("k", lambda: "old") == "old"
    a.set("k", "new")
    wait_until(lambda: "k" not in entries(b), what="b evicts")
    assert b.get("k") == "new"  # L2 was written before the message left
    a.invalidate("k")
    wait_until(lambda: b.get_local("k") is None, what="b evicts again")
    assert b.get("k") is None


def test_a_short_broker_disconnect_keeps_l1_without_asking_l2(
    make_cache_amqp: Callable[..., HybridCache], amqp_proxy: TcpProxy, amqp_url: str
) -> None:
    """The reader's connection is cut; a key is invalidated while it is away. Back within the
    queue's lifetime: the untouched entries come back at once (no version read from L2), the
    invalidated one does not, and L1 was bypassed meanwhile."""
    reader = make_cache_amqp(via(amqp_proxy, amqp_url))
    writer = make_cache_amqp()
    for key in ("kept", "changed"):
        reader.get_or_set(key, lambda key=key: f"{key}-v1")
    amqp_proxy.refuse()
    amqp_proxy.cut()
    wait_until(lambda: not reader.subscribed, what="blind")
    assert entries(reader) == {}  # bypassed while blind
    writer.set("changed", "changed-v2")

    def no_version_reads(keys: Any) -> list[bytes]:
        raise AssertionError("a resume needs no L2 version read")

    reader.l2.versions = no_version_reads  # type: ignore[method-assign]
    amqp_proxy.accept_again()
    wait_until(lambda: reader.subscribed, timeout=20, what="resubscribed")
    assert set(entries(reader)) == {"kept"}
    assert reader.get("kept") == "kept-v1" and reader.get("changed") == "changed-v2"
    assert reader.stats()["l1_restored"] == 1


def test_a_broker_absence_longer_than_the_queue_is_a_gap(
    make_cache_amqp: Callable[..., HybridCache], amqp_proxy: TcpProxy, amqp_url: str
) -> None:
    reader = make_cache_amqp(via(amqp_proxy, amqp_url), backplane_queue_expires=1.0)
    writer = make_cache_amqp()
    for key in ("kept", "changed"):
        reader.get_or_set(key, lambda key=key: f"{key}-v1")
    wait_until(lambda: bool(reader._coherence._incarnation), what="incarnation read")
    amqp_proxy.refuse()
    amqp_proxy.cut()
    wait_until(lambda: not reader.subscribed, what="blind")
    writer.set("changed", "changed-v2")  # published into a queue that is about to expire
    time.sleep(2.5)  # the queue outlives its consumer by 1 s
    amqp_proxy.accept_again()
    wait_until(lambda: reader.subscribed, timeout=20, what="resubscribed")
    # A gap: L2 decides what comes back (the unchanged entry), never the set-aside copy alone.
    wait_until(lambda: reader.stats()["l1_restored"] == 1, what="restore done")
    assert set(entries(reader)) == {"kept"}
    assert reader.get("changed") == "changed-v2"


def test_a_publish_the_broker_refuses_after_commit_is_retried(
    make_cache_amqp: Callable[..., HybridCache], amqp_proxy: TcpProxy, amqp_url: str
) -> None:
    writer = make_cache_amqp(via(amqp_proxy, amqp_url))
    reader = make_cache_amqp()
    reader.get_or_set("k", lambda: "old")
    amqp_proxy.refuse()
    amqp_proxy.cut()
    assert writer.invalidate_committed(["k"]) is False  # the L2 delete went, the message not
    assert writer.pending_retries() == 1
    amqp_proxy.accept_again()
    wait_until(lambda: "k" not in entries(reader), timeout=20, what="the retried message")
    assert writer.stats()["publish_retries_succeeded"] == 1


def test_a_bad_backplane_url_is_refused_naming_the_option(redis_url: str) -> None:
    with pytest.raises(ValueError, match="backplane"):
        HybridCache.from_url(redis_url, backplane="redis://127.0.0.1:6379/0")


def test_the_asyncio_cache_publishes_over_the_broker_too(
    make_cache_amqp: Callable[..., HybridCache], redis_url: str, namespace: str, amqp_url: str
) -> None:
    import asyncio

    from hybridinval import AsyncHybridCache

    reader = make_cache_amqp()
    reader.get_or_set("k", lambda: "old")

    async def main() -> None:
        async with AsyncHybridCache.from_url(
            redis_url, namespace=namespace, backplane=amqp_url
        ) as writer:
            assert await writer.wait_until_subscribed(10)
            await writer.set("k", "new")  # L2 script, then the broker publish (off the loop)
            assert await writer.invalidate_committed(["other"])

    asyncio.run(main())
    wait_until(lambda: "k" not in entries(reader), what="evicted through the broker")
    assert reader.get("k") == "new"


def test_this_process_own_write_while_blind_is_not_undone_by_the_resume(
    make_cache_amqp: Callable[..., HybridCache],
) -> None:
    """Its own messages are echoes (ignored); its own write must still drop the key from what
    was set aside, or the resume would bring back the value it overwrote."""
    cache = make_cache_amqp()
    cache.get_or_set("k", lambda: "v1")
    on_blind = cache._coherence.on_blind
    wrote: list[bool] = []

    def blind_then_write(reason: str) -> None:
        on_blind(reason)
        if not wrote:
            wrote.append(True)
            cache.set("k", "v2")

    cache._coherence.on_blind = blind_then_write  # type: ignore[method-assign]
    transport: Any = cache.transport
    transport._conn.connection.sock.shutdown(socket.SHUT_RDWR)  # the consumer's link only
    wait_until(lambda: bool(wrote) and cache.subscribed, timeout=20, what="resumed")
    assert cache.get("k") == "v2"


def test_a_gap_not_yet_proven_is_not_vouched_for_by_a_later_resume(
    make_cache_amqp: Callable[..., HybridCache], amqp_proxy: TcpProxy, amqp_url: str
) -> None:
    """A gap (the queue expired) leaves entries only L2 may vouch for; the link drops again
    before that check ran, and comes back to a living queue: those entries still wait for L2."""
    reader = make_cache_amqp(via(amqp_proxy, amqp_url), backplane_queue_expires=1.0)
    writer = make_cache_amqp()
    reader.get_or_set("k", lambda: "old")
    amqp_proxy.refuse()
    amqp_proxy.cut()
    wait_until(lambda: not reader.subscribed, what="blind")
    writer.set("k", "new")  # into a queue that expires: a gap
    time.sleep(2.5)
    incarnation = reader.l2.incarnation

    def slow_incarnation() -> str:
        time.sleep(3)  # the restore's Redis round trip, slow
        return incarnation()

    reader.l2.incarnation = slow_incarnation  # type: ignore[method-assign]
    amqp_proxy.accept_again()
    wait_until(lambda: reader.subscribed, timeout=20, what="subscribed after the gap")
    amqp_proxy.refuse()
    amqp_proxy.cut()  # before the restore proved anything
    wait_until(lambda: not reader.subscribed, what="blind again")
    amqp_proxy.accept_again()  # the new queue lives: a resume
    wait_until(lambda: reader.subscribed, timeout=20, what="resubscribed")
    assert reader.get("k") == "new"


def test_a_publish_into_a_silent_link_fails_instead_of_hanging(
    transports: Callable[..., KombuTransport], amqp_proxy: TcpProxy, amqp_url: str
) -> None:
    """The confirm never comes and neither does the close handshake: the publish must give up
    (BackendUnavailableError, so the cache's retry takes over) and leave the lock free."""
    import threading

    from hybridinval import BackendUnavailableError

    sender = transports(via(amqp_proxy, amqp_url), publish_timeout=0.5)
    sender.publish(b"opens the publisher connection")
    amqp_proxy.blackhole()
    outcome: list[BaseException | None] = []

    def publish() -> None:
        try:
            sender.publish(b"into the void")
            outcome.append(None)
        except BackendUnavailableError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "publish hung on a silent link"
    assert isinstance(outcome[0], BackendUnavailableError)
    assert not sender._publish_lock.locked()
