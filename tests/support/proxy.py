"""A test-controlled TCP proxy for injecting network faults.

Put a :class:`TcpProxy` between a client and Redis to make the network fail
on demand: drop every connection (:meth:`TcpProxy.cut`), silently swallow
traffic like a partition or half-open socket (:meth:`TcpProxy.blackhole`),
or refuse new connections (:meth:`TcpProxy.refuse`). Killing the Redis
process cannot simulate the last two, and those are the faults that hang
clients without socket timeouts and health checks.

Threading model: one accept thread, plus two threads per connection (one
per direction). Two threads, not one, so the proxy never adds a deadlock that
a direct connection would not have (a client writing a large pipeline while
not yet reading replies). All threads are daemons, sockets carry short
timeouts so every thread re-checks its stop flag, and all joins are bounded.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable

from .closing import ClosesOnExit

__all__ = ["TcpProxy"]

LOOPBACK = "127.0.0.1"
_POLL = 0.2  # socket timeout; upper bound on how late a thread notices a stop flag
_ACCEPT_POLL = 0.05  # listener timeout; bounds how long refuse() waits for the acceptor
_BUF = 65536
_JOIN_TIMEOUT = 2.0


def _tune(sock: socket.socket) -> None:
    sock.settimeout(_POLL)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _shutdown(sock: socket.socket | None) -> None:
    """Wake any thread blocked on ``sock`` without closing its fd.

    Closing an fd another thread is blocked on is unsafe (the number can be
    reused), so other threads only ever shut sockets down. The last pump
    thread of a link closes the fds.
    """
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _Link:
    """One accepted client connection and, unless born black-holed, its upstream."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, blackholed: bool, n: int) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.blackholed = blackholed
        self.n = n
        self.closed = threading.Event()  # teardown started: no more forwarding
        self.client_open = True
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._holders = 1  # pump threads still using the sockets

    def start(self) -> None:
        self._spawn(self._run_client_side, "c2u")

    def _spawn(self, target: Callable[[], None], direction: str) -> None:
        thread = threading.Thread(
            target=target,
            name=f"TcpProxy[{self.proxy.port}]-{direction}-{self.n}",
            daemon=True,
        )
        self.threads.append(thread)
        self.proxy._register_thread(thread)
        thread.start()

    def teardown(self) -> None:
        """Close both sides (as seen by the peers). Safe from any thread."""
        self.closed.set()
        self.client_open = False
        with self._lock:
            socks = (self.client, self.upstream)
        for sock in socks:
            _shutdown(sock)

    def _run_client_side(self) -> None:
        try:
            if not self.blackholed:
                try:
                    upstream = socket.create_connection(
                        self.proxy.target, timeout=self.proxy.connect_timeout
                    )
                except OSError:
                    # Upstream down: reset the client, like a dead backend would.
                    with contextlib.suppress(OSError):
                        self.client.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                    self.teardown()
                    return
                _tune(upstream)
                with self._lock:
                    self.upstream = upstream
                    if self.closed.is_set():
                        _shutdown(upstream)  # torn down while we were connecting
                    else:
                        self._holders += 1
                        self._spawn(self._run_upstream_side, "u2c")
            self._pump(self.client, from_client=True)
        finally:
            self._release()

    def _run_upstream_side(self) -> None:
        try:
            assert self.upstream is not None
            self._pump(self.upstream, from_client=False)
        finally:
            self._release()

    def _pump(self, src: socket.socket, *, from_client: bool) -> None:
        while not self.closed.is_set():
            try:
                data = src.recv(_BUF)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                self._on_eof(src, from_client=from_client)
                return
            if self.blackholed:
                continue  # swallowed: nothing crosses a black hole
            dst = self.upstream if from_client else self.client
            if dst is None or not self._send_all(dst, data):
                if self.blackholed:
                    continue
                self.teardown()
                return

    def _send_all(self, dst: socket.socket, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            if self.closed.is_set():
                return False
            try:
                sent = dst.send(view)
            except TimeoutError:
                continue  # nothing was sent; peer is slow, re-check the stop flag
            except OSError:
                return False
            view = view[sent:]
        return True

    def _on_eof(self, src: socket.socket, *, from_client: bool) -> None:
        if not self.blackholed:
            self.teardown()  # normal proxying: a close on one side closes the other
            return
        # Black-holed: the other peer must not learn of this close either, so
        # only this side is shut; the other pump keeps swallowing its bytes.
        if from_client:
            self.client_open = False
        _shutdown(src)

    def _release(self) -> None:
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if not last:
            return
        self.closed.set()
        self.client_open = False
        for sock in (self.client, self.upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self.proxy._forget(self)


class TcpProxy(ClosesOnExit):
    """Threaded TCP proxy on a free loopback port, forwarding to ``(host, port)``.

    Fault controls (all take effect immediately, all are safe to call from
    the test thread):

    * :meth:`cut` closes every current connection, both sides; new
      connections are still accepted and forwarded.
    * :meth:`blackhole` keeps connections open but forwards nothing in either
      direction (bytes are read and dropped), like a network partition or a
      half-open socket. Closes do not cross either: if one peer closes, the
      other is not told. New connections are accepted but black-holed too
      (no upstream connection is even made).
    * :meth:`heal` makes *new* connections forward normally again.
      Connections black-holed earlier stay dead: still open, still swallowing
      bytes, never forwarding, until the client closes them or :meth:`cut` /
      :meth:`close` is called. Clients must detect them (timeouts, health
      checks) and reconnect, as they would after a real partition.
    * :meth:`refuse` closes the listening socket, so connects fail with
      "connection refused"; existing connections are unaffected.
      :meth:`accept_again` re-listens on the same port.

    ``refuse`` and ``blackhole``/``heal`` are independent switches.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = LOOPBACK,
        listen_port: int = 0,
        connect_timeout: float = 2.0,
    ) -> None:
        self.target = (target_host, target_port)
        self.host = listen_host
        self.port = listen_port
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._all_threads: list[threading.Thread] = []
        self._blackhole = False
        self._closed = False
        self._counter = 0
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._accept_stop: threading.Event | None = None
        self._listen()

    # -- info -------------------------------------------------------------

    def url_for(self, db: int = 0) -> str:
        """redis:// URL that reaches the target through this proxy."""
        return f"redis://{self.host}:{self.port}/{db}"

    @property
    def url(self) -> str:
        """Same as ``url_for(0)``."""
        return self.url_for(0)

    @property
    def connection_count(self) -> int:
        """Client connections currently open through the proxy (any mode)."""
        with self._lock:
            return sum(1 for link in self._links if link.client_open)

    @property
    def accepting(self) -> bool:
        """False between :meth:`refuse` and :meth:`accept_again`."""
        return self._listener is not None

    @property
    def blackholed(self) -> bool:
        """True between :meth:`blackhole` and :meth:`heal`."""
        return self._blackhole

    def threads(self) -> list[threading.Thread]:
        """Threads this proxy started that are still alive (for leak checks)."""
        with self._lock:
            return [t for t in self._all_threads if t.is_alive()]

    # -- listening --------------------------------------------------------

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.settimeout(_ACCEPT_POLL)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        stop = threading.Event()
        thread = threading.Thread(
            target=self._accept_loop,
            args=(sock, stop),
            name=f"TcpProxy[{self.port}]-accept",
            daemon=True,
        )
        with self._lock:
            self._listener, self._accept_stop, self._accept_thread = sock, stop, thread
            self._all_threads.append(thread)
        thread.start()

    def _accept_loop(self, listener: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if stop.is_set():
                    return
                time.sleep(0.01)  # e.g. EMFILE; don't spin
                continue
            if stop.is_set():
                client.close()
                return
            _tune(client)
            with self._lock:
                self._counter += 1
                link = _Link(self, client, self._blackhole, self._counter)
                self._links.add(link)
                self._all_threads = [t for t in self._all_threads if t.is_alive()]
            try:
                link.start()
            except RuntimeError:  # could not start a thread
                link.teardown()
                client.close()
                self._forget(link)

    def _register_thread(self, thread: threading.Thread) -> None:
        with self._lock:
            self._all_threads.append(thread)

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    # -- fault controls ---------------------------------------------------

    def cut(self) -> None:
        """Close every current connection (both sides); keep accepting new ones."""
        with self._lock:
            links = list(self._links)
        for link in links:
            link.teardown()
        self._join_links(links)

    def blackhole(self) -> None:
        """Stop forwarding on every current and future connection, silently."""
        with self._lock:
            self._blackhole = True
            links = list(self._links)
        for link in links:
            link.blackholed = True

    def heal(self) -> None:
        """Forward new connections normally again; black-holed ones stay dead."""
        with self._lock:
            self._blackhole = False

    def refuse(self) -> None:
        """Close the listener so new connects are refused; existing ones continue."""
        with self._lock:
            listener, stop, thread = self._listener, self._accept_stop, self._accept_thread
            self._listener = self._accept_stop = self._accept_thread = None
        if stop is not None:
            stop.set()
        if thread is not None:
            thread.join(_JOIN_TIMEOUT)
        if listener is not None:
            listener.close()

    def accept_again(self) -> None:
        """Listen again on the same port after :meth:`refuse`."""
        if self._closed:
            raise RuntimeError("TcpProxy is closed")
        if self._listener is None:
            self._listen()

    def close(self) -> None:
        """Stop accepting, drop all connections, join all threads (bounded)."""
        if self._closed:
            return
        self._closed = True
        self.refuse()
        self.cut()
        deadline = time.monotonic() + _JOIN_TIMEOUT
        for thread in self.threads():
            thread.join(max(0.0, deadline - time.monotonic()))

    def _join_links(self, links: list[_Link]) -> None:
        deadline = time.monotonic() + _JOIN_TIMEOUT
        for link in links:
            for thread in list(link.threads):
                if thread is not threading.current_thread():
                    thread.join(max(0.0, deadline - time.monotonic()))

    def __repr__(self) -> str:
        host, port = self.target
        return f"<TcpProxy {self.host}:{self.port} -> {host}:{port}>"
