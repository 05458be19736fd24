"""Subscribing through this host's hub (:mod:`hybridinval.hub`) instead of to Redis.

Pub/Sub fan-out costs Redis CPU per subscriber per message, and every process of every host is a
subscriber. A hub holds the one subscription of its host and hands each message to the local
processes over a Unix socket: Redis serves one subscriber per host, whatever the number of
processes on it. Publishing does not change (the L2 scripts publish, or the direct transport
does), so ``script_channel`` and ``publish`` are those of the transport it stands in for.

**Never stale behind a hub.** The hub forwards its own blindness (``B``): a hub that lost Redis
makes every process behind it blind. A hub that stops or dies closes the Unix socket: blind. A
hub that hangs (stopped, starved) cannot prove progress: the L1 lease asks, without a round
trip and upstream first, whether the hub's own Redis sockets (passed to this process at
subscription) hold nothing unread, whether the hub is idle and holds nothing for this process,
and whether this process has applied everything in its own socket (see
:mod:`hybridinval.transports._hubwire`); if not, readers wait ``l1_lease_wait`` and flush L1.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import select
import socket
import time
from typing import TYPE_CHECKING

from ._base import TICK_INTERVAL, BackplaneListener, Transport
from ._hubwire import BLIND, CONNECTED, CONNECTED_INFO, HEADER, MAX_FRAME, MESSAGE, HubProgress
from ._subscriber import SubscriberThread

if TYPE_CHECKING:
    from .._l2 import L2Store

__all__ = ["HubTransport"]

log = logging.getLogger("hybridinval.backplane")

_MAX_FDS = 253  # SCM_MAX_FD: a hub's Redis sockets (one per cluster master) and its page
_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)  # a spawned program inherits none of them


class HubTransport(SubscriberThread):
    """Receives through the hub listening on ``path``; publishes through ``direct``."""

    tracks_delivery = True

    def __init__(
        self,
        direct: Transport,
        path: str,
        *,
        reconnect_backoff: tuple[float, float] = (0.05, 2.0),
    ) -> None:
        self.direct = direct
        self.path = path
        self.channel = f"{direct.channel} via {path}"
        self._backoff_min, self._backoff_max = reconnect_backoff
        self._sock: socket.socket | None = None
        self._hub_fds: list[int] = []
        self.progress: HubProgress
        self._init_thread()

    def _new_progress(self) -> HubProgress:
        return HubProgress()

    # -- publishing: the direct transport's ---------------------------------------------------

    def script_channel(self, l2: L2Store) -> str | None:
        return self.direct.script_channel(l2)

    def publish(self, message: bytes) -> None:
        self.direct.publish(message)

    # -- subscribing --------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop_thread()
        self.direct.stop()  # its publisher, if any (its subscriber never ran)

    def reset_after_fork(self) -> None:
        # Inherited copies of the parent's descriptors: closed here (never shut down, which
        # would cut the parent's), so that the child holds no hub connection open after the
        # parent's goes.
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        self._close_hub_fds()
        self._forget_thread()
        self.direct.reset_after_fork()

    def _subscribe_and_listen(self, listener: BackplaneListener) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock = sock
        sock.connect(self.path)
        sock.setblocking(False)  # each wake-up: one select(), one recv (what came, all of it)
        fds: list[int] = []
        try:
            self._listen(sock, fds, listener)
        finally:
            for fd in fds:  # received but never claimed by a frame
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _listen(self, sock: socket.socket, fds: list[int], listener: BackplaneListener) -> None:
        buffer = bytearray()
        next_tick = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_tick:
                self._safe_call(listener.on_tick)
                next_tick = now + TICK_INTERVAL
            if not buffer:  # part of a frame read is not applied: stay busy
                self.progress.idle()
            select.select((sock,), (), (), max(0.0, next_tick - now))
            self.progress.busy = True
            try:
                data, received, _flags, _addr = socket.recv_fds(sock, 1 << 16, _MAX_FDS, _CLOEXEC)
            except BlockingIOError:
                continue
            fds.extend(received)
            if not data:
                raise ConnectionError(f"the hub at {self.path} closed the connection")
            buffer += data
            self._apply(buffer, fds, listener)

    def _apply(self, buffer: bytearray, fds: list[int], listener: BackplaneListener) -> None:
        """Apply every whole frame at the head of ``buffer`` (and remove it)."""
        offset = 0
        while len(buffer) - offset >= HEADER.size:
            kind, length = HEADER.unpack_from(buffer, offset)
            if length > MAX_FRAME:
                raise ConnectionError(f"the hub sent a {length}-byte frame")
            end = offset + HEADER.size + length
            if len(buffer) < end:
                break
            payload = bytes(buffer[offset + HEADER.size : end])
            offset = end
            if kind == MESSAGE:
                self._safe_call(listener.on_message, payload)
            elif kind == CONNECTED:
                count, slot = CONNECTED_INFO.unpack(payload)
                if len(fds) < count + 1:
                    raise ConnectionError("the hub's subscription came without its sockets")
                taken, fds[:] = fds[: count + 1], fds[count + 1 :]
                self._subscribed(taken, slot, listener)
            elif kind == BLIND:
                self._blind(payload.decode(errors="replace"), listener)
            else:
                raise ConnectionError(f"unknown frame {kind!r} from the hub")
        del buffer[:offset]

    def _subscribed(self, taken: list[int], slot: int, listener: BackplaneListener) -> None:
        if self.progress.socks is not None:  # no blind period reported in between: assume one
            self._blind("the hub resubscribed", listener)
        *hub_socks, page_fd = taken
        try:
            page = mmap.mmap(page_fd, mmap.PAGESIZE, access=mmap.ACCESS_READ)
        except BaseException:
            for fd in hub_socks:
                os.close(fd)
            raise
        finally:
            os.close(page_fd)
        self._hub_fds = hub_socks
        self.progress.follow(tuple(hub_socks), page, slot)
        self.connects += 1
        assert self._sock is not None
        self.progress.subscribed(self._sock)
        listener.on_connected()

    def _blind(self, reason: str, listener: BackplaneListener) -> None:
        # Blind first: a reader that finds us unsubscribed must find L1 already set aside.
        self._safe_call(listener.on_blind, f"the hub is blind: {reason}")
        self.progress.unsubscribed()
        self._close_hub_fds()

    def _close_hub_fds(self) -> None:
        fds, self._hub_fds = self._hub_fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _close_conns(self) -> None:
        self._close_hub_fds()
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
