"""A throwaway Redis Sentinel set for tests: a master, a replica and three sentinels, each a
process of ours on a free loopback port. Failover tests kill the master by its own handle."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from .closing import ClosesOnExit
from .servers import LOOPBACK, RedisServer, free_port, redis_server_binary

__all__ = ["SentinelSet"]

SERVICE = "mymaster"


class _Sentinel:
    def __init__(self, master_port: int, down_after_ms: int) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="hybridinval-sentinel-"))
        conf = self.dir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\n"
            f"bind {LOOPBACK}\n"
            f"dir {self.dir}\n"
            f"sentinel monitor {SERVICE} {LOOPBACK} {master_port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}\n"
            f"sentinel failover-timeout {SERVICE} 5000\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        self.log = open(self.dir / "sentinel.log", "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [redis_server_binary(), str(conf), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelSet(ClosesOnExit):
    """A master, a replica and three sentinels watching them as ``service``."""

    service = SERVICE

    def __init__(self, *, down_after_ms: int = 1000) -> None:
        self.master = RedisServer()
        self.replica: RedisServer | None = None
        self.sentinels: list[_Sentinel] = []
        try:
            self.replica = RedisServer(
                extra_args=(f"--replicaof {self.master.host} {self.master.port}",)
            )
            self.sentinels = [_Sentinel(self.master.port, down_after_ms) for _ in range(3)]
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        """The URL an application is given: ``redis+sentinel://`` the sentinels, the service."""
        hosts = ",".join(f"{LOOPBACK}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def master_port(self) -> int:
        for sentinel in self.sentinels:
            with (
                contextlib.suppress(redis.RedisError),
                redis.Redis(host=LOOPBACK, port=sentinel.port, socket_timeout=1) as client,
            ):
                _, port = client.sentinel_get_master_addr_by_name(self.service)
                return int(port)
        raise LookupError("no sentinel answers")

    def _wait_ready(self, timeout: float = 30.0) -> None:
        """Until the replica is in sync and every sentinel knows the master and both others."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ready = self.replica is not None and (
                    redis.Redis(host=LOOPBACK, port=self.replica.port)
                    .info("replication")
                    .get("master_link_status")
                    == "up"
                )
                for sentinel in self.sentinels:
                    with redis.Redis(host=LOOPBACK, port=sentinel.port, socket_timeout=1) as c:
                        state = c.sentinel_master(self.service)
                        ready = ready and int(state.get("num-other-sentinels", 0)) >= 2
                        ready = ready and int(state.get("num-slaves", 0)) >= 1
                if ready:
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the sentinel set did not come up")

    def fail_over(self, timeout: float = 30.0) -> int:
        """Kill the master (ours) and wait until the sentinels name the replica instead;
        returns the new master's port."""
        old = self.master_port()
        self.master.kill()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(LookupError):
                port = self.master_port()
                if port != old:
                    with redis.Redis(host=LOOPBACK, port=port, socket_timeout=1) as client:
                        if client.info("replication").get("role") == "master":
                            return port
            time.sleep(0.1)
        raise RuntimeError("the sentinels did not fail over")

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.close()
        self.sentinels = []
        for server in (self.replica, self.master):
            if server is not None:
                server.close()
