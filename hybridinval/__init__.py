"""hybridinval: a per-process L1 cache over a shared Redis L2, kept correct across processes.

The public API is what this module exports; everything in a ``_module`` is private.
Optional integrations live in :mod:`hybridinval.sqlalchemy` and :mod:`hybridinval.celery`.
"""

from ._async import AsyncHybridCache
from ._cache import CacheStats, HybridCache
from ._config import CacheConfig
from ._embedded import EmbeddedRedis
from ._l1 import L1Store, MemoryL1, NullL1
from ._l2 import L2Store, RedisL2
from .errors import (
    AmbiguousCacheError,
    BackendUnavailableError,
    CacheClosedError,
    CorruptPayloadError,
    HybridInvalError,
    MissingExtraError,
    NoWorkerCacheError,
    OutboxError,
    SerializationError,
    SessionNotInstalledError,
    SQLAlchemyIntegrationError,
    TransactionStateError,
    UntrackableRowError,
)
from .keyspace import MAX_KEY_LENGTH, Keyspace
from .serializers import JsonSerializer, PickleSerializer, Serializer
from .transports import BackplaneListener, RedisPubSubTransport, Transport

__all__ = [
    "MAX_KEY_LENGTH",
    "AmbiguousCacheError",
    "AsyncHybridCache",
    "BackendUnavailableError",
    "BackplaneListener",
    "CacheClosedError",
    "CacheConfig",
    "CacheStats",
    "CorruptPayloadError",
    "EmbeddedRedis",
    "HybridCache",
    "HybridInvalError",
    "JsonSerializer",
    "Keyspace",
    "L1Store",
    "L2Store",
    "MemoryL1",
    "MissingExtraError",
    "NoWorkerCacheError",
    "NullL1",
    "OutboxError",
    "PickleSerializer",
    "RedisL2",
    "RedisPubSubTransport",
    "SQLAlchemyIntegrationError",
    "SerializationError",
    "Serializer",
    "SessionNotInstalledError",
    "TransactionStateError",
    "Transport",
    "UntrackableRowError",
]

from ._version import __version__ as __version__
