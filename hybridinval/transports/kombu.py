"""An AMQP broker (RabbitMQ) as the backplane, through kombu: for teams that already run one.

Layout: a fanout exchange per namespace (the channel name; it goes when its last queue does, and
whoever publishes or subscribes next declares it again) and one queue per cache instance, bound
to it. What RabbitMQ gives that Redis Pub/Sub does not, and how it is used:

* **A queue that outlives a short disconnect.** The queue is not auto-deleted; it expires
  (``x-expires``) ``queue_expires`` seconds after its consumer went away. A reconnect within
  that time finds it with every message published meanwhile, so nothing was missed: the
  listener is told :meth:`~hybridinval.BackplaneListener.on_resumed` (L1 set aside while blind
  comes back as it was, less what the backlog evicts) instead of ``on_connected`` (which
  flushes and restores only what L2 proves unchanged). A queue that expired or was deleted
  (a broker restart deletes it too) is a gap: ``on_connected``.
* **Nothing lost in flight.** Deliveries are acknowledged after the listener applied them, so
  those in the socket of a connection that dies go back to the queue. The consumer is
  exclusive: a reconnect waits (blind) until the broker has dropped the old connection and
  requeued its unacknowledged messages, so they are delivered first.
* **When the backlog is applied.** After a reconnect to a surviving queue, a marker message is
  sent to the queue itself (the default exchange); queues are FIFO, so once the marker comes
  back every message queued before it has been applied, and only then ``on_resumed``.
* **Half-open links.** AMQP heartbeats (``heartbeat`` seconds): no frame from the broker for
  two of them and the connection is dead (blind).
* **Delivery progress** (the L1 lease): as for Redis Pub/Sub, the subscriber marks itself busy
  while frames may be read but not applied, and ``caught_up`` checks it and the socket.
* **Publishing** uses publisher confirms on a connection of its own: a publish returns once the
  broker has routed the message to every queue, else raises ``BackendUnavailableError`` (the
  cache's after-commit retry takes it from there). The broker is not L2's Redis, so the cache
  publishes after the L2 writes (``script_channel`` is None): a process that hears a message
  reads the new state.

Needs ``kombu`` (the ``amqp`` extra); imported only by those who use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
import select
import socket
import threading
import time
from typing import Any

from .._l2 import L2Store
from ..errors import BackendUnavailableError
from ._base import TICK_INTERVAL, BackplaneListener
from ._progress import DeliveryProgress

__all__ = ["KombuTransport"]

log = logging.getLogger("hybridinval.backplane")

_MARKER = b"\x00hybridinval-backlog-applied:"
"""Prefix of the marker a subscriber sends to its own queue after a reconnect."""


def _amqp_errors() -> tuple[type[BaseException], ...]:
    import amqp
    from kombu.exceptions import KombuError

    return (
        OSError,
        amqp.exceptions.AMQPError,
        amqp.exceptions.MessageNacked,  # a broker that refuses a publish (reject-publish)
        KombuError,
        amqp.exceptions.RecoverableConnectionError,
    )


class KombuTransport:
    """The backplane over an AMQP broker. ``url``: kombu's (``amqp://user:pass@host:5672//``);
    ``channel``: the exchange's name (the namespace's, ``Keyspace(namespace).channel``)."""

    tracks_delivery = True

    def __init__(
        self,
        url: str,
        channel: str,
        *,
        queue_expires: float = 60.0,
        heartbeat: float = 2.0,
        connect_timeout: float = 2.0,
        publish_timeout: float = 1.0,
        prefetch: int = 1000,
        reconnect_backoff: tuple[float, float] = (0.05, 2.0),
    ) -> None:
        if queue_expires <= 0 or heartbeat <= 0 or prefetch < 1:
            raise ValueError("queue_expires and heartbeat must be > 0, prefetch >= 1")
        self.url = url
        self.channel = channel
        # Over TLS, decrypted frames can wait in the TLS layer where select() cannot see them:
        # no proof of delivery, so the cache runs without the L1 lease there (and says so).
        self.tracks_delivery = not url.startswith("amqps://")
        self.queue_expires = queue_expires
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.publish_timeout = publish_timeout
        self.prefetch = prefetch
        self._backoff_min, self._backoff_max = reconnect_backoff
        self._publish_lock = threading.Lock()
        self._publisher: Any = None  # (kombu Connection, amqp Channel)
        self._reset_process_state()

    def _reset_process_state(self) -> None:
        self.queue = f"{self.channel}.{os.getpid()}.{secrets.token_hex(6)}"
        self._queue_declared = False  # by this process: a later reconnect may find it again
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._conn: Any = None
        self.progress = DeliveryProgress()
        self.connects = 0

    # -- publishing ---------------------------------------------------------------------------

    def script_channel(self, l2: L2Store) -> str | None:
        return None  # the broker is not L2's Redis: the cache publishes after its writes

    def publish(self, message: bytes) -> None:
        import amqp

        errors = _amqp_errors()
        with self._publish_lock:
            try:
                if self._publisher is None:
                    self._publisher = self._open_publisher()
                _, channel = self._publisher
                channel.basic_publish_confirm(
                    amqp.Message(message, delivery_mode=1),
                    exchange=self.channel,
                    routing_key="",
                    confirm_timeout=self.publish_timeout,
                )
            except errors as exc:
                self._close_publisher()
                raise BackendUnavailableError(
                    f"publish on exchange {self.channel!r} failed: {exc!r}"
                ) from exc

    def _open_publisher(self) -> tuple[Any, Any]:
        # Idle between commits, so no heartbeats: confirms catch a dead link, and every wait
        # on its socket is bounded.
        conn = self._connection(heartbeat=0, confirms=True)
        conn.connect()
        conn.connection.sock.settimeout(self.publish_timeout)
        channel = conn.connection.channel()
        channel.exchange_declare(self.channel, "fanout", durable=False, auto_delete=True)
        return conn, channel

    def _close_publisher(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            _drop(publisher[0])  # no closing handshake: the link may be dead

    def _connection(self, heartbeat: float, confirms: bool = False) -> Any:
        from kombu import connection

        make: Any = connection.Connection  # kombu is untyped
        return make(
            self.url,
            heartbeat=heartbeat,
            connect_timeout=self.connect_timeout,
            transport_options={"confirm_publish": confirms},
        )

    # -- subscribing --------------------------------------------------------------------------

    def start(self, listener: BackplaneListener) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(listener,), name=f"hybridinval-amqp:{self.channel}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0 + self.connect_timeout)
        self._thread = None
        self.progress.unsubscribed()
        with self._publish_lock:
            self._close_publisher()

    def reset_after_fork(self) -> None:
        # The parent's thread does not exist here; its sockets are the parent's (and so is its
        # queue: the child gets one of its own).
        self._publisher = None
        self._publish_lock = threading.Lock()
        self._reset_process_state()

    def caught_up(self, timeout: float) -> float | None:
        return self.progress.caught_up(timeout) if self.tracks_delivery else None

    def _run(self, listener: BackplaneListener) -> None:
        backoff = self._backoff_min
        errors = _amqp_errors()
        while not self._stop.is_set():
            connects_before = self.connects
            try:
                self._consume(listener)
            except errors as exc:
                if self._stop.is_set():
                    break
                if self.connects > connects_before:
                    backoff = self._backoff_min
                    log.warning(
                        "backplane %s: connection lost (%r); reconnecting", self.channel, exc
                    )
                else:
                    log.debug("backplane %s: %r", self.channel, exc)
                self._blind(listener, repr(exc))
                self._stop.wait(random.uniform(0, backoff))
                backoff = min(self._backoff_max, backoff * 2)
            except Exception as exc:  # the loop must survive anything
                log.exception("backplane %s: subscriber failed", self.channel)
                self._blind(listener, repr(exc))
                self._stop.wait(backoff)
        self.progress.unsubscribed()
        self._close_conn(delete_queue=True)

    def _blind(self, listener: BackplaneListener, reason: str) -> None:
        _safe_call(listener.on_blind, reason)
        self.progress.unsubscribed()
        self._close_conn()

    def _consume(self, listener: BackplaneListener) -> None:
        import amqp

        conn = self._conn = self._connection(self.heartbeat)
        conn.connect()
        raw = conn.connection
        # Every setup step (declares, the exclusive consume, the marker) waits at most this
        # long for the broker; the consuming loop below never waits on the socket itself.
        raw.sock.settimeout(max(self.connect_timeout, 2 * self.heartbeat))
        channel = raw.channel()
        channel.exchange_declare(self.channel, "fanout", durable=False, auto_delete=True)
        resumed = False
        if self._queue_declared:
            try:
                channel.queue_declare(self.queue, passive=True)
                resumed = True
            except amqp.exceptions.NotFound:
                # Expired or deleted while we were away (the error closed the channel).
                log.warning(
                    "backplane %s: queue %s was gone: messages missed", self.channel, self.queue
                )
                channel = raw.channel()
        if not resumed:
            channel.queue_declare(
                self.queue,
                durable=False,
                exclusive=False,
                auto_delete=False,
                arguments={"x-expires": max(1, int(self.queue_expires * 1000))},
            )
            channel.queue_bind(self.queue, self.channel, "")
            self._queue_declared = True
        channel.basic_qos(0, self.prefetch, False)
        marker: bytes | None = None
        pending: list[int] = []

        def on_delivery(message: Any) -> None:
            nonlocal marker
            body = bytes(message.body)
            pending.append(message.delivery_tag)
            if marker is not None and body == marker:
                marker = None
                _safe_call(getattr(listener, "on_resumed", listener.on_connected))
            elif not body.startswith(_MARKER):
                _safe_call(listener.on_message, body)

        # Exclusive: while the broker still has the previous connection's consumer (it has not
        # noticed that connection died), this fails and we stay blind; once it has, that
        # consumer's unacknowledged messages are back in the queue, ahead of anything new.
        channel.basic_consume(self.queue, no_ack=False, exclusive=True, callback=on_delivery)
        self.connects += 1
        sock = raw.sock
        self.progress.subscribed(sock)
        if resumed:
            marker = _MARKER + secrets.token_hex(8).encode()
            channel.basic_publish(
                amqp.Message(marker, delivery_mode=1), exchange="", routing_key=self.queue
            )
        else:
            _safe_call(listener.on_connected)
        log.info(
            "backplane %s: consuming from %s (%s)",
            self.channel,
            self.queue,
            "resumed, applying what was queued" if resumed else "new queue",
        )
        next_tick = 0.0
        next_beat = time.monotonic() + self.heartbeat / 2
        while not self._stop.is_set():
            # Apply every frame the socket holds (py-amqp reads no further than a frame). A
            # backlog can take longer than the broker waits for our heartbeat: send it between
            # frames too, or the broker takes a busy subscriber for a dead one.
            while _readable(sock):
                try:
                    raw.drain_events(timeout=0)
                except TimeoutError:
                    break
                if time.monotonic() >= next_beat:
                    conn.heartbeat_check()
                    next_beat = time.monotonic() + self.heartbeat / 2
            if pending:
                channel.basic_ack(pending[-1], multiple=True)
                pending.clear()
            now = time.monotonic()
            if now >= next_tick:
                _safe_call(listener.on_tick)
                next_tick = now + TICK_INTERVAL
            if now >= next_beat:
                conn.heartbeat_check()  # sends ours; raises if the broker went quiet
                next_beat = now + self.heartbeat / 2
            self.progress.idle()
            select.select((sock,), (), (), max(0.0, min(next_tick, next_beat) - now))
            self.progress.busy = True

    def _close_conn(self, delete_queue: bool = False) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        sock = getattr(conn.connection, "sock", None) if conn.connected else None
        if delete_queue and sock is not None and self._queue_declared:
            # A clean stop: nobody will consume this queue again, don't let it fill for
            # queue_expires. Bounded: the link may be dead.
            with contextlib.suppress(Exception):
                sock.settimeout(self.connect_timeout)
                conn.connection.channel().queue_delete(self.queue)
                conn.release()
                return
        _drop(conn)


def _drop(conn: Any) -> None:
    """Let a connection go without a closing handshake (which could wait forever on a dead
    link): shut its socket down, then forget it."""
    raw = getattr(conn, "_connection", None)
    sock = getattr(raw, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        conn.collect()


def _readable(sock: Any) -> bool:
    try:
        return bool(select.select((sock,), (), (), 0)[0])
    except (OSError, ValueError):
        raise OSError("the broker connection's socket is closed") from None


def _safe_call(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("backplane listener %s failed", getattr(fn, "__name__", fn))
