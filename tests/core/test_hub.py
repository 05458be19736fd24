"""The host hub (``hybridinval hub``, ``backplane_hub=``): one Redis subscription per host,
relayed to the local processes, and never a stale read behind it, whatever the hub does: it
loses Redis, dies, hangs, or has a process that stops reading."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from support.inspect import entries
from support.servers import RedisServer
from support.waiting import wait_until

from hybridinval import HybridCache
from hybridinval.hub import Hub
from hybridinval.keyspace import Keyspace
from hybridinval.testing import TransportContract
from hybridinval.transports import RedisPubSubTransport, Transport
from hybridinval.transports.hub import HubTransport

FAST: dict[str, Any] = {"health_check_interval": 0.2, "health_check_timeout": 0.3}


@pytest.fixture
def hub_path(tmp_path: Path) -> str:
    return str(tmp_path / "hub.sock")


@pytest.fixture
def make_cache(
    redis_server: RedisServer, namespace: str, hub_path: str
) -> Iterator[Callable[..., HybridCache]]:
    caches: list[HybridCache] = []

    def make(**options: Any) -> HybridCache:
        cache = HybridCache.from_url(
            redis_server.url, namespace=namespace, backplane_hub=hub_path, **options
        )
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        cache.close()


class HubProcess:
    """``hybridinval hub`` in a process of its own (signalled only through its own handle)."""

    def __init__(self, url: str, namespace: str, path: str) -> None:
        self.args = [
            sys.executable,
            "-m",
            "hybridinval.cli",
            "hub",
            "--redis-url",
            url,
            "--namespace",
            namespace,
            "--socket",
            path,
            "--client-name",
            "test-hub",
        ]
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HubProcess:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, start_new_session=True)
        assert self.proc.stdout is not None
        assert b"stop with Ctrl-C" in self.proc.stdout.readline()
        return self

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def hub_process(redis_server: RedisServer, namespace: str, hub_path: str) -> Iterator[HubProcess]:
    hub = HubProcess(redis_server.url, namespace, hub_path).start()
    yield hub
    hub.close()


def subscribers(url: str, namespace: str) -> int:
    with redis.Redis.from_url(url) as client:
        counts: Any = client.pubsub_numsub(Keyspace(namespace).channel)
    return int(counts[0][1])


# -- the contract ---------------------------------------------------------------------------


class TestHubTransport(TransportContract):
    @pytest.fixture(autouse=True)
    def _hub(self, redis_url: str, tmp_path: Path) -> Iterator[None]:
        self.url = redis_url
        self.namespace = f"hubc-{uuid.uuid4().hex[:8]}"
        self.path = str(tmp_path / "contract.sock")
        with Hub(redis_url, self.path, namespace=self.namespace, **FAST):
            yield

    def make_transports(self, n: int) -> list[Transport]:
        channel = Keyspace(self.namespace).channel
        return [HubTransport(RedisPubSubTransport(self.url, channel), self.path) for _ in range(n)]


# -- across processes ---------------------------------------------------------------------


def test_processes_behind_a_hub_are_one_subscriber_and_hear_everything(
    make_cache: Callable[..., HybridCache], hub_process: HubProcess, redis_server: RedisServer
) -> None:
    reader, other, writer = make_cache(), make_cache(), make_cache()
    for cache in (reader, other, writer):
        assert cache.wait_until_subscribed(10)
    assert subscribers(redis_server.url, reader.namespace) == 1  # the hub, for all three
    for cache in (reader, other):
        cache.get_or_set("k", lambda: "v1")
    writer.invalidate("k")  # published by the L2 script, as without a hub
    wait_until(lambda: "k" not in entries(reader) and "k" not in entries(other), what="evicted")
    assert reader.get_or_set("k", lambda: "v2") == "v2"
    assert reader.stats()["invalidations_received"] == 1


def test_a_hub_that_dies_leaves_its_processes_blind_until_it_is_back(
    make_cache: Callable[..., HybridCache], hub_process: HubProcess, redis_server: RedisServer
) -> None:
    reader, writer = make_cache(), make_cache()
    assert reader.wait_until_subscribed(10) and writer.wait_until_subscribed(10)
    reader.get_or_set("k", lambda: "v1")
    hub_process.signal(signal.SIGKILL)
    wait_until(lambda: not reader.subscribed, what="blind once the hub is gone")
    assert "k" not in entries(reader)
    writer.set("k", "v2")  # nobody behind the hub can hear this: the reader reads L2
    assert reader.get("k") == "v2"
    restarted = HubProcess(redis_server.url, reader.namespace, hub_process.path).start()
    try:
        wait_until(lambda: reader.subscribed and writer.subscribed, timeout=15, what="back")
        reader.get_or_set("k2", lambda: "v1")
        writer.invalidate("k2")
        wait_until(lambda: "k2" not in entries(reader), what="evicted through the new hub")
    finally:
        restarted.close()


def test_a_hub_that_loses_redis_makes_every_process_behind_it_blind(
    make_cache: Callable[..., HybridCache], hub_process: HubProcess, redis_server: RedisServer
) -> None:
    reader = make_cache()
    assert reader.wait_until_subscribed(10)
    reader.get_or_set("k", lambda: "v1")
    with redis.Redis.from_url(redis_server.url) as admin:
        killed = admin.client_kill_filter(_type="pubsub")  # the hub's subscription, ours alone
    assert killed == 1
    wait_until(lambda: reader.stats()["blind_periods"] == 1, what="the hub's blindness relayed")
    wait_until(lambda: reader.subscribed, what="resubscribed behind the hub")
    redis_server.stop()  # and now for longer than a reconnect
    wait_until(lambda: not reader.subscribed, what="blind while the hub cannot subscribe")
    assert "k" not in entries(reader)
    redis_server.start()
    wait_until(lambda: reader.subscribed, timeout=15, what="resubscribed once Redis is back")
    assert reader.stats()["blind_periods"] == 2


def test_a_hung_hub_cannot_vouch_for_l1(
    make_cache: Callable[..., HybridCache], hub_process: HubProcess
) -> None:
    """The hub stopped (SIGSTOP) with an invalidation waiting in its Redis socket: the reader's
    lease sees the hub's socket readable, waits l1_lease_wait, flushes L1 and reads L2, instead
    of serving the old value for as long as the hub stays stopped."""
    reader, writer = make_cache(l1_lease_wait=0.05), make_cache()
    assert reader.wait_until_subscribed(10) and writer.wait_until_subscribed(10)
    assert reader.get_or_set("k", lambda: "v1") == "v1"
    hub_process.signal(signal.SIGSTOP)
    try:
        writer.set("k", "v2")
        time.sleep(0.05)  # the message is in the stopped hub's socket
        assert reader.get("k") == "v2"
        assert reader.stats()["lease_flushes"] >= 1
        assert reader.subscribed  # nothing was missed: a hub that wakes up delivers the backlog
    finally:
        hub_process.signal(signal.SIGCONT)
    wait_until(lambda: reader.stats()["invalidations_received"] == 1, what="the backlog")


def test_a_process_that_stops_reading_is_dropped_not_waited_for(
    redis_url: str, namespace: str, hub_path: str
) -> None:
    with Hub(redis_url, hub_path, namespace=namespace, max_pending=64 * 1024) as hub:
        stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(hub_path)  # and never reads
        cache = HybridCache.from_url(redis_url, namespace=namespace, backplane_hub=hub_path)
        writer = HybridCache.from_url(redis_url, namespace=namespace)
        try:
            assert cache.wait_until_subscribed(10)
            wait_until(lambda: hub.processes == 2, what="both connected")
            keys = [f"key-{i}-" + "x" * 200 for i in range(2000)]
            for key in keys:
                writer.invalidate(key)
            wait_until(lambda: hub.dropped == 1, what="the stuck process dropped")
            wait_until(
                lambda: cache.stats()["invalidations_received"] == len(keys),
                what="the live process heard all",
            )
            assert cache.subscribed and hub.processes == 1
        finally:
            stuck.close()
            cache.close()
            writer.close()


def test_a_forked_child_subscribes_through_the_hub_itself(
    make_cache: Callable[..., HybridCache], hub_process: HubProcess
) -> None:
    parent = make_cache()
    assert parent.wait_until_subscribed(10)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own subscription through the hub, then an eviction
        code = 1
        try:
            os.close(read_fd)
            if parent.wait_until_subscribed(10):
                parent.get_or_set("forked", lambda: "v1")
                os.write(write_fd, b"r")
                deadline = time.monotonic() + 10
                while "forked" in entries(parent) and time.monotonic() < deadline:
                    time.sleep(0.01)
                code = 0 if "forked" not in entries(parent) else 2
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        assert os.read(read_fd, 1) == b"r"
        parent.invalidate("forked")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(read_fd)


def test_bad_hub_settings_are_named() -> None:
    with pytest.raises(ValueError, match="backplane_hub"):
        HybridCache.from_url("redis://127.0.0.1:1/0", backplane_hub="")
    with pytest.raises(ValueError, match="backplane_hub"):
        HybridCache.from_url(
            "redis://127.0.0.1:1/0", backplane_hub="/tmp/x.sock", backplane="amqp://h//"
        )
    with pytest.raises(ValueError, match="backplane"):
        Hub("redis://127.0.0.1:1/0", "/tmp/x.sock", backplane="amqp://h//")
    too_long = "/tmp/" + "d" * 120 + "/hub.sock"
    with pytest.raises(ValueError, match=r"backplane_hub.*bytes"):
        HybridCache.from_url("redis://127.0.0.1:1/0", backplane_hub=too_long)
    with pytest.raises(ValueError, match=r"path.*bytes"):
        Hub("redis://127.0.0.1:1/0", too_long)
    done = subprocess.run(
        [sys.executable, "-m", "hybridinval.cli", "hub", "--namespace", "n", "--socket", "/tmp/s"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "HYBRIDINVAL_REDIS_URL"},
        check=False,
    )
    assert done.returncode == 2 and "--redis-url" in done.stderr


@pytest.mark.parametrize("mode", [0o600, 0o660])
def test_the_socket_is_only_as_open_as_asked(
    redis_url: str, namespace: str, hub_path: str, mode: int
) -> None:
    with Hub(redis_url, hub_path, namespace=namespace, socket_mode=mode):
        assert os.stat(hub_path).st_mode & 0o777 == mode
    assert not os.path.exists(hub_path)  # removed on stop


def test_the_asyncio_cache_behind_a_hub(
    redis_server: RedisServer, hub_process: HubProcess, namespace: str, hub_path: str
) -> None:
    import asyncio

    from hybridinval import AsyncHybridCache

    async def scenario() -> None:
        url = redis_server.url
        async with (
            AsyncHybridCache.from_url(url, namespace=namespace, backplane_hub=hub_path) as reader,
            AsyncHybridCache.from_url(url, namespace=namespace) as writer,
        ):
            assert await reader.wait_until_subscribed(10)
            assert await writer.wait_until_subscribed(10)
            assert await reader.get_or_set("k", lambda: "v1") == "v1"
            assert reader.get_local("k") == "v1"  # served under the hub's lease
            await writer.invalidate("k")
            for _ in range(500):
                if reader.get_local("k") is None:
                    break
                await asyncio.sleep(0.01)
            assert reader.get_local("k") is None
            assert await reader.get_or_set("k", lambda: "v2") == "v2"

    asyncio.run(scenario())
    assert subscribers(redis_server.url, namespace) == 1  # the hub; the writer has closed
