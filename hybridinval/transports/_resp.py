"""Reading a subscribed Redis connection: a minimal RESP2 reader over the raw socket.

A subscriber spends its CPU per message mostly in system calls. redis-py's ``can_read()`` and
``read_response()`` poll the socket, switch its timeout and read, several calls per message; a
subscriber needs one ``select()`` to wait and one ``recv()`` to take everything that arrived,
then parses it from its own buffer. What a subscribed connection receives is small: arrays of
bulk strings (messages, confirmations, pongs), integers, simple strings and errors.

redis-py still opens the connection (TLS, AUTH, SELECT, CLIENT SETNAME) and sends every command;
after the first command of the subscription, this reader alone reads the socket.
"""

from __future__ import annotations

import select
import ssl
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["INCOMPLETE", "Link", "RespError", "RespReader", "subscriber_options"]


class RespError(Exception):
    """An error reply (``-ERR ...``), returned (not raised) by :meth:`RespReader.next`."""


class _Incomplete:
    pass


INCOMPLETE: Any = _Incomplete()
_CHUNK = 1 << 16


class RespReader:
    """Replies parsed from what :meth:`fill` received. Not thread-safe: one reader thread."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._pos = 0
        self._tls = isinstance(sock, ssl.SSLSocket)

    def fill(self) -> bool:
        """One non-blocking ``recv()``: whether anything came. EOF is an error. A TLS socket is
        drained of the records it has already decrypted, which ``select()`` cannot see."""
        try:
            data = self.sock.recv(_CHUNK)
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        if not data:
            raise ConnectionError("Redis closed the connection")
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data
        while self._tls and self.sock.pending():
            self._buf += self.sock.recv(self.sock.pending())
        return True

    def readable(self) -> bool:
        """Whether a :meth:`fill` now would get something (or EOF), without reading."""
        if self._tls and self.sock.pending():
            return True
        return bool(select.select((self.sock,), (), (), 0)[0])

    @property
    def partial(self) -> bool:
        """Whether bytes of a reply not yet whole are buffered (its subscriber is not idle)."""
        return self._pos < len(self._buf)

    def next(self) -> Any:
        """The next whole reply, or :data:`INCOMPLETE`. Bulk strings are ``bytes``."""
        try:
            reply, pos = self._parse(self._pos)
        except IndexError:  # the reply is not all here yet
            return INCOMPLETE
        if reply is INCOMPLETE:
            return INCOMPLETE
        self._pos = pos
        if pos > _CHUNK and pos * 2 > len(self._buf):  # keep the buffer from growing
            del self._buf[:pos]
            self._pos = 0
        return reply

    def _line(self, pos: int) -> tuple[bytes | None, int]:
        end = self._buf.find(b"\r\n", pos)
        if end < 0:
            return None, pos
        return bytes(self._buf[pos:end]), end + 2

    def _parse(self, pos: int) -> tuple[Any, int]:
        if pos >= len(self._buf):
            return INCOMPLETE, pos
        kind = self._buf[pos]
        line, after = self._line(pos + 1)
        if line is None:
            return INCOMPLETE, pos
        if kind == 0x24:  # $ bulk string
            length = int(line)
            if length < 0:
                return None, after
            end = after + length
            if len(self._buf) < end + 2:
                return INCOMPLETE, pos
            return bytes(self._buf[after:end]), end + 2
        if kind == 0x2A:  # * array
            count = int(line)
            if count < 0:
                return None, after
            items = []
            for _ in range(count):
                item, after = self._parse(after)
                if item is INCOMPLETE:
                    return INCOMPLETE, pos
                items.append(item)
            return items, after
        if kind == 0x2B:  # + simple string
            return line, after
        if kind == 0x3A:  # : integer
            return int(line), after
        if kind == 0x2D:  # - error
            return RespError(line.decode(errors="replace")), after
        raise ConnectionError(f"unexpected RESP type byte {chr(kind)!r} from Redis")


def subscriber_options(
    health_check_interval: float, health_check_timeout: float, options: dict[str, Any] | None
) -> dict[str, Any]:
    """redis-py connection options of a subscriber's connections. RESP2 whatever ``options``
    say: :class:`RespReader` parses the classic Pub/Sub shape (redis-py 8 defaults to RESP3
    push frames)."""
    if health_check_interval <= 0 or health_check_timeout <= 0:
        raise ValueError("health_check_interval and health_check_timeout must be > 0")
    return {
        "socket_timeout": health_check_timeout,
        "socket_connect_timeout": 1.0,
        **(options or {}),
        "protocol": 2,
    }


class Link:
    """One connection (a redis-py ``Connection``, connected) read by a subscriber thread: its
    reader and its health check. ``probe`` goes out every ``interval`` after the last answer
    (:meth:`answered`); an answer later than ``timeout`` while the socket has nothing more to
    read means the link is dead (half-open), and :meth:`due` raises. On a subscribed
    connection the probe is a PING, whose PONG :meth:`replies` takes itself."""

    def __init__(
        self, conn: Any, interval: float, timeout: float, probe: tuple[str, ...] = ("PING",)
    ) -> None:
        self.conn = conn
        self.sock = conn._sock
        self.reader = RespReader(self.sock)
        self.interval, self.timeout = interval, timeout
        self.probe = probe
        self.ping_sent_at: float | None = None
        self.next_ping = time.monotonic() + interval

    def call(self, *args: Any) -> Any:
        """Send a command and return its reply (before the subscription's traffic begins)."""
        self.conn.send_command(*args, check_health=False)
        return self.read()

    def read(self) -> Any:
        """The next reply, waiting up to ``timeout`` for it (an error reply is returned)."""
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self.reader.next()
            if reply is not INCOMPLETE:
                return reply
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply within {self.timeout:.3f}s")
            select.select((self.sock,), (), (), left)
            self.reader.fill()

    def listening(self) -> None:
        """Subscribed: from now on every read is one non-blocking ``recv()`` after ``select()``
        (the handshake's commands, a pipeline among them, were written blocking)."""
        self.sock.setblocking(False)

    def replies(self) -> Iterator[Any]:
        """Every whole reply received so far; a PONG is taken here."""
        while True:
            reply = self.reader.next()
            if reply is INCOMPLETE:
                return
            if isinstance(reply, list) and reply and reply[0] == b"pong":
                self.answered()
                continue
            yield reply

    def answered(self) -> None:
        """The probe was answered: the next goes out ``interval`` from now."""
        self.ping_sent_at = None
        self.next_ping = time.monotonic() + self.interval

    @property
    def where(self) -> str:
        return f"{self.conn.host}:{self.conn.port}"

    def due(self, now: float) -> float:
        """Send the probe that is due; raise if its answer is overdue. Returns the seconds
        until this link next needs attention."""
        if self.ping_sent_at is None and now >= self.next_ping:
            self.conn.send_command(*self.probe, check_health=False)
            self.ping_sent_at = now
        if self.ping_sent_at is not None:
            if now - self.ping_sent_at > self.timeout:
                if self.reader.readable():
                    # Behind, not cut off: the answer may wait behind replies not read yet (a
                    # backlog larger than one recv). A half-open socket never turns readable.
                    return 0.0
                raise TimeoutError(
                    f"no answer to {self.probe[0]} from {self.where} within {self.timeout:.3f}s"
                )
            return self.ping_sent_at + self.timeout - now
        return self.next_ping - now
