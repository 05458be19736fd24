"""The exceptions hybridinval raises.

Every error is a :class:`HybridInvalError`. Errors from redis-py are translated at the boundary
(``raise ... from exc``) so callers never have to import redis to handle a cache failure::

    HybridInvalError
    ├── BackendUnavailableError      Redis could not be reached or answered with an error
    ├── SerializationError           a value could not be encoded (names the key)
    ├── CacheClosedError             the cache was used after close()
    └── TransactionStateError        a unit-of-work call made outside a transaction

Bad keys raise the built-in ``TypeError`` (not a ``str``) or ``ValueError`` (empty, too long),
naming the key, because those are programming errors rather than cache failures.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "CacheClosedError",
    "HybridInvalError",
    "SerializationError",
    "TransactionStateError",
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


class CacheClosedError(HybridInvalError):
    """The cache was used after :meth:`HybridCache.close`."""


class TransactionStateError(HybridInvalError):
    """A unit-of-work call was made where no transaction is in progress."""
