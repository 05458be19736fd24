"""A throwaway Redis Cluster for tests: ``masters`` primaries with ``replicas`` replicas each,
every node a private :class:`~support.servers.RedisServer` on a free loopback port, joined with
``redis-cli --cluster create``.

Like :class:`RedisServer`, it only ever signals the processes it started (each node's own
handle): a failover test kills one of *its* masters, never a process looked up by name.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from typing import Any

import redis

from .closing import ClosesOnExit
from .servers import RedisServer, free_port

__all__ = ["LocalCluster", "Resharding", "redis_cli_binary"]


def redis_cli_binary() -> str:
    found = shutil.which("redis-cli")
    if found is None:
        raise RuntimeError("redis-cli is not on PATH (Debian: apt-get install redis-tools)")
    return found


class LocalCluster(ClosesOnExit):
    """A Redis Cluster on loopback, ready (every slot served, every node agrees) on return."""

    def __init__(self, masters: int = 3, replicas: int = 1, *, node_timeout_ms: int = 1000) -> None:
        self.nodes: list[RedisServer] = []
        self.node_timeout_ms = node_timeout_ms
        try:
            for _ in range(masters * (1 + replicas)):
                self.nodes.append(
                    RedisServer(
                        extra_args=(
                            "--cluster-enabled yes",
                            "--cluster-config-file nodes.conf",
                            f"--cluster-node-timeout {node_timeout_ms}",
                            # The bus on a port of its own (port + 10000 may not exist).
                            f"--cluster-port {free_port()}",
                            # A replica may take over even right after the cluster formed.
                            "--cluster-replica-validity-factor 0",
                        )
                    )
                )
            self.cli(
                "--cluster",
                "create",
                *(f"{n.host}:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            )
            self.wait_ok()
        except BaseException:
            self.close()
            raise

    # -- facts ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """A node's URL: what an application is given (the client discovers the others)."""
        return self.nodes[0].url

    def client(self, node: RedisServer) -> redis.Redis:
        return redis.Redis(host=node.host, port=node.port, socket_timeout=2)

    def info(self, node: RedisServer) -> dict[str, str]:
        with self.client(node) as client:
            text = client.execute_command("CLUSTER", "INFO")
        if isinstance(text, bytes):
            text = text.decode()
        return dict(line.split(":", 1) for line in str(text).split() if ":" in line)

    def masters(self) -> list[RedisServer]:
        """The running nodes that are masters now (failovers move the role)."""
        out = []
        for node in self.nodes:
            if not node.running:
                continue
            with self.client(node) as client:
                if client.info("replication").get("role") == "master":
                    out.append(node)
        return out

    def master_of_slot(self, slot: int) -> RedisServer:
        for node in self.masters():
            with self.client(node) as client:
                shards: Any = client.execute_command("CLUSTER", "SLOTS")
            for start, end, primary, *_ in shards:
                if start <= slot <= end and int(primary[1]) == node.port:
                    return node
        raise LookupError(f"no running master serves slot {slot}")

    def node_id(self, node: RedisServer) -> str:
        with self.client(node) as client:
            found: Any = client.execute_command("CLUSTER", "MYID")
        return found.decode() if isinstance(found, bytes) else str(found)

    # -- moving a slot by hand, step by step (what `redis-cli --cluster reshard` does) ----------

    def move_slot_keys(self, slot: int, source: RedisServer, target: RedisServer) -> None:
        """Mark ``slot`` importing on ``target`` and migrating on ``source`` and move its keys,
        as redis-cli does, and stop there: ``source`` still owns the slot (its subscribers stay
        subscribed) and sends whoever asks for a moved key to ``target`` (``ASK``)."""
        source_id, target_id = self.node_id(source), self.node_id(target)
        with self.client(source) as src, self.client(target) as dst:
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while True:
                keys: Any = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
                if not keys:
                    break
                src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)

    def finish_slot_move(self, slot: int, target: RedisServer) -> None:
        """Make ``target`` the owner of ``slot``, then tell every other master (the source then
        unsubscribes the subscribers of the slot's shard channels)."""
        target_id = self.node_id(target)
        for node in sorted(self.masters(), key=lambda n: n is not target):
            with self.client(node) as client:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    # -- lifecycle --------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 60.0) -> str:
        node = self.nodes[0]
        done = subprocess.run(
            [redis_cli_binary(), "-h", node.host, "-p", str(node.port), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every running node says the cluster is ok with every slot assigned."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = [self.info(n) for n in self.nodes if n.running]
                if all(
                    s.get("cluster_state") == "ok" and s.get("cluster_slots_ok") == "16384"
                    for s in states
                ):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() >= deadline:
                raise RuntimeError(f"the cluster is not ok after {timeout}s: {states}")
            time.sleep(0.1)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        self.nodes = []

    def __enter__(self) -> LocalCluster:
        return self


class Resharding:
    """``redis-cli --cluster reshard`` in a thread: ``slots`` slots from one master to the next,
    again and again, until :meth:`stop` (which lets the move under way finish)."""

    def __init__(self, cluster: LocalCluster, *, slots: int) -> None:
        self.cluster = cluster
        self.slots = slots
        self.moves = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resharding", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)
        self.cluster.wait_ok(timeout=60)

    def _run(self) -> None:
        masters = self.cluster.masters()
        ids = [self.cluster.node_id(m) for m in masters]
        turn = 0
        while not self._stop.is_set():
            source, target = ids[turn % len(ids)], ids[(turn + 1) % len(ids)]
            try:
                self.cluster.cli(
                    "--cluster",
                    "reshard",
                    f"{masters[0].host}:{masters[0].port}",
                    "--cluster-from",
                    source,
                    "--cluster-to",
                    target,
                    "--cluster-slots",
                    str(self.slots),
                    "--cluster-yes",
                    timeout=120,
                )
                self.moves += 1
            except Exception as exc:  # reported by the test, never raised in this thread
                self.errors.append(str(exc))
                return
            turn += 1
            self.cluster.wait_ok(timeout=60)
