"""The exceptions hybridinval raises: one tree, integrations' errors included.

Every error is a :class:`HybridInvalError`. Errors from redis-py are translated at the boundary
(``raise ... from exc``) so callers never have to import redis to handle a cache failure. The
integrations' errors are defined here too (they need neither SQLAlchemy nor Celery to be caught)
and re-exported by :mod:`hybridinval.sqlalchemy` and :mod:`hybridinval.celery`::

    HybridInvalError
    ├── BackendUnavailableError        Redis could not be reached or answered with an error
    ├── SerializationError             a value could not be encoded (names the key)
    ├── CorruptPayloadError            bytes read from L2 are not a payload this serializer wrote
    ├── CacheClosedError               the cache was used after close()
    ├── MissingExtraError              an optional dependency is not installed (names the extra)
    ├── SQLAlchemyIntegrationError     hybridinval.sqlalchemy
    │   ├── TransactionStateError      a unit-of-work call made outside a transaction
    │   ├── SessionNotInstalledError   the session's class was never install()ed
    │   ├── UntrackableRowError        a row's old cache keys cannot be known
    │   ├── AmbiguousCacheError        cached(session): the session has several caches
    │   └── OutboxError                install(outbox=...): a commit cannot write its outbox row
    └── NoWorkerCacheError             hybridinval.celery: no cache in this process

Bad keys and bad options raise the built-in ``TypeError`` (wrong type) or ``ValueError`` (empty,
too long, out of range), naming the key or option, because those are programming errors rather
than cache failures.
"""

from __future__ import annotations

__all__ = [
    "AmbiguousCacheError",
    "BackendUnavailableError",
    "CacheClosedError",
    "CorruptPayloadError",
    "HybridInvalError",
    "MissingExtraError",
    "NoWorkerCacheError",
    "OutboxError",
    "SQLAlchemyIntegrationError",
    "SerializationError",
    "SessionNotInstalledError",
    "TransactionStateError",
    "UntrackableRowError",
]


class HybridInvalError(Exception):
    """Root of every error raised by hybridinval."""


class BackendUnavailableError(HybridInvalError):
    """Redis (L2 or the backplane) could not be reached, or failed the command."""


class SerializationError(HybridInvalError):
    """A value could not be serialized; ``key`` names the cache key it was stored under."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class CorruptPayloadError(HybridInvalError, ValueError):
    """Bytes read from L2 are not a payload this serializer wrote (or were tampered with).

    The cache treats such a payload as a miss (logged and counted as ``l2_corrupt``); a
    :class:`~hybridinval.serializers.Serializer` raises it from ``loads``."""


class CacheClosedError(HybridInvalError):
    """The cache was used after :meth:`HybridCache.close`."""


class MissingExtraError(HybridInvalError, ImportError):
    """An optional dependency is missing; the message names the ``pip install`` that adds it."""

    def __init__(self, extra: str, feature: str, missing: str) -> None:
        super().__init__(
            f"{feature} needs {missing!r}, which is not installed: "
            f"pip install 'hybridinval[{extra}]'"
        )
        self.extra = extra
        self.name = missing


class SQLAlchemyIntegrationError(HybridInvalError):
    """Raised by :mod:`hybridinval.sqlalchemy`."""


class TransactionStateError(SQLAlchemyIntegrationError):
    """A unit-of-work call was made where no transaction is in progress."""


class SessionNotInstalledError(SQLAlchemyIntegrationError):
    """The session's class was never passed to ``hybridinval.sqlalchemy.install()``, so its
    changes would never be published."""


class UntrackableRowError(SQLAlchemyIntegrationError):
    """The old cache keys of a changed row cannot be known (e.g. it has no identity)."""


class NoWorkerCacheError(HybridInvalError, RuntimeError):
    """``hybridinval.celery.current_cache()`` was called in a process where the integration
    opened no cache."""


class AmbiguousCacheError(SQLAlchemyIntegrationError):
    """``hybridinval.sqlalchemy.cached(session)`` was not told which cache to read, and the
    session's class is installed with more than one."""


class OutboxError(SQLAlchemyIntegrationError):
    """A session installed with an outbox cannot write its commit's outbox row (a two-phase
    session, or no bind for the outbox table); the commit fails rather than commit without it."""
