"""L2 on a Redis Cluster: :class:`RedisClusterL2`, the twin of :class:`~hybridinval.RedisL2`.

The same values, versions and scripts, laid out so that every script stays in one slot. A key
belongs to one of ``buckets`` buckets (CRC-32 of the key); a bucket's names share a hash tag,
``hi:{<namespace>:<bucket>}:d:<key>`` and ``...:v:<key>``, so a key's value and version live in
one slot (the compare-and-set reads one and writes the other atomically). A batch invalidation
is one script call per bucket it touches, all of them pipelined: redis-py sends each node its
calls in one write and reads the replies after, so the round trips to the nodes overlap.

Buckets rather than a hash tag per key: a fixed, small set of slots is what lets a bucket's
backplane channel (sharded Pub/Sub, ``hi:{<namespace>:<bucket>}:inval``) live in the same slot as
its keys, so that the script that deletes them also publishes their message (``SPUBLISH`` of the
part of the message that names that bucket's keys): a process that hears it reads the new state,
and the messages spread over the shards. Every process of a namespace must use the same number
of buckets.

**The subscription fence.** A sharded message reaches only the subscribers of the node that
published it, and a slot can move (a migration, a failover) before its subscribers learn of it.
So each bucket has an *anchor* key, ``hi:{<namespace>:<bucket>}:subscribed``, holding the id of the
node its subscribers registered on (they set it just before ``SSUBSCRIBE``; see
:mod:`hybridinval.transports.redis_sharded`). A script that is to publish first compares the
anchor with ``CLUSTER MYID`` and, on another node, refuses with ``TRYAGAIN`` before writing
anything: the anchor travels with the slot, so the node a slot moved to (or a promoted replica)
publishes nothing until a subscriber has registered there, and the writer retries (a committed
invalidation goes to the background retry). The anchor is one of the script's keys, so that a
migrating slot sends the script to the node that holds it. Anchors have no TTL: a
``maxmemory-policy`` of ``allkeys-*`` may evict them, which reopens the window (use a
``volatile-*`` policy).
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import redis
import redis.cluster
from redis.exceptions import RedisClusterException, RedisError

from ._l2 import (
    _CAS_SET,
    _NO_VERSION,
    Notify,
    _ms,
    new_version,
    split_for_fill,
    split_stored,
)
from ._message import with_keys
from .errors import BackendUnavailableError
from .keyspace import Keyspace

__all__ = ["DEFAULT_BUCKETS", "RedisClusterL2"]

DEFAULT_BUCKETS = 64

# The fence (see above), then RedisL2's scripts with the anchor as the last key and SPUBLISH.
_FENCE = """
if ARGV[#ARGV - 1] ~= '' then
  local anchor = redis.call('GET', KEYS[#KEYS])
  if anchor and anchor ~= redis.call('CLUSTER', 'MYID') then
    return redis.error_reply('TRYAGAIN the subscribers of this bucket registered on another node')
  end
end
"""

_INVALIDATE = (
    _FENCE
    + """
local n = (#KEYS - 1) / 2
for i = 1, n do
  redis.call('DEL', KEYS[i])
  redis.call('SET', KEYS[n + i], ARGV[1], 'PX', ARGV[2])
end
if ARGV[3] ~= '' then redis.call('SPUBLISH', ARGV[3], ARGV[4]) end
return n
"""
)

_SET = (
    _FENCE
    + """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
if ARGV[5] ~= '' then redis.call('SPUBLISH', ARGV[5], ARGV[6]) end
return 1
"""
)

_PUBLISH = (
    _FENCE
    + """
return redis.call('SPUBLISH', ARGV[1], ARGV[2])
"""
)

# redis-py's cluster failures (no node reachable, slots uncovered) are not RedisErrors.
_ERRORS = (RedisError, RedisClusterException)


class RedisClusterL2:
    """An :class:`~hybridinval.L2Store` on a Redis Cluster (``connect()`` makes the
    ``RedisCluster`` client, again after fork)."""

    def __init__(
        self,
        connect: Callable[[], redis.cluster.RedisCluster],
        namespace: str | Keyspace,
        *,
        version_ttl: float = 600.0,
        buckets: int = DEFAULT_BUCKETS,
    ) -> None:
        if version_ttl <= 0:
            raise ValueError(f"version_ttl must be > 0, got {version_ttl!r}")
        if type(buckets) is not int or not 1 <= buckets <= 16384:
            raise ValueError(f"buckets must be an int in 1..16384, got {buckets!r}")
        self._connect = connect
        self._client: redis.cluster.RedisCluster | None = None  # connected on first use
        self.keyspace = namespace if isinstance(namespace, Keyspace) else Keyspace(namespace)
        self.version_ttl = version_ttl
        self.buckets = buckets
        self.endpoint = ("cluster", self.keyspace.namespace, id(self))
        self.reconnects = 0
        self.async_connect = None
        self._version_ttl_ms = str(_ms(version_ttl))
        self._incarnation_ttl_ms = _ms(2 * version_ttl)
        namespace_name = self.keyspace.namespace
        self._tags = [f"hi:{{{namespace_name}:{b}}}:" for b in range(buckets)]
        self._sources = {
            "invalidate": _INVALIDATE,
            "set": _SET,
            "cas_set": _CAS_SET,
            "publish": _PUBLISH,
        }
        self._scripts: dict[str, Any] = {}

    @property
    def client(self) -> redis.cluster.RedisCluster:
        """The cluster client, made on first use (discovering the cluster is network I/O,
        which neither a cache's construction nor a forked child's reset may do)."""
        client = self._client
        if client is None:
            try:
                client = self._client = self._connect()
            except _ERRORS as exc:
                raise BackendUnavailableError(f"Redis Cluster unreachable: {exc}") from exc
            self._scripts = {n: client.register_script(src) for n, src in self._sources.items()}
        return client

    # -- names ----------------------------------------------------------------------------------

    def bucket(self, key: str) -> int:
        return zlib.crc32(key.encode()) % self.buckets

    def names(self, key: str) -> tuple[str, str]:
        """The value key and the version key of ``key`` (one slot)."""
        tag = self._tags[self.bucket(key)]
        return tag + "d:" + key, tag + "v:" + key

    def channel(self, bucket: int) -> str:
        """The sharded channel of ``bucket`` (the slot of its keys)."""
        return self._tags[bucket] + "inval"

    def anchor(self, bucket: int) -> str:
        """The key naming the node ``bucket``'s subscribers registered on (the fence)."""
        return self._tags[bucket] + "subscribed"

    @property
    def channels(self) -> str:
        """The channel layout, for the logs (one channel per bucket)."""
        return f"hi:{{{self.keyspace.namespace}:*}}:inval"

    # -- the L2Store protocol ------------------------------------------------------------------

    def _eval(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        self.client  # noqa: B018 - connects, registers the scripts
        return self._scripts[name](keys=keys, args=args)

    def get(self, key: str) -> tuple[bytes | None, bytes | None]:
        try:
            stored = self.client.get(self.names(key)[0])
        except _ERRORS as exc:
            raise BackendUnavailableError(f"L2 read of {key!r} failed: {exc}") from exc
        return split_stored(stored)  # type: ignore[arg-type]

    def get_for_fill(self, key: str) -> tuple[bytes | None, bytes]:
        try:
            found: Any = self.client.mget(self.names(key))  # one slot: atomic
            stored, version = found
        except _ERRORS as exc:
            raise BackendUnavailableError(f"L2 read of {key!r} failed: {exc}") from exc
        return split_for_fill(stored, version)

    def cas_set(self, key: str, payload: bytes, ttl: float, version: bytes) -> bool:
        try:
            stored = self._eval(
                "cas_set", self.names(key), (version, (version or _NO_VERSION) + payload, _ms(ttl))
            )
        except _ERRORS as exc:
            raise BackendUnavailableError(f"L2 write of {key!r} failed: {exc}") from exc
        return bool(stored)

    def set(self, key: str, payload: bytes, ttl: float, notify: Notify = None) -> bytes:
        """As :meth:`L2Store.set`; ``notify``'s message goes out on the key's bucket channel
        (its channel part only says that the script publishes)."""
        version = new_version()
        bucket = self.bucket(key)
        channel, message = (self.channel(bucket), notify[1]) if notify else ("", b"")
        try:
            self._eval(
                "set",
                (*self.names(key), self.anchor(bucket)),
                (version + payload, _ms(ttl), version, self._version_ttl_ms, channel, message),
            )
        except _ERRORS as exc:
            raise BackendUnavailableError(f"L2 set of {key!r} failed: {exc}") from exc
        return version

    def invalidate_many(self, keys: Sequence[str], notify: Notify = None) -> None:
        """As :meth:`L2Store.invalidate_many`: one script per bucket, all pipelined. With
        ``notify``, each script publishes on its bucket's channel the part of the message that
        names that bucket's keys."""
        by_bucket: dict[int, list[str]] = defaultdict(list)
        for key in keys:
            by_bucket[self.bucket(key)].append(key)
        calls: list[tuple[list[str], tuple[Any, ...]]] = []
        for bucket, members in by_bucket.items():
            names = [self.names(k) for k in members]
            redis_keys = [d for d, _ in names] + [v for _, v in names] + [self.anchor(bucket)]
            if notify is None:
                channel, message = "", b""
            elif len(by_bucket) == 1:
                channel, message = self.channel(bucket), notify[1]
            else:
                channel, message = self.channel(bucket), with_keys(notify[1], members)
            calls.append((redis_keys, (new_version(), self._version_ttl_ms, channel, message)))
        try:
            if len(calls) == 1:
                self._eval("invalidate", *calls[0])
            else:
                self._pipelined(calls)
        except _ERRORS as exc:
            raise BackendUnavailableError(
                f"L2 invalidation of {len(keys)} key(s) failed: {exc}"
            ) from exc

    def _pipelined(self, calls: list[tuple[list[str], tuple[Any, ...]]]) -> None:
        """The invalidation scripts of several buckets in one pipeline."""
        client: Any = self.client  # redis-py's cluster API is partly untyped
        pipe = client.pipeline()
        sha = self._scripts["invalidate"].sha
        for redis_keys, args in calls:
            pipe.evalsha(sha, len(redis_keys), *redis_keys, *args)
        try:
            pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except _ERRORS:
            # A node lost its scripts, or a slot is moving (redis-py's pipeline gives up on a
            # redirection the single call follows): each bucket again, alone. Idempotent.
            for redis_keys, args in calls:
                self._eval("invalidate", redis_keys, args)

    def publish(self, bucket: int, message: bytes) -> None:
        """``message`` on ``bucket``'s channel, behind the same fence as the write scripts (for
        a transport whose messages no script carries)."""
        try:
            self._eval("publish", (self.anchor(bucket),), (self.channel(bucket), message))
        except _ERRORS as exc:
            raise BackendUnavailableError(f"publish on bucket {bucket} failed: {exc}") from exc

    def versions(self, keys: Sequence[str]) -> list[bytes]:
        try:
            found = self.client.mget_nonatomic([self.names(k)[1] for k in keys])
        except _ERRORS as exc:
            raise BackendUnavailableError(f"L2 version read failed: {exc}") from exc
        return [v or b"" for v in found]

    def incarnation(self) -> str:
        # Any node restarted or failed over, or the namespace's marker flushed: versions may
        # have been lost somewhere.
        marker = self._tags[0] + "incarnation"
        try:
            self.client.set(marker, new_version(), nx=True, px=self._incarnation_ttl_ms)
            self.client.pexpire(marker, self._incarnation_ttl_ms)
            token = self.client.get(marker)
            infos = self.client.info("server", target_nodes=redis.cluster.RedisCluster.PRIMARIES)
        except _ERRORS as exc:
            raise BackendUnavailableError(f"L2 incarnation read failed: {exc}") from exc
        run_ids = sorted(
            str(info.get("run_id", "")) for info in infos.values() if isinstance(info, dict)
        )
        return f"{','.join(run_ids)}:{token!r}"

    def reconnect(self) -> None:
        self.reconnects += 1
        if self._client is None:
            return
        client: Any = self._client
        for node in client.get_nodes():
            connection = node.redis_connection
            if connection is not None:
                connection.connection_pool.disconnect(inuse_connections=False)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def reset_after_fork(self) -> None:
        self._client = None  # the parent's sockets: forgotten, not closed
