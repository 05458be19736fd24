"""Every Redis name hybridinval uses, and the checks on cache keys and namespaces.

One namespace owns everything under ``hi:{namespace}:``, so two applications can share a Redis
and a test can clean up after itself with one ``SCAN`` pattern (:attr:`Keyspace.pattern`)::

    hi:{ns}:d:{key}        the value: its version (16 bytes) then the payload     expires: l2_ttl
    hi:{ns}:v:{key}        the key's version token, replaced by every write        version_ttl
    hi:{ns}:incarnation    a marker whose loss proves the server was flushed       2 x version_ttl
    hi:{ns}:inval          the backplane's Pub/Sub channel (not a key)             -
    hi:{ns}:app:{name}     an application's own keys beside the cache (the        its writer's
                           example deployment's process statistics)

Nothing hybridinval writes lives forever. The incarnation marker is refreshed on every read and
only has to outlive a backplane gap that L1 entries could be restored across, which is bounded by
``version_ttl / 2``; if it expires anyway, the next restore drops its entries (safe, only slower).

The library, the example deployment, the demo and the tests all build names through
:class:`Keyspace`; nothing else spells ``hi:``.
"""

from __future__ import annotations

__all__ = ["MAX_KEY_LENGTH", "Keyspace", "check_key", "check_namespace"]

MAX_KEY_LENGTH = 1024
"""Longest cache key accepted by default, in characters. Keys travel in every backplane
message."""

_PREFIX = "hi"


def check_key(key: object, max_length: int = MAX_KEY_LENGTH) -> str:
    """``key`` if it is a usable cache key; else ``TypeError`` (not a ``str``) or ``ValueError``
    (empty, or longer than ``max_length``), naming the key."""
    if type(key) is not str:
        raise TypeError(f"cache key must be a str, got {type(key).__name__}: {key!r:.100}")
    if not key:
        raise ValueError("cache key must not be empty")
    if len(key) > max_length:
        raise ValueError(
            f"cache key {key[:64]!r}... is {len(key)} characters long; the limit is {max_length}"
        )
    return key


def check_namespace(namespace: object) -> str:
    """``namespace`` if it is usable: a non-empty ``str`` without spaces, braces or colons
    (braces are Redis Cluster hash tags; a colon would let one namespace's names overlap
    another's)."""
    if type(namespace) is not str:
        raise TypeError(f"namespace must be a str, got {type(namespace).__name__}: {namespace!r}")
    if not namespace or any(c in namespace for c in " {}:") or not namespace.isprintable():
        raise ValueError(
            "namespace must be a non-empty, printable string without spaces, braces or colons, "
            f"got {namespace!r}"
        )
    return namespace


class Keyspace:
    """The Redis names of one namespace (see the module docstring for the layout)."""

    __slots__ = (
        "channel",
        "data_prefix",
        "incarnation",
        "namespace",
        "pattern",
        "prefix",
        "version_prefix",
    )

    def __init__(self, namespace: str) -> None:
        self.namespace = check_namespace(namespace)
        self.prefix = f"{_PREFIX}:{namespace}:"
        self.data_prefix = self.prefix + "d:"
        self.version_prefix = self.prefix + "v:"
        self.incarnation = self.prefix + "incarnation"
        self.channel = self.prefix + "inval"
        self.pattern = self.prefix + "*"

    def data(self, key: str) -> str:
        """The Redis key holding ``key``'s value."""
        return self.data_prefix + key

    def version(self, key: str) -> str:
        """The Redis key holding ``key``'s version token."""
        return self.version_prefix + key

    def app(self, name: str) -> str:
        """A name for an application's own Redis key inside this namespace (never one of the
        cache's: those are built by the methods above)."""
        if not name:
            raise ValueError("an application key name must not be empty")
        return f"{self.prefix}app:{name}"

    def __repr__(self) -> str:
        return f"Keyspace({self.namespace!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Keyspace) and other.namespace == self.namespace

    def __hash__(self) -> int:
        return hash(self.namespace)
