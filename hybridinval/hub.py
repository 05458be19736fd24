"""The host hub: one Redis subscription per host, handed to every local process.

``hybridinval hub --redis-url URL --namespace NS --socket PATH`` (or :class:`Hub` in a process of
your own) subscribes to the namespace's backplane on Redis, exactly as a cache would (Pub/Sub on
one server or a Sentinel master, sharded Pub/Sub on a cluster), and writes every message to
each process connected to its Unix socket; the processes use ``CacheConfig.backplane_hub=PATH``
(:class:`~hybridinval.transports.hub.HubTransport`). Redis then serves one subscriber per host.

The hub never decides anything: it forwards its subscriber's events (a message, blind,
subscribed), in order, to every process, and shares its delivery progress with them so that
their L1 lease holds without a round trip (see :mod:`hybridinval.transports._hubwire`).

A process whose socket does not take what the hub writes is not waited for: the hub keeps up to
``max_pending`` bytes for it (its byte in the progress page says so, which keeps that process's
lease from proving anything meanwhile), and beyond that drops the connection, which makes the
process blind until it reconnects. One slow process never delays the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
from collections import deque
from typing import Any

from ._config import CacheConfig, build_redis_seams, check_socket_path
from .transports._hubwire import (
    BLIND,
    CONNECTED,
    CONNECTED_INFO,
    MESSAGE,
    SharedProgress,
    frame,
)

__all__ = ["Hub"]

log = logging.getLogger("hybridinval.hub")


def _send_some(sock: socket.socket, data: Any, fds: list[int] | None) -> int:
    """Non-blocking: what ``sock`` took of ``data`` (``fds`` ride its first byte)."""
    return socket.send_fds(sock, [data], fds) if fds else sock.send(data)


class _Process:
    __slots__ = ("pending", "pending_bytes", "slot", "sock")

    def __init__(self, sock: socket.socket, slot: int) -> None:
        self.sock = sock
        self.slot = slot
        self.pending: deque[memoryview] = deque()
        self.pending_bytes = 0


class Hub:
    """Relays the backplane of ``url``'s namespace to the processes of this host.

    ``url`` and the options are those of :meth:`HybridCache.from_url` (``namespace`` above
    all; ``None``: the embedded Redis, for development); ``path`` is the Unix socket to listen
    on (replaced if it exists), with permissions ``socket_mode``: whoever may connect gets the
    namespace's invalidations and the hub's Redis sockets, so by default only its own user.
    """

    def __init__(
        self,
        url: str | None,
        path: str,
        *,
        config: CacheConfig | None = None,
        max_pending: int = 8 * 1024 * 1024,
        socket_mode: int = 0o600,
        **options: Any,
    ) -> None:
        config = CacheConfig.of(config, options)
        check_socket_path("path", path)
        if config.backplane is not None or config.backplane_hub is not None:
            raise ValueError("a hub relays Redis Pub/Sub: backplane and backplane_hub must be None")
        self.config = config
        self.path = path
        self.max_pending = max_pending
        self.socket_mode = socket_mode
        self._detach: Any = None
        if url is None:
            from ._embedded import SharedEmbeddedRedis

            server = SharedEmbeddedRedis.attach()
            url, self._detach = server.url, server.detach
        self._l2, self.upstream = build_redis_seams(url, config)
        self.progress = SharedProgress()
        self.upstream.progress = self.progress  # type: ignore[attr-defined]
        self._lock = threading.Lock()  # orders every frame to every process
        self._processes: dict[int, _Process] = {}
        self._connected = False
        self._blind_reason = "not subscribed yet"
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.messages = 0
        self.dropped = 0

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Hub:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous = os.umask(0o777 & ~self.socket_mode)  # never, even briefly, wider than asked
        try:
            listener.bind(self.path)
        finally:
            os.umask(previous)
        os.chmod(self.path, self.socket_mode)
        listener.listen(128)
        listener.setblocking(False)
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ, "accept")
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._loop, name="hybridinval-hub", daemon=True)
        self._thread.start()
        self.upstream.start(self)
        log.info("hub on %s for %s", self.path, self.upstream.channel)
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:  # no process accepted from now on is told the hub is subscribed
            self._connected = False
            self._blind_reason = "the hub is stopping"
        self.upstream.stop()
        self._wake()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            for process in list(self._processes.values()):
                self._drop_locked(process, "the hub stopped")
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._l2.close()
        self.progress.close()
        if self._detach is not None:
            self._detach()
        self._wake_r.close()
        self._wake_w.close()
        self._selector.close()

    def __enter__(self) -> Hub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def processes(self) -> int:
        return len(self._processes)

    # -- the upstream subscriber's events (its thread) -----------------------------------------

    def on_message(self, payload: bytes) -> None:
        data = frame(MESSAGE, payload)
        with self._lock:
            self.messages += 1
            for process in list(self._processes.values()):
                self._send_locked(process, data)

    def on_connected(self) -> None:
        with self._lock:
            self._connected = True
            for process in list(self._processes.values()):
                self._send_connected_locked(process)
        log.info("hub %s: subscribed", self.path)

    def on_resumed(self) -> None:  # Redis transports never resume; a broker's would
        self.on_connected()

    def on_blind(self, reason: str) -> None:
        data = frame(BLIND, reason.encode())
        with self._lock:
            self._connected = False
            self._blind_reason = reason
            for process in list(self._processes.values()):
                self._send_locked(process, data)
        log.warning("hub %s: blind (%s); so is every process behind it", self.path, reason)

    def on_tick(self) -> None:
        pass  # the processes tick on their own

    # -- sending (under the lock) --------------------------------------------------------------

    def _send_connected_locked(self, process: _Process) -> None:
        socks = self.progress.socks
        if not self._connected or not socks:
            self._send_locked(process, frame(BLIND, self._blind_reason.encode()))
            return
        fds = [s if isinstance(s, int) else s.fileno() for s in socks] + [self.progress.fd]
        self._send_locked(
            process, frame(CONNECTED, CONNECTED_INFO.pack(len(socks), process.slot)), fds
        )

    def _send_locked(self, process: _Process, data: bytes, fds: list[int] | None = None) -> None:
        """Write ``data`` (and ``fds``, with its first byte) to ``process`` without blocking;
        what its socket does not take waits in the hub. Descriptors never wait: they name this
        moment's sockets, so a subscription that cannot go out at once drops the process (it
        reconnects). Any failure drops that process only."""
        try:
            if process.pending:
                if fds:
                    self._drop_locked(process, "too far behind to take a new subscription")
                    return
                self._queue_locked(process, memoryview(data))
                return
            try:
                sent = _send_some(process.sock, data, fds)
            except BlockingIOError:
                sent = 0
            if sent == 0 and fds:
                self._drop_locked(process, "too far behind to take a new subscription")
            elif sent < len(data):  # the descriptors went with the first byte
                self._queue_locked(process, memoryview(data)[sent:])
        except (BrokenPipeError, ConnectionResetError):  # it went away before we saw it go
            self._drop_locked(process, "hung up")
        except Exception as exc:  # never the others' messages for one process's failure
            self._drop_locked(process, f"{type(exc).__name__}: {exc}")

    def _queue_locked(self, process: _Process, rest: memoryview) -> None:
        if process.pending_bytes + len(rest) > self.max_pending:
            self._drop_locked(process, f"more than {self.max_pending} bytes behind")
            return
        if not process.pending:
            self.progress.pending(process.slot, True)  # before the upstream goes idle
            self._selector.modify(
                process.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, process
            )
            self._wake()
        process.pending.append(rest)
        process.pending_bytes += len(rest)

    def _flush_locked(self, process: _Process) -> None:
        while process.pending:
            data = process.pending[0]
            try:
                sent = process.sock.send(data)
            except BlockingIOError:
                return
            except (BrokenPipeError, ConnectionResetError):
                self._drop_locked(process, "hung up")
                return
            except OSError as exc:
                self._drop_locked(process, str(exc))
                return
            process.pending_bytes -= sent
            if sent < len(data):
                process.pending[0] = data[sent:]
                return
            process.pending.popleft()
        self.progress.pending(process.slot, False)
        self._selector.modify(process.sock, selectors.EVENT_READ, process)

    def _drop_locked(self, process: _Process, reason: str) -> None:
        if self._processes.pop(process.slot, None) is None:
            return
        if reason in ("hung up", "the hub stopped"):
            log.info("hub %s: process %d: %s", self.path, process.slot, reason)
        else:
            self.dropped += 1
            log.warning("hub %s: dropping process %d (%s)", self.path, process.slot, reason)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(process.sock)
        with contextlib.suppress(OSError):
            process.sock.shutdown(socket.SHUT_RDWR)
        process.sock.close()
        self.progress.pending(process.slot, False)

    # -- the hub's own thread: accepts, writes what sockets did not take, notices hang-ups ------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _loop(self) -> None:
        while not self._stopping.is_set():
            for key, events in self._selector.select(timeout=1.0):
                what = key.data
                if what == "wake":
                    with contextlib.suppress(OSError):
                        while self._wake_r.recv(4096):
                            pass
                elif what == "accept":
                    self._accept()
                else:
                    with self._lock:
                        if events & selectors.EVENT_READ:
                            # A process never writes: readable means it hung up.
                            try:
                                gone = not what.sock.recv(1)
                            except BlockingIOError:
                                gone = False
                            except OSError:
                                gone = True
                            if gone:
                                self._drop_locked(what, "hung up")
                                continue
                        if events & selectors.EVENT_WRITE:
                            self._flush_locked(what)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            with self._lock:
                slot = next(
                    (s for s in range(1, SharedProgress.SLOTS + 1) if s not in self._processes),
                    None,
                )
                if slot is None:
                    log.error(
                        "hub %s: %d processes already; refusing one",
                        self.path,
                        len(self._processes),
                    )
                    sock.close()
                    continue
                process = _Process(sock, slot)
                self._processes[slot] = process
                self._selector.register(sock, selectors.EVENT_READ, process)
                if self._connected:
                    self._send_connected_locked(process)
                else:
                    self._send_locked(process, frame(BLIND, self._blind_reason.encode()))
