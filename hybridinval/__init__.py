"""hybridinval: a per-process L1 cache over a shared Redis L2, kept correct across processes.

The public API is what this module exports; everything in a ``_module`` is private.
Optional integrations live in :mod:`hybridinval.sqlalchemy` and :mod:`hybridinval.celery`.
"""

from ._backplane import RedisPubSubTransport, Transport
from ._cache import MAX_KEY_LENGTH, HybridCache
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
    SerializationError,
    SessionNotInstalledError,
    SQLAlchemyIntegrationError,
    TransactionStateError,
    UntrackableRowError,
)
from .serializers import JsonSerializer, PickleSerializer, Serializer

__all__ = [
    "MAX_KEY_LENGTH",
    "AmbiguousCacheError",
    "BackendUnavailableError",
    "CacheClosedError",
    "CorruptPayloadError",
    "EmbeddedRedis",
    "HybridCache",
    "HybridInvalError",
    "JsonSerializer",
    "L1Store",
    "L2Store",
    "MemoryL1",
    "MissingExtraError",
    "NoWorkerCacheError",
    "NullL1",
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

__version__ = "0.1.0"
