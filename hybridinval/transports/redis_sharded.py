"""Sharded Pub/Sub on a Redis Cluster (``SSUBSCRIBE``/``SPUBLISH``, Redis 7) as the backplane.

**Channel layout.** One channel per L2 bucket, ``hi:{<namespace>:<bucket>}:inval``, in the slot of
that bucket's keys (see :mod:`hybridinval._l2_cluster`). So the script that deletes a bucket's
keys publishes their message itself, on the node that holds them, after the deletes; a message
crosses no cluster bus (a sharded message goes only to the node's own subscribers and its
replicas); and the traffic spreads over the shards as the buckets do. A subscriber subscribes to
every bucket, on each bucket's master: one connection per master.

**Blindness.** Like :class:`~hybridinval.transports.RedisPubSubTransport`, the subscriber owns
its sockets and reports ``on_blind`` before anything else whenever it may have missed a message:
a connection lost or half-open (a health-check ``PING`` per connection, unanswered), a node that
unsubscribes it from a channel (Redis does so when the channel's slot leaves the node: a
migration, a failover), a reply that says a slot moved, and a master that, asked every health
check on a second connection, no longer vouches for its slots (:class:`OwnershipProbe`: a
master cut off from its cluster answers PING as ever, and unsubscribes no one, while the others
promote its replica). It then rediscovers the slot map and
subscribes again on every shard; only when every bucket is subscribed does it report
``on_connected``, so the cache flushes and bypasses L1 until then.

**The fence.** Before subscribing on a master, the subscriber writes that master's node id to the
anchor key of each bucket it subscribes to there; the write scripts refuse to publish on any
other node (see :mod:`hybridinval._l2_cluster`). Without it, a slot that moves would let a writer
publish on the new node while the subscribers still listen on the old one, until the old one
unsubscribes them: messages lost with no one blind. With it, the new node publishes nothing
until a subscriber has registered there. By then a subscriber of the old node has been
unsubscribed (a migration: the old node sends that the moment it gives the slot up, before any
subscriber can learn of the move and register elsewhere), lost its connection (a master that
died), or will hear from its ownership probe within a health check (a master cut off from its
cluster: the one window left, as long as a half-open connection's). Anchors live without a TTL;
one lost (evicted, or missing on a promoted replica) opens the fence until the next
subscription writes it again.

Why our own subscriber rather than redis-py's ``ShardedPubSub``: redis-py resubscribes after a
reconnect or a slot move without telling anyone, and the cache must know (a missed message must
flush L1). The L2 and the publishers use redis-py's ``RedisCluster``; ``hybridinval[cluster]``
pins redis-py 8.1, whose cluster client follows slot moves for sharded Pub/Sub and after a
reconnect (#4038, #4044).
"""

from __future__ import annotations

import contextlib
import logging
import select
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis
from redis.crc import key_slot
from redis.exceptions import RedisError

from ._base import TICK_INTERVAL, BackplaneListener
from ._resp import Link, RespError, subscriber_options
from ._subscriber import SubscriberThread

if TYPE_CHECKING:
    from .._l2 import L2Store
    from .._l2_cluster import RedisClusterL2

__all__ = ["RedisShardedPubSubTransport"]

log = logging.getLogger("hybridinval.backplane")

Address = tuple[str, int]


class SlotMoved(ConnectionError):
    """A subscribed channel's slot left its node, or was never there: resubscribe."""


class OwnershipProbe:
    """A second connection to a subscribed master that asks it, every ``interval``, for one of
    its buckets' anchors, which must still name it. A subscribed connection alone cannot tell:
    a master cut off from its cluster keeps answering PING while the others promote its
    replica, and never unsubscribes anyone. Such a node answers ``CLUSTERDOWN`` once it sees it
    is cut off, a node that gave the slot up answers ``MOVED`` (or ``ASK`` while it migrates),
    and an anchor that names another node means subscribers registered elsewhere: each is a
    blind period."""

    def __init__(self, conn: Any, anchor: str, node_id: bytes, link: Link) -> None:
        self.node_id = node_id
        self.link = Link(conn, link.interval, link.timeout, probe=("GET", anchor))
        self.link.listening()
        self.sock = self.link.sock

    def due(self, now: float) -> float:
        return self.link.due(now)

    def on_readable(self) -> None:
        link = self.link
        link.reader.fill()
        for reply in link.replies():
            if isinstance(reply, RespError):
                raise SlotMoved(f"{link.where} answers {reply} for its bucket's anchor")
            if reply != self.node_id:
                raise SlotMoved(f"the anchor on {link.where} names {reply!r}: subscribers moved")
            link.answered()


class RedisShardedPubSubTransport(SubscriberThread):
    """Sharded Pub/Sub on the cluster that ``l2`` (a :class:`RedisClusterL2`) writes to.

    ``seeds``: nodes to ask for the slot map (the cluster URL's nodes); the nodes the L2 client
    knows of are asked too. Health checks as for ``RedisPubSubTransport``, per connection.
    """

    tracks_delivery = True

    def __init__(
        self,
        l2: RedisClusterL2,
        seeds: Sequence[Address],
        *,
        health_check_interval: float = 0.5,
        health_check_timeout: float = 0.5,
        reconnect_backoff: tuple[float, float] = (0.05, 2.0),
        connection_options: dict[str, Any] | None = None,
    ) -> None:
        self._options = subscriber_options(
            health_check_interval, health_check_timeout, connection_options
        )
        if not seeds:
            raise ValueError("seeds: at least one node of the cluster")
        self.l2 = l2
        self.seeds = list(seeds)
        self.channel = l2.channels
        self._channels = [l2.channel(b) for b in range(l2.buckets)]
        self._anchors = [l2.anchor(b) for b in range(l2.buckets)]
        self._slots = [key_slot(c.encode()) for c in self._channels]
        self.health_check_interval = health_check_interval
        self.health_check_timeout = health_check_timeout
        self._backoff_min, self._backoff_max = reconnect_backoff
        self._conns: list[Any] = []
        self._init_thread()

    # -- publishing ---------------------------------------------------------------------------

    def script_channel(self, l2: L2Store) -> str | None:
        # Only the store whose buckets these channels are: its scripts publish on each.
        return self.channel if l2 is self.l2 else None

    def publish(self, message: bytes) -> None:
        """For a store whose scripts cannot publish: every message on the first bucket's
        channel (one channel keeps them in order; every subscriber listens to all), through
        the fence."""
        self.l2.publish(0, message)

    # -- subscribing --------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop_thread()

    def reset_after_fork(self) -> None:
        self._forget_thread()
        self._conns = []

    def _slot_map(self) -> dict[int, Address]:
        """Each bucket's master, from the first node that answers ``CLUSTER SLOTS``."""
        candidates = list(self.seeds)
        known: Any = self.l2._client
        if known is not None:
            with contextlib.suppress(Exception):
                candidates += [(n.host, n.port) for n in known.get_nodes()]
        errors = []
        for host, port in dict.fromkeys(candidates):
            try:
                with redis.Redis(host=host, port=port, **self._options) as probe:
                    ranges: Any = probe.execute_command("CLUSTER", "SLOTS")
            except RedisError as exc:
                errors.append(f"{host}:{port}: {exc}")
                continue
            owners: dict[int, Address] = {}
            for bucket, slot in enumerate(self._slots):
                for start, end, master, *_ in ranges:
                    if start <= slot <= end:
                        address = master[0]
                        owners[bucket] = (
                            address.decode() if isinstance(address, bytes) else address,
                            int(master[1]),
                        )
                        break
                else:
                    raise SlotMoved(f"slot {slot} (bucket {bucket}) has no master")
            return owners
        raise ConnectionError(f"no node answers CLUSTER SLOTS ({'; '.join(errors)})")

    def _register(self, address: Address, buckets: list[int]) -> tuple[Link, OwnershipProbe]:
        """Connect to ``address``, write its id to the buckets' anchors, subscribe to their
        channels. Returns the subscribed link and its ownership probe."""
        host, port = address
        conn: Any = redis.Connection(host=host, port=port, **self._options)  # type: ignore[no-untyped-call]
        self._conns.append(conn)
        conn.connect()
        link = Link(conn, self.health_check_interval, self.health_check_timeout)
        node_id = link.call("CLUSTER", "MYID")
        if not isinstance(node_id, bytes):
            raise ConnectionError(f"unexpected CLUSTER MYID reply {node_id!r} from {host}:{port}")
        # Pipelined: the anchors first (a MOVED here means the map is already stale), then the
        # subscriptions (one per channel: every bucket is its own slot).
        conn.send_packed_command(
            conn.pack_commands(
                [("SET", self._anchors[b], node_id) for b in buckets]
                + [("SSUBSCRIBE", self._channels[b]) for b in buckets]
            ),
            check_health=False,
        )
        for bucket in buckets:
            reply = link.read()
            if isinstance(reply, RespError):
                raise SlotMoved(f"anchor of bucket {bucket} on {host}:{port}: {reply}")
        confirmed = 0
        while confirmed < len(buckets):
            reply = link.read()
            if isinstance(reply, RespError):
                raise SlotMoved(f"SSUBSCRIBE on {host}:{port}: {reply}")
            if isinstance(reply, list) and reply and reply[0] == b"smessage":
                continue  # published between two confirmations: before on_connected, moot
            if not (isinstance(reply, list) and reply and reply[0] == b"ssubscribe"):
                raise ConnectionError(f"unexpected SSUBSCRIBE reply {reply!r}")
            confirmed += 1
        link.listening()
        control: Any = redis.Connection(host=host, port=port, **self._options)  # type: ignore[no-untyped-call]
        self._conns.append(control)
        control.connect()
        return link, OwnershipProbe(control, self._anchors[buckets[0]], node_id, link)

    def _subscribe_and_listen(self, listener: BackplaneListener) -> None:
        by_node: dict[Address, list[int]] = defaultdict(list)
        for bucket, address in self._slot_map().items():
            by_node[address].append(bucket)
        registered = [self._register(address, buckets) for address, buckets in by_node.items()]
        links = [link for link, _ in registered]
        probes = {probe.sock: probe for _, probe in registered}
        socks = [link.sock for link in links]
        watched = socks + list(probes)
        self.connects += 1
        self.progress.subscribed(*socks)
        listener.on_connected()

        next_tick = 0.0
        while not self._stop.is_set():
            for link in links:
                for reply in link.replies():
                    if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"smessage":
                        self._safe_call(listener.on_message, reply[2])
                    elif isinstance(reply, list) and reply and reply[0] == b"sunsubscribe":
                        raise SlotMoved(f"unsubscribed from {reply[1]!r}: its slot moved")
                    else:
                        log.warning("backplane %s: unexpected reply %r", self.channel, reply)
            now = time.monotonic()
            if now >= next_tick:
                self._safe_call(listener.on_tick)
                next_tick = now + TICK_INTERVAL
            wait = min(
                min(link.due(now) for link in links),
                min(probe.due(now) for probe in probes.values()),
            )
            if not any(link.reader.partial for link in links):  # part of a reply: stay busy
                self.progress.idle()
            readable, _, _ = select.select(watched, (), (), max(0.0, min(wait, next_tick - now)))
            self.progress.busy = True
            for link in links:
                if link.sock in readable:
                    link.reader.fill()
            for sock in readable:
                if sock in probes:
                    probes[sock].on_readable()

    def _close_conns(self) -> None:
        conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(Exception):  # already broken; nothing more to release
                conn.disconnect()
