"""L2 for :class:`~hybridinval.AsyncHybridCache`: the I/O of the read and write paths, awaited.

Only the calls the asyncio read and write paths make are here; everything else an L2 does (the
version reads of a restore, the incarnation, reconnects) runs on the backplane's thread through
the blocking :class:`~hybridinval._l2.L2Store` it stands beside.

:class:`AsyncRedisL2` speaks to the same server with the same names, versions and scripts as a
:class:`~hybridinval.RedisL2` (it takes their arguments from it), over ``redis.asyncio``. A
``redis.asyncio`` connection belongs to the event loop that opened it, and one process may run
several loops (a thread per loop, ``asyncio.run`` per Celery task), so it keeps one client per
loop. Connections of a loop that has closed are shut down when the next loop opens its own.

:class:`ThreadedL2` runs any blocking store's calls in the loop's default executor, so that a
custom or in-memory store serves the asyncio cache without blocking its loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import redis.asyncio
from redis.commands.core import Script
from redis.exceptions import NoScriptError, RedisError

from ._l2 import L2Store, Notify, RedisL2, new_version, split_for_fill, split_stored
from .errors import BackendUnavailableError

__all__ = ["AsyncL2Store", "AsyncRedisL2", "ThreadedL2"]

log = logging.getLogger("hybridinval")

# The connection options of a blocking client that mean the same to a redis.asyncio one. Others
# (redis-py's internal registries, retry objects, maintenance handlers) are not carried over.
_PORTABLE_OPTIONS = (
    "host",
    "port",
    "path",
    "db",
    "username",
    "password",
    "socket_timeout",
    "socket_connect_timeout",
    "socket_keepalive",
    "client_name",
    "protocol",
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_data",
    "ssl_check_hostname",
)


class AsyncL2Store(Protocol):
    """What the asyncio paths await; each method means what its namesake on
    :class:`~hybridinval.L2Store` means, and raises ``BackendUnavailableError`` on a store
    failure. Safe to call from any event loop of the process."""

    version_ttl: float

    async def get(self, key: str) -> tuple[bytes | None, bytes | None]: ...

    async def get_for_fill(self, key: str) -> tuple[bytes | None, bytes]: ...

    async def cas_set(self, key: str, payload: bytes, ttl: float, version: bytes) -> bool: ...

    async def set(self, key: str, payload: bytes, ttl: float, notify: Notify = None) -> bytes: ...

    async def invalidate_many(self, keys: Sequence[str], notify: Notify = None) -> None: ...

    async def aclose(self) -> None:
        """Release the running loop's connections (and forget those of loops that closed)."""
        ...

    def close(self) -> None:
        """Release every connection that can be released without its loop. Idempotent."""
        ...

    def reset_after_fork(self) -> None:
        """Forget the parent's connections without closing them (this is a new child)."""
        ...


class AsyncRedisL2:
    """The asyncio twin of ``l2``: same server, names, versions and scripts; one
    ``redis.asyncio`` client per event loop, made by ``connect`` (default: ``l2``'s connection
    options, those that mean the same to ``redis.asyncio``)."""

    def __init__(
        self, l2: RedisL2, connect: Callable[[], redis.asyncio.Redis] | None = None
    ) -> None:
        self._sync = l2
        self.version_ttl = l2.version_ttl
        self._data_prefix = l2.keyspace.data_prefix
        self._connect = connect or l2.async_connect or _connector_like(l2.client)
        # Per loop: its client, and the blocking store's reconnect count it was made at. Loops
        # of several threads may share this store: the map changes under a lock.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[Any, int]]
        self._clients = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        # (loop, client, reconnect count) of the last use, replaced as one reference (another
        # thread must never pair one loop with another loop's client): the common case, one
        # loop per process, skips the map and the lock.
        self._last: tuple[Any, Any, int] = (None, None, -1)

    def _execute(self) -> Callable[..., Any]:
        loop = asyncio.get_running_loop()
        last = self._last
        if last[0] is loop and last[2] == self._sync.reconnects:
            return last[1].execute_command  # type: ignore[no-any-return]
        return self._execute_slow(loop)

    def _execute_slow(self, loop: asyncio.AbstractEventLoop) -> Callable[..., Any]:
        generation = self._sync.reconnects
        with self._lock:
            known = self._clients.get(loop)
            if known is not None and known[1] == generation:
                client = known[0]
            else:
                self._release_closed_loops_locked()
                if known is not None:
                    # The backplane came back from a gap, and the blocking store dropped its
                    # pooled connections (the fault may have left them silently dead): so do
                    # we, on this loop. Commands in flight on the old ones end as they would.
                    self._closing.add(task := loop.create_task(known[0].aclose()))
                    task.add_done_callback(self._closing.discard)
                client = self._connect()
                self._clients[loop] = (client, generation)
        self._last = (loop, client, generation)
        return client.execute_command  # type: ignore[no-any-return]

    async def _eval(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        execute = self._execute()
        try:
            return await execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted or flushed server: load it and try once more
            await execute("SCRIPT", "LOAD", script.script)
            return await execute("EVALSHA", script.sha, len(keys), *keys, *args)

    async def get(self, key: str) -> tuple[bytes | None, bytes | None]:
        try:
            stored = await self._execute()("GET", self._data_prefix + key)
        except RedisError as exc:
            raise BackendUnavailableError(f"L2 read of {key!r} failed: {exc}") from exc
        return split_stored(stored)

    async def get_for_fill(self, key: str) -> tuple[bytes | None, bytes]:
        try:
            stored, version = await self._execute()(
                "MGET", self._data_prefix + key, self._sync.keyspace.version_prefix + key
            )
        except RedisError as exc:
            raise BackendUnavailableError(f"L2 read of {key!r} failed: {exc}") from exc
        return split_for_fill(stored, version)

    async def cas_set(self, key: str, payload: bytes, ttl: float, version: bytes) -> bool:
        l2 = self._sync
        try:
            stored = await self._eval(l2._cas_set, *l2.cas_set_args(key, payload, ttl, version))
        except RedisError as exc:
            raise BackendUnavailableError(f"L2 write of {key!r} failed: {exc}") from exc
        return bool(stored)

    async def set(self, key: str, payload: bytes, ttl: float, notify: Notify = None) -> bytes:
        l2 = self._sync
        version = new_version()
        try:
            await self._eval(l2._set, *l2.set_args(key, payload, ttl, version, notify))
        except RedisError as exc:
            raise BackendUnavailableError(f"L2 set of {key!r} failed: {exc}") from exc
        return version

    async def invalidate_many(self, keys: Sequence[str], notify: Notify = None) -> None:
        l2 = self._sync
        try:
            await self._eval(l2._invalidate, *l2.invalidate_args(keys, notify))
        except RedisError as exc:
            raise BackendUnavailableError(
                f"L2 invalidation of {len(keys)} key(s) failed: {exc}"
            ) from exc

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            known = self._clients.pop(loop, None)
            self._release_closed_loops_locked()
        if self._last[0] is loop:
            self._last = (None, None, -1)
        if known is not None:
            await known[0].aclose()

    def close(self) -> None:
        # Clients of loops still running elsewhere close on their own loop; the others (closed
        # loops, the running one: use aclose() there) have their sockets shut down here.
        running = asyncio._get_running_loop()
        with self._lock:
            clients, self._clients = list(self._clients.items()), weakref.WeakKeyDictionary()
            self._last = (None, None, -1)
        for loop, (client, _) in clients:
            if loop is not running and not loop.is_closed() and loop.is_running():
                with contextlib.suppress(RuntimeError):
                    asyncio.run_coroutine_threadsafe(client.aclose(), loop)
            else:
                _shut_down(client)

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self._clients = weakref.WeakKeyDictionary()
        self._last = (None, None, -1)

    def _release_closed_loops_locked(self) -> None:
        for loop, (client, _) in list(self._clients.items()):
            if loop.is_closed():
                del self._clients[loop]
                _shut_down(client)


def _shut_down(client: redis.asyncio.Redis) -> None:
    """End a client's connections without its loop (closed, or another thread's): shut the
    sockets down, so the server lets them go now rather than when they are collected."""
    pool = client.connection_pool
    for conn in [*pool._available_connections, *pool._in_use_connections]:
        writer = getattr(conn, "_writer", None)
        if writer is None:
            continue
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _connector_like(client: redis.Redis) -> Callable[[], redis.asyncio.Redis]:
    """Make ``redis.asyncio`` clients to the server ``client`` talks to, with the options that
    mean the same to both (timeouts, credentials, TLS, database, client name, protocol)."""
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k in _PORTABLE_OPTIONS}
    connection_class: type[redis.asyncio.connection.AbstractConnection]
    name = pool.connection_class.__name__
    if name == "UnixDomainSocketConnection":
        connection_class = redis.asyncio.UnixDomainSocketConnection
        kwargs.pop("host", None)
        kwargs.pop("port", None)
    elif name == "SSLConnection":
        connection_class = redis.asyncio.SSLConnection
    else:
        connection_class = redis.asyncio.Connection
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("ssl_")}

    def connect() -> redis.asyncio.Redis:
        return redis.asyncio.Redis(
            connection_pool=redis.asyncio.ConnectionPool(
                connection_class=connection_class, **kwargs
            )
        )

    return connect


class ThreadedL2:
    """Any blocking :class:`~hybridinval.L2Store`, awaited: each call runs in the running loop's
    default executor, so the loop goes on while the store works."""

    def __init__(self, l2: L2Store) -> None:
        self._l2 = l2
        self.version_ttl = l2.version_ttl

    async def _call(self, method: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, method, *args)

    async def get(self, key: str) -> tuple[bytes | None, bytes | None]:
        return await self._call(self._l2.get, key)  # type: ignore[no-any-return]

    async def get_for_fill(self, key: str) -> tuple[bytes | None, bytes]:
        return await self._call(self._l2.get_for_fill, key)  # type: ignore[no-any-return]

    async def cas_set(self, key: str, payload: bytes, ttl: float, version: bytes) -> bool:
        return await self._call(self._l2.cas_set, key, payload, ttl, version)  # type: ignore[no-any-return]

    async def set(self, key: str, payload: bytes, ttl: float, notify: Notify = None) -> bytes:
        return await self._call(self._l2.set, key, payload, ttl, notify)  # type: ignore[no-any-return]

    async def invalidate_many(self, keys: Sequence[str], notify: Notify = None) -> None:
        await self._call(self._l2.invalidate_many, keys, notify)

    async def aclose(self) -> None:
        pass  # the blocking store's connections are the cache's to close

    def close(self) -> None:
        pass

    def reset_after_fork(self) -> None:
        pass
