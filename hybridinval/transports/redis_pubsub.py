"""Redis Pub/Sub as the backplane: a subscriber thread on its own, health-checked connection.

Redis Pub/Sub is at-most-once: a message published while a subscriber is disconnected is lost,
and redis-py would resubscribe silently. So the subscriber here owns its connection and reports
every moment it may have missed something (connection error, EOF because Redis killed it,
health-check PING unanswered on a half-open socket) through ``on_blind`` *before* it tries
anything else, and reports ``on_connected`` only once Redis has confirmed the SUBSCRIBE. The cache
flushes L1 and refuses L1 stores between the two.

When L2 is a :class:`~hybridinval.RedisL2` on the same server, its write scripts publish the
message themselves (:meth:`RedisPubSubTransport.script_channel`): one round trip, and the message
never leaves before the deletes. On any other L2 the cache calls :meth:`publish` after the
writes.

Nothing here raises into the subscriber loop's caller or dies on bad input.
"""

from __future__ import annotations

import contextlib
import logging
import select
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.connection import parse_url
from redis.exceptions import RedisError

from .._l2 import L2Store, RedisL2, redis_endpoint
from ..errors import BackendUnavailableError
from ._base import TICK_INTERVAL, BackplaneListener
from ._resp import Link, subscriber_options
from ._subscriber import SubscriberThread

__all__ = ["RedisPubSubTransport"]

log = logging.getLogger("hybridinval.backplane")


class RedisPubSubTransport(SubscriberThread):
    """Redis Pub/Sub with health-checked subscription and loud blindness.

    ``channel`` is the namespace's (``Keyspace(namespace).channel``). ``health_check_interval``:
    how often the subscriber PINGs through its own connection. A PONG
    proves every message published before the PING was delivered; no PONG within
    ``health_check_timeout``, with nothing left to read, means the socket is half-open, and the
    cache goes blind. So a silent network failure is noticed within ``interval + timeout``. (A
    subscriber still reading a backlog is behind, not cut off: its PONG waits behind the
    backlog; Redis itself closes one that falls too far behind, past its output buffer limit.)
    """

    def __init__(
        self,
        url: str,
        channel: str,
        *,
        health_check_interval: float = 0.5,
        health_check_timeout: float = 0.5,
        reconnect_backoff: tuple[float, float] = (0.05, 2.0),
        connection_options: dict[str, Any] | None = None,
        locate: Callable[[], str] | None = None,
        endpoint: tuple[str, str, int] | None = None,
    ) -> None:
        """``locate``: returns the ``redis://`` URL to connect to now, asked at every
        (re)connect (the master of a Sentinel-managed service); default: ``url``. ``endpoint``:
        which server that is, for :meth:`script_channel`, when ``url`` does not say."""
        self._options = subscriber_options(
            health_check_interval, health_check_timeout, connection_options
        )
        self.url = url
        self.channel = channel
        self._locate = locate
        self.endpoint = endpoint or redis_endpoint(parse_url(url))  # type: ignore[no-untyped-call]
        self.health_check_interval = health_check_interval
        self.health_check_timeout = health_check_timeout
        self._backoff_min, self._backoff_max = reconnect_backoff
        self._publisher: redis.Redis | None = None
        self._conn: Any = None
        self._init_thread()

    tracks_delivery = True

    # -- publishing ---------------------------------------------------------------------------

    def script_channel(self, l2: L2Store) -> str | None:
        # Pub/Sub channels are server-wide (not per database), so the same server is enough.
        if isinstance(l2, RedisL2) and l2.endpoint == self.endpoint:
            return self.channel
        return None

    def publish(self, message: bytes) -> None:
        publisher = self._publisher
        try:
            if publisher is None:
                publisher = self._publisher = redis.Redis.from_url(self._where(), **self._options)
            publisher.publish(self.channel, message)
        except (RedisError, OSError) as exc:
            # The master (or node) may have moved: ask again next time. Another thread may be
            # using this client right now: it is dropped, not closed.
            if self._locate is not None and publisher is not None and self._publisher is publisher:
                self._publisher = None
            raise BackendUnavailableError(f"publish on {self.channel!r} failed: {exc}") from exc

    def _where(self) -> str:
        return self.url if self._locate is None else self._locate()

    # -- subscribing --------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop_thread()
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None

    def reset_after_fork(self) -> None:
        self._forget_thread()
        self._conn = None
        self._publisher = None

    def _subscribe_and_listen(self, listener: BackplaneListener) -> None:
        pool = redis.ConnectionPool.from_url(self._where(), **self._options)
        conn: Any = pool.make_connection()  # redis-py's connection API is untyped
        self._conn = conn
        conn.connect()
        link = Link(conn, self.health_check_interval, self.health_check_timeout)
        reply = link.call("SUBSCRIBE", self.channel)
        if not (isinstance(reply, list) and reply and reply[0] == b"subscribe"):
            raise ConnectionError(f"unexpected SUBSCRIBE reply {reply!r}")
        link.listening()
        self.connects += 1
        sock = link.sock
        self.progress.subscribed(sock)
        listener.on_connected()

        next_tick = 0.0
        while not self._stop.is_set():
            for reply in link.replies():
                if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                    self._safe_call(listener.on_message, reply[2])
                else:
                    log.warning("backplane %s: unexpected reply %r", self.channel, reply)
            now = time.monotonic()
            if now >= next_tick:
                self._safe_call(listener.on_tick)
                next_tick = now + TICK_INTERVAL
            wait = link.due(now)
            if not link.reader.partial:  # part of a reply read is not applied: stay busy
                self.progress.idle()
            self._wait_readable(sock, max(0.0, min(wait, next_tick - now)))
            self.progress.busy = True
            link.reader.fill()

    def _wait_readable(self, sock: Any, timeout: float) -> None:
        """Block until ``sock`` has data (or EOF) or ``timeout`` passes. Reads nothing."""
        select.select((sock,), (), (), timeout)

    def _close_conns(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken; nothing more to release
                conn.disconnect()
