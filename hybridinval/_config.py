"""One configuration for a cache, used by its constructor and by ``from_url``.

Every option is documented once, here. ``HybridCache(l2=..., transport=..., config=...)`` and
``HybridCache.from_url(url, config=...)`` both take a :class:`CacheConfig`, and both also accept
its fields as keyword arguments (``from_url(url, namespace="app")``), which override the
config's. The options under "Redis" are used only by ``from_url``, which builds the seams from
them; a cache built from seams gets them from the seams.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._l1 import L1Store, MemoryL1, NullL1
from ._l2 import L2Store, RedisL2, redis_client
from ._sentinel import SCHEME as SENTINEL_SCHEME
from ._sentinel import SentinelTarget
from .errors import MissingExtraError
from .keyspace import MAX_KEY_LENGTH, Keyspace, check_namespace
from .serializers import Serializer, get_serializer
from .transports import RedisPubSubTransport, Transport

__all__ = [
    "DEFAULT_L1_LEASE",
    "DEFAULT_L1_LEASE_WAIT",
    "DEFAULT_SWITCH_INTERVAL",
    "CacheConfig",
    "build_redis_seams",
]

DEFAULT_SWITCH_INTERVAL = 0.0005
DEFAULT_L1_LEASE = 0.001
DEFAULT_L1_LEASE_WAIT = 0.05


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """How a :class:`~hybridinval.HybridCache` behaves. Frozen; ``dataclasses.replace`` or
    keyword arguments to the cache derive variants. Invalid values raise ``ValueError`` or
    ``TypeError`` naming the option."""

    namespace: str = "default"
    """Prefixes every Redis name (see :mod:`hybridinval.keyspace`), so several applications can
    share one Redis. Caches share invalidations only within one namespace."""

    l1_ttl: float = 60.0
    """Default lifetime of an L1 entry, in seconds (a call's ``ttl`` or ``l1_ttl`` caps it). A
    memory policy: coherence comes from invalidation, never from expiry."""

    l2_ttl: float = 3600.0
    """Default lifetime of an L2 value, in seconds (a call's ``ttl`` overrides it)."""

    l1_max_entries: int = 10_000
    """Bound on L1's size; beyond it the least recently used entries go (CLOCK)."""

    l1_enabled: bool = True
    """``False``: no L1 at all, every read goes to L2 (for measuring, or values that must not
    linger in process memory)."""

    max_key_length: int = MAX_KEY_LENGTH
    """Longest key accepted, in characters. Keys travel in every backplane message."""

    serializer: str | Serializer = "json"
    """``"json"`` (default, safe), ``"pickle"`` (signed: needs ``serializer_secret``) or any
    :class:`~hybridinval.Serializer`."""

    serializer_secret: bytes | str | None = None
    """The HMAC key of the pickle serializer; every process of the namespace needs the same."""

    l1_lease: float | None = DEFAULT_L1_LEASE
    """How long, in seconds, L1 may answer reads without checking that the backplane has applied
    every message that reached this process. Delivery alone bounds nothing on a busy machine:
    a descheduled process's request threads can serve many L1 hits before its subscriber thread
    runs again. With the lease, a read that begins more than ``l1_lease`` after an invalidation
    reached this process never returns the old value from L1. It costs one clock read per L1 hit
    and one non-blocking ``select()`` per lease period. ``None`` drops the check (staleness is
    then bounded only by how soon the subscriber thread runs)."""

    l1_lease_wait: float = DEFAULT_L1_LEASE_WAIT
    """How long a reader waits for a lagging subscriber before it flushes L1 instead (counted as
    ``lease_flushes``)."""

    switch_interval: float | None = DEFAULT_SWITCH_INTERVAL
    """The interpreter's thread switch interval (``sys.setswitchinterval``) the cache lowers to
    when its subscriber starts. The subscriber needs the GIL to evict; behind a CPU-bound thread
    it waits up to one interval per GIL hand-off, and applying a message takes a few. The
    setting is process-wide and only ever lowered; it costs nothing while one thread runs.
    ``None`` leaves it alone."""

    count_hits: bool = False
    """Count L1 hits for ``stats()["l1_hits"]``: free on the C hit path; on the pure-Python path
    a wrapper counts, which costs about as much as the hit itself. Other counters are always
    on."""

    failover_replay: float = 30.0
    """Seconds of this process's own invalidations it sends again when the store's incarnation
    changes (a failover, a restart): a replica promoted after its master died may lack the
    last writes the master acknowledged, and would serve the values they deleted under the
    versions they replaced. Cover the time a failover takes to be noticed (at most
    ``max_replayed`` keys are kept). ``0`` turns it off."""

    max_replayed: int = 100_000
    """Most keys kept for ``failover_replay`` (the oldest go first, with a warning)."""

    lag_samples: int = 4096
    """How many recent backplane lags ``stats()`` keeps for its percentiles."""

    # -- Redis (from_url only) --------------------------------------------------------------

    version_ttl: float = 600.0
    """Lifetime of a key's version token after its last change, in seconds; a fill that runs
    longer than half of it does not write L2 (its compare-and-set would prove nothing)."""

    socket_timeout: float = 1.0
    """Seconds a Redis command may take before the call fails over (reads fall back to the
    loader; writes raise ``BackendUnavailableError``)."""

    health_check_interval: float = 0.5
    """How often the subscriber PINGs through its own connection; with
    ``health_check_timeout`` it bounds how long a silently dead connection goes unnoticed."""

    health_check_timeout: float = 0.5
    """How long the subscriber waits for a PONG before it declares the connection dead."""

    client_name: str | None = None
    """Labels the cache's Redis connections (``CLIENT LIST``), to tell processes apart."""

    backplane: str | None = None
    """The backplane's URL when it is not L2's Redis: an AMQP broker (``amqp://`` or
    ``amqps://``, RabbitMQ) through kombu (the ``amqp`` extra); see
    :class:`~hybridinval.transports.kombu.KombuTransport`. ``None``: Pub/Sub on L2's Redis."""

    backplane_hub: str | None = None
    """The Unix socket of this host's hub (``hybridinval hub``, :mod:`hybridinval.hub`): the
    process then hears the backplane through the hub, which holds the host's one subscription,
    instead of subscribing to Redis itself (publishing does not change). For hosts with many
    processes: Redis fan-out costs per subscriber. ``None``: subscribe directly."""

    backplane_queue_expires: float = 60.0
    """With an AMQP backplane: how long a process's queue outlives its connection. A reconnect
    within it misses nothing (L1 is kept); a longer absence is a gap (L1 is checked against
    L2)."""

    def __post_init__(self) -> None:
        check_namespace(self.namespace)
        for name in ("l1_ttl", "l2_ttl", "version_ttl", "socket_timeout"):
            _positive(name, getattr(self, name))
        for name in ("health_check_interval", "health_check_timeout", "backplane_queue_expires"):
            _positive(name, getattr(self, name))
        if self.backplane_hub is not None:
            if not isinstance(self.backplane_hub, str) or not self.backplane_hub:
                raise ValueError(
                    f"backplane_hub must be a Unix socket path (or None), "
                    f"got {self.backplane_hub!r}"
                )
            check_socket_path("backplane_hub", self.backplane_hub)
        if self.backplane is not None and not (
            isinstance(self.backplane, str) and self.backplane.startswith(("amqp://", "amqps://"))
        ):
            raise ValueError(
                f"backplane must be an amqp:// or amqps:// URL (or None), got {self.backplane!r}"
            )
        for name in ("l1_max_entries", "max_key_length", "lag_samples", "max_replayed"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.l1_lease is not None:
            _positive("l1_lease", self.l1_lease)
        replay = self.failover_replay
        if isinstance(replay, bool) or not isinstance(replay, int | float) or replay < 0:
            raise ValueError(f"failover_replay must be >= 0 seconds, got {self.failover_replay!r}")
        if self.l1_lease_wait < 0:
            raise ValueError(f"l1_lease_wait must be >= 0, got {self.l1_lease_wait!r}")
        if self.switch_interval is not None:
            _positive("switch_interval", self.switch_interval)

    @classmethod
    def of(cls, config: CacheConfig | None, options: Mapping[str, Any]) -> CacheConfig:
        """``config`` (or the defaults) with ``options`` applied; an unknown option is a
        ``TypeError`` that names it."""
        base = config if config is not None else _DEFAULT
        if not options:
            return base
        unknown = sorted(set(options) - _FIELDS)
        if unknown:
            raise TypeError(
                f"unknown cache option(s) {', '.join(map(repr, unknown))}; "
                f"the options are the fields of CacheConfig: {', '.join(sorted(_FIELDS))}"
            )
        return dataclasses.replace(base, **options)

    def build_l1(self) -> L1Store:
        return MemoryL1(self.l1_max_entries) if self.l1_enabled else NullL1()

    def build_serializer(self) -> Serializer:
        return get_serializer(self.serializer, secret=self.serializer_secret)


MAX_SOCKET_PATH = 107  # bytes of a Unix socket's path (sun_path, with its terminating NUL)


def check_socket_path(name: str, path: str) -> None:
    """A Unix socket path the kernel takes, else a ``ValueError`` naming ``name``."""
    length = len(os.fsencode(path))
    if length > MAX_SOCKET_PATH:
        raise ValueError(
            f"{name}: the Unix socket path {path!r} is {length} bytes, more than the "
            f"{MAX_SOCKET_PATH} a socket's address holds; use a shorter one"
        )


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


_FIELDS = frozenset(field.name for field in dataclasses.fields(CacheConfig))
_DEFAULT = CacheConfig()


def build_redis_seams(url: str, config: CacheConfig) -> tuple[L2Store, Transport]:
    """L2 and the backplane for one URL: ``redis://``, ``rediss://`` or ``unix://`` (one
    server), ``redis+sentinel://`` (the master a Sentinel set names, see
    :mod:`hybridinval._sentinel`) or ``redis+cluster://`` (a Redis Cluster, see
    :func:`_cluster_seams`). The backplane is Pub/Sub on that Redis, or ``config.backplane``'s
    broker."""
    keyspace = Keyspace(config.namespace)
    named = {"client_name": config.client_name} if config.client_name else {}
    l2: L2Store
    locate: Callable[[], str] | None = None
    endpoint: tuple[str, str, int] | None = None
    cluster_nodes: list[tuple[str, int]] = []
    if url.startswith(CLUSTER_SCHEME):
        l2, cluster_nodes = _cluster_seams(url, keyspace, config, named)
    elif url.startswith(SENTINEL_SCHEME):
        target = SentinelTarget.parse(url)
        options = {
            "socket_timeout": config.socket_timeout,
            "socket_connect_timeout": 1.0,
            "protocol": 2,
            **named,
        }
        endpoint = target.endpoint
        l2 = RedisL2(
            target.client(**options),
            keyspace,
            version_ttl=config.version_ttl,
            endpoint=endpoint,
            async_connect=lambda: target.async_client(**options),
        )

        def locate() -> str:
            return target.master_url(**options)

    else:
        client = redis_client(url, socket_timeout=config.socket_timeout, **named)
        l2 = RedisL2(client, keyspace, version_ttl=config.version_ttl)
    transport: Transport
    if config.backplane is not None:
        from .transports.kombu import KombuTransport

        transport = KombuTransport(
            config.backplane,
            keyspace.channel,
            queue_expires=config.backplane_queue_expires,
            # AMQP heartbeats are whole seconds on the wire; a silent link is noticed within
            # two of them.
            heartbeat=max(1.0, config.health_check_interval + config.health_check_timeout),
            publish_timeout=config.socket_timeout,
        )
    elif cluster_nodes:
        from ._l2_cluster import RedisClusterL2
        from .transports.redis_sharded import RedisShardedPubSubTransport

        assert isinstance(l2, RedisClusterL2)
        transport = RedisShardedPubSubTransport(
            l2,
            cluster_nodes,
            health_check_interval=config.health_check_interval,
            health_check_timeout=config.health_check_timeout,
            connection_options=named,
        )
    else:
        transport = RedisPubSubTransport(
            url,
            keyspace.channel,
            health_check_interval=config.health_check_interval,
            health_check_timeout=config.health_check_timeout,
            connection_options=named,
            locate=locate,
            endpoint=endpoint,
        )
    if config.backplane_hub is not None:
        if config.backplane is not None:
            raise ValueError("backplane_hub relays Redis Pub/Sub: it cannot serve backplane=...")
        from .transports.hub import HubTransport

        transport = HubTransport(transport, config.backplane_hub)
    return l2, transport


CLUSTER_SCHEME = "redis+cluster://"


def _cluster_seams(
    url: str, keyspace: Keyspace, config: CacheConfig, named: dict[str, Any]
) -> tuple[L2Store, list[tuple[str, int]]]:
    """A Redis Cluster (``redis+cluster://host:port[,host:port...]``): L2 on every node
    (:class:`~hybridinval._l2_cluster.RedisClusterL2`) and the nodes to discover it from; the
    backplane is sharded Pub/Sub (:mod:`hybridinval.transports.redis_sharded`)."""
    import redis
    from redis.cluster import ClusterNode, RedisCluster

    from ._l2_cluster import RedisClusterL2

    if _version_tuple(redis.__version__) < MIN_REDIS_PY_FOR_CLUSTER:
        raise MissingExtraError("cluster", f"a Redis Cluster ({url!r})", "redis>=8.1")
    nodes = []
    for host_port in filter(None, url[len(CLUSTER_SCHEME) :].split("/")[0].split(",")):
        host, _, port = host_port.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{url!r}: expected redis+cluster://host:port[,host:port...]")
        nodes.append((host, int(port)))
    if not nodes:
        raise ValueError(f"{url!r}: expected redis+cluster://host:port[,host:port...]")

    def connect() -> RedisCluster:
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in nodes],  # type: ignore[no-untyped-call]
            socket_timeout=config.socket_timeout,
            socket_connect_timeout=1.0,
            protocol=2,
            **named,
        )

    return RedisClusterL2(connect, keyspace, version_ttl=config.version_ttl), nodes


# Sharded Pub/Sub in redis-py's cluster client follows slot moves and resubscribes after a
# reconnect only from 8.1 (#4038, #4044).
MIN_REDIS_PY_FOR_CLUSTER = (8, 1)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)
