"""L2: the shared Redis store, with a version per key so that no fill can write a stale value.

The Redis names are :class:`~hybridinval.keyspace.Keyspace`'s: a value key holds its version
(16 bytes) then the serialized payload; a version key holds the random token that every
invalidation or ``set()`` replaces.

An L2 hit is one ``GET`` of the value key: the version it was written under travels with it,
so a hit costs what a raw ``GET`` does. A fill that missed and will load reads value and
version key in one ``MGET`` (one round trip, atomic), and may write what it loaded only through
:meth:`RedisL2.cas_set`, a Lua compare-and-set that succeeds only while the version is still the
one it read. Versions are random 64-bit tokens, not counters, so a version key that expired and
was created again can never repeat an old value (the ABA problem a counter has). A version key
lives ``version_ttl`` after its last change; a fill that ran longer than half of that does not
write L2 at all (see ``HybridCache``). A value written while its key had no version key carries
``-`` x 16 and reads back as version ``b""``.

Invalidation and ``set()`` are single Lua scripts that also ``PUBLISH`` the backplane message when
asked to (``notify``; the transport decides, see ``Transport.script_channel``): the writes and the
message leave in one round trip, and the message is published only after the deletes, so a
process that hears it reads the new state.

This module never touches L1 and never swallows an error: every redis-py error becomes a
:class:`~hybridinval.errors.BackendUnavailableError`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError, RedisError

from .errors import BackendUnavailableError
from .keyspace import Keyspace

__all__ = ["L2Store", "Notify", "RedisL2", "redis_client", "redis_endpoint"]

Notify = tuple[str, bytes] | None
"""``(channel, message)``: publish ``message`` on ``channel`` after the writes, in the same round
trip; ``None``: publish nothing (the cache hands the message to the transport instead)."""

_ABSENT = b""  # what cas_set compares against when the version key did not exist
_VERSION_LENGTH = 16  # of every token (new_version) and of _NO_VERSION
_NO_VERSION = b"-" * _VERSION_LENGTH  # heads a value written while its key had no version

_INVALIDATE = """
local n = #KEYS / 2
for i = 1, n do
  redis.call('DEL', KEYS[i])
  redis.call('SET', KEYS[n + i], ARGV[1], 'PX', ARGV[2])
end
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return n
"""

_SET = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
return 1
"""

_CAS_SET = """
local current = redis.call('GET', KEYS[2]) or ''
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""


class L2Store(Protocol):
    """The L2 seam: values with a version per key. Every method may be called from any thread
    and raises ``BackendUnavailableError`` when the store fails (never another error for a
    store failure). :mod:`hybridinval.testing` has the behaviour suite every store must pass
    (``L2StoreContract``).

    Versions are opaque byte strings, ``b""`` for a key that has none. A version must change on
    every :meth:`set` and :meth:`invalidate_many`, and must never come back to a value it had
    before (the compare-and-set would then accept a stale write).
    """

    version_ttl: float
    """Seconds a version lives after its last change. The cache refuses to write L2 from a fill
    that ran longer than half of it, and to restore L1 entries set aside for longer than that."""

    def get(self, key: str) -> tuple[bytes | None, bytes | None]:
        """The hit path: ``(payload, the version it was written under)``, or ``(None, None)``
        on a miss (the version is then not read). One round trip."""
        ...

    def get_for_fill(self, key: str) -> tuple[bytes | None, bytes]:
        """``(payload or None, current version)`` read atomically, by a fill about to load (the
        version its :meth:`cas_set` must match)."""
        ...

    def cas_set(self, key: str, payload: bytes, ttl: float, version: bytes) -> bool:
        """Store ``payload`` for ``ttl`` seconds only if the key's version is still ``version``
        (the version is then unchanged). Returns whether it stored. Idempotent."""
        ...

    def set(self, key: str, payload: bytes, ttl: float, notify: Notify = None) -> bytes:
        """Store ``payload`` under a new version, which is returned; then ``notify``."""
        ...

    def invalidate_many(self, keys: Sequence[str], notify: Notify = None) -> None:
        """Delete ``keys`` and give each a new version, atomically; then ``notify``. One round
        trip. Idempotent."""
        ...

    def versions(self, keys: Sequence[str]) -> list[bytes]:
        """The current version of each key, in order, in few round trips."""
        ...

    def incarnation(self) -> str:
        """A token that changes whenever the store may have lost versions (restart, failover,
        flush). Entries set aside across a change are never restored."""
        ...

    def reconnect(self) -> None:
        """Drop idle pooled connections (after a network fault they may be silently dead)."""
        ...

    def reset_after_fork(self) -> None:
        """Forget the parent's connections without closing them (this is a new child)."""
        ...

    def close(self) -> None:
        """Release connections. Idempotent."""
        ...


class RedisL2:
    """The default L2 on one Redis server (or a proxy in front of one).

    ``namespace`` (or a :class:`~hybridinval.keyspace.Keyspace`) scopes every key it writes.
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str | Keyspace,
        *,
        version_ttl: float = 600.0,
        endpoint: tuple[str, str, int] | None = None,
        async_connect: Callable[[], Any] | None = None,
    ) -> None:
        """``endpoint``: which server this is, when the client's options do not say (a
        Sentinel-managed pool); ``async_connect``: makes the ``redis.asyncio`` client the
        asyncio cache uses beside this one (default: one with this client's options)."""
        if version_ttl <= 0:
            raise ValueError(f"version_ttl must be > 0, got {version_ttl!r}")
        self.client = client
        self.keyspace = namespace if isinstance(namespace, Keyspace) else Keyspace(namespace)
        self.version_ttl = version_ttl
        self.endpoint = endpoint or redis_endpoint(client.connection_pool.connection_kwargs)
        self.async_connect = async_connect
        self.reconnects = 0
        self._data_prefix = self.keyspace.data_prefix
        self._version_prefix = self.keyspace.version_prefix
        self._version_ttl_ms = str(_ms(version_ttl))
        # The incarnation marker outlives any gap the cache would restore across (version_ttl/2).
        self._incarnation_ttl_ms = _ms(2 * version_ttl)
        self._mget = client.mget
        self._execute: Callable[..., Any] = client.execute_command  # untyped in redis-py
        self._invalidate = client.register_script(_INVALIDATE)
        self._set = client.register_script(_SET)
        self._cas_set = client.register_script(_CAS_SET)

    def _eval(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        # EVALSHA straight through execute_command: redis-py's Script.__call__ costs tens of
        # microseconds more per call, on the publish path of every commit. NOSCRIPT (a restarted
        # or flushed server) falls back to Script, which loads the script and retries.
        try:
            return self._execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return script(keys=keys, args=args)

    def get(self, key: str) -> tuple[bytes | None, bytes | None]:
        try:
            # execute_command rather than client.get(): the same command with less of
            # redis-py's per-call handling. (Replies are bytes: no decode_responses.)
            stored = self._execute("GET", self._data_prefix + key)
        except RedisError as exc:
            raise BackendUnavailableError(f"L2 read of {key!r} failed: {exc}") from exc
        return split_stored(stored)

    def get_for_fill(self, key: str) -> tuple[bytes | None, bytes]:
        try:
            stored, version = self._execute(
                "MGET", self._data_prefix + key, self._version_prefix + key
            )
        except RedisError as exc:
            raise BackendUnavailableError(f"L2 read of {key!r} failed: {exc}") from exc
        return split_for_fill(stored, version)

    def cas_set(self, key: str, payload: bytes, ttl: float, version: bytes) -> bool:
        try:
            stored = self._eval(self._cas_set, *self.cas_set_args(key, payload, ttl, version))
        except RedisError as exc:
            raise BackendUnavailableError(f"L2 write of {key!r} failed: {exc}") from exc
        return bool(stored)

    def set(self, key: str, payload: bytes, ttl: float, notify: Notify = None) -> bytes:
        version = new_version()
        try:
            self._eval(self._set, *self.set_args(key, payload, ttl, version, notify))
        except RedisError as exc:
            raise BackendUnavailableError(f"L2 set of {key!r} failed: {exc}") from exc
        return version

    def versions(self, keys: Sequence[str]) -> list[bytes]:
        out: list[bytes] = []
        prefix = self._version_prefix
        try:
            for start in range(0, len(keys), 1000):  # bounded replies; still few round trips
                chunk = [prefix + k for k in keys[start : start + 1000]]
                out += [v or _ABSENT for v in self._mget(chunk)]  # type: ignore[misc]
        except RedisError as exc:
            raise BackendUnavailableError(f"L2 version read failed: {exc}") from exc
        return out

    def invalidate_many(self, keys: Sequence[str], notify: Notify = None) -> None:
        try:
            self._eval(self._invalidate, *self.invalidate_args(keys, notify))
        except RedisError as exc:
            raise BackendUnavailableError(
                f"L2 invalidation of {len(keys)} key(s) failed: {exc}"
            ) from exc

    # -- the scripts' arguments (shared with the asyncio store, hybridinval._l2_async) --------

    def cas_set_args(
        self, key: str, payload: bytes, ttl: float, version: bytes
    ) -> tuple[tuple[str, str], tuple[Any, ...]]:
        return (
            (self._data_prefix + key, self._version_prefix + key),
            (version, (version or _NO_VERSION) + payload, _ms(ttl)),
        )

    def set_args(
        self, key: str, payload: bytes, ttl: float, version: bytes, notify: Notify
    ) -> tuple[tuple[str, str], tuple[Any, ...]]:
        channel, message = notify or _NO_NOTIFY
        return (
            (self._data_prefix + key, self._version_prefix + key),
            (version + payload, _ms(ttl), version, self._version_ttl_ms, channel, message),
        )

    def invalidate_args(
        self, keys: Sequence[str], notify: Notify
    ) -> tuple[list[str], tuple[Any, ...]]:
        channel, message = notify or _NO_NOTIFY
        redis_keys = [self._data_prefix + k for k in keys]
        redis_keys += [self._version_prefix + k for k in keys]
        return redis_keys, (new_version(), self._version_ttl_ms, channel, message)

    def incarnation(self) -> str:
        # run_id changes on every restart and differs on a promoted replica; the marker key
        # disappears with FLUSHALL/FLUSHDB. Either way versions may have been lost, and an
        # unchanged version token would prove nothing.
        marker = self.keyspace.incarnation
        try:
            # One round trip: create the marker if absent, refresh its lifetime, read it back.
            pipe = self.client.pipeline(transaction=False)
            pipe.set(marker, new_version(), nx=True, px=self._incarnation_ttl_ms)
            pipe.pexpire(marker, self._incarnation_ttl_ms)
            pipe.get(marker)
            pipe.info("server")
            _, _, token, info = pipe.execute()
            run_id = info.get("run_id", "")
        except RedisError as exc:
            raise BackendUnavailableError(f"L2 incarnation read failed: {exc}") from exc
        return f"{run_id}:{token!r}"

    def reconnect(self) -> None:
        self.reconnects += 1  # the asyncio twin (hybridinval._l2_async) follows this count
        # Idle connections only: closing a socket under another thread's command makes redis-py
        # fail with errors that are not RedisErrors. A command in flight on a dead socket ends
        # with its socket timeout, as it would have anyway.
        self.client.connection_pool.disconnect(inuse_connections=False)

    def close(self) -> None:
        self.client.close()

    def reset_after_fork(self) -> None:
        # The pool's sockets belong to the parent; forget them without closing (redis-py's
        # ConnectionPool._checkpid would do the same lazily, this makes it explicit).
        self.client.connection_pool.reset()


_NO_NOTIFY = ("", b"")


def split_stored(stored: bytes | None) -> tuple[bytes | None, bytes | None]:
    """A value key's content as ``(payload, version)`` (``(None, None)`` when absent)."""
    if stored is None:
        return None, None
    version = stored[:_VERSION_LENGTH]
    return stored[_VERSION_LENGTH:], (_ABSENT if version == _NO_VERSION else version)


def split_for_fill(stored: bytes | None, version: bytes | None) -> tuple[bytes | None, bytes]:
    """An MGET of value key and version key as ``(payload or None, current version)``."""
    return (None if stored is None else stored[_VERSION_LENGTH:]), version or _ABSENT


def new_version() -> bytes:
    return secrets.token_hex(8).encode()


def _ms(seconds: float) -> int:
    # PX needs a positive integer; sub-millisecond TTLs round up rather than to "no expiry".
    return max(1, int(seconds * 1000))


def redis_client(url: str, **options: Any) -> redis.Redis:
    """A redis-py client with timeouts suited to a cache: fail fast rather than hang a request."""
    options.setdefault("socket_timeout", 1.0)
    options.setdefault("socket_connect_timeout", 1.0)
    options.setdefault("health_check_interval", 0)
    options.setdefault("protocol", 2)  # the same replies on every redis-py version and server
    return redis.Redis.from_url(url, **options)


def redis_endpoint(connection_kwargs: dict[str, Any]) -> tuple[str, str, int]:
    """Which server a redis-py client's (or URL's) connection options reach: ``("unix", path,
    0)`` or ``("tcp", host, port)``. Equal endpoints mean one server; unequal ones may still be
    one (``localhost`` and ``127.0.0.1``), which only costs a separate publish."""
    path = connection_kwargs.get("path")
    if path:
        return ("unix", str(path), 0)
    return (
        "tcp",
        str(connection_kwargs.get("host") or "localhost"),
        int(connection_kwargs.get("port") or 6379),
    )
