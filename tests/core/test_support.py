"""Tests of the test infrastructure itself (tests/support).

Fault-injection tests are only as good as the faults they inject: if
``blackhole()`` leaked a close, or ``cut()`` let a pooled reconnect hide,
library tests built on them would pass for the wrong reason.

Clients here use ``single_connection_client=True`` and no retries on
purpose: redis-py (>= 6) retries ConnectionError/TimeoutError 3 times by
default and its pool silently replaces connections that died while idle, so
a default client would mask the very faults these tests check.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from support import RedisServer, TcpProxy, free_port, redis_ping, redis_server_binary

ClientFactory = Callable[..., redis.Redis]


@pytest.fixture
def make_client() -> Iterator[ClientFactory]:
    """Strict clients (one connection, no retries), closed at teardown."""
    clients: list[redis.Redis] = []

    def make(url: str, timeout: float = 1.0) -> redis.Redis:
        client: redis.Redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            single_connection_client=True,
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        with contextlib.suppress(Exception):  # best effort: it may be broken on purpose
            client.close()


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists"; RedisServer reaps, so treat zombies as gone.
    try:
        status = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return True
    return status != "Z"


def _wait_until(predicate: Callable[[], bool], timeout: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# -- servers ---------------------------------------------------------------


def test_redis_server_binary_is_executable() -> None:
    binary = redis_server_binary()
    assert os.path.isfile(binary)
    assert os.access(binary, os.X_OK)


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_redis_ping_false_for_closed_port() -> None:
    started = time.monotonic()
    assert redis_ping(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5) is False
    assert time.monotonic() - started < 1.5


def test_redis_server_start_kill_restart_same_port(
    redis_server: RedisServer, make_client: ClientFactory
) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_ping(redis_server.url)
    first_pid = redis_server.pid
    assert first_pid is not None
    client = make_client(redis_server.url)
    client.set("k", "v")

    redis_server.kill()
    assert redis_server.pid is None
    assert not redis_server.running
    assert not _process_exists(first_pid)
    assert not redis_ping(redis_server.url, timeout=0.3)
    with pytest.raises(redis.ConnectionError):
        client.get("k")

    port = redis_server.port
    redis_server.start()
    assert redis_server.port == port
    assert redis_server.pid not in (None, first_pid)
    assert redis_ping(redis_server.url)
    # No persistence: a restarted server is empty.
    assert make_client(redis_server.url).get("k") is None


def test_redis_server_stop_then_start_and_context_manager() -> None:
    with RedisServer(autostart=False) as server:
        assert server.running
        pid = server.pid
        assert pid is not None
        server.stop()
        assert not server.running
        assert not _process_exists(pid)
        server.start()
        assert redis_ping(server.url)
        data_dir = server.dir
    assert not server.running
    assert not data_dir.exists()
    assert not redis_ping(server.url, timeout=0.3)


def test_redis_server_extra_args(
    redis_server_factory: Callable[..., RedisServer], make_client: ClientFactory
) -> None:
    server = redis_server_factory("--client-output-buffer-limit", "pubsub 1mb 0 0")
    client = make_client(server.url)
    limits = client.config_get("client-output-buffer-limit")["client-output-buffer-limit"]
    assert "pubsub 1048576 0 0" in str(limits)
    assert client.config_get("save")["save"] in ("", b"")
    assert client.config_get("appendonly")["appendonly"] in ("no", b"no")


def test_redis_server_startup_failure_shows_log() -> None:
    with pytest.raises(RuntimeError, match=r"exited during startup(.|\n)*no-such-directive"):
        RedisServer(extra_args=["--no-such-directive", "1"])


def test_redis_server_pinned_port_in_use_fails_clearly() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        with pytest.raises(RuntimeError, match="address in use"):
            RedisServer(port=port, startup_timeout=5.0)


# -- proxy -----------------------------------------------------------------


def test_proxy_forwards_ping(tcp_proxy: TcpProxy, make_client: ClientFactory) -> None:
    assert tcp_proxy.url_for(3) == f"redis://127.0.0.1:{tcp_proxy.port}/3"
    client = make_client(tcp_proxy.url_for(0))
    assert client.ping() is True
    client.set("through", "proxy")
    assert client.get("through") == b"proxy"
    assert tcp_proxy.connection_count == 1
    client.close()
    assert _wait_until(lambda: tcp_proxy.connection_count == 0)


def test_proxy_does_not_deadlock_on_large_pipelines(
    tcp_proxy: TcpProxy, make_client: ClientFactory
) -> None:
    client = make_client(tcp_proxy.url, timeout=5.0)
    value = b"x" * 4096
    pipe = client.pipeline(transaction=False)
    for i in range(2000):
        pipe.set(f"k{i}", value)
        pipe.get(f"k{i}")
    results = pipe.execute()
    assert results[-1] == value
    assert len(results) == 4000


def test_cut_closes_current_connections_and_keeps_accepting(
    tcp_proxy: TcpProxy, make_client: ClientFactory
) -> None:
    client = make_client(tcp_proxy.url)
    assert client.ping()
    tcp_proxy.cut()
    assert tcp_proxy.connection_count == 0
    with pytest.raises(redis.ConnectionError):
        client.ping()
    assert make_client(tcp_proxy.url).ping()


def test_blackhole_times_out_then_heal_serves_new_connections(
    tcp_proxy: TcpProxy, make_client: ClientFactory
) -> None:
    old = make_client(tcp_proxy.url, timeout=0.3)
    assert old.ping()
    tcp_proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        old.ping()
    assert time.monotonic() - started < 1.0
    # New connections are accepted but black-holed as well.
    with pytest.raises(redis.TimeoutError):
        make_client(tcp_proxy.url, timeout=0.3).ping()

    tcp_proxy.heal()
    assert make_client(tcp_proxy.url, timeout=0.3).ping()
    # redis-py dropped the timed-out connection, so the old client reconnects.
    assert old.ping()


def test_blackhole_hides_server_death_from_client(
    redis_server: RedisServer, tcp_proxy: TcpProxy, make_client: ClientFactory
) -> None:
    client = make_client(tcp_proxy.url, timeout=0.3)
    assert client.ping()
    tcp_proxy.blackhole()
    redis_server.kill()
    # The proxy has seen the server's close (its upstream pump ended) and kept the client's
    # side open. Checked before the ping: redis-py closes its socket after a timeout.
    assert _wait_until(
        lambda: not any("-u2c-" in t.name for t in tcp_proxy.threads()), timeout=5.0
    ), "the proxy never saw the server's close"
    assert tcp_proxy.connection_count == 1
    # A partitioned client cannot see the crash: it times out, no ConnectionError.
    with pytest.raises(redis.TimeoutError):
        client.ping()


def test_blackholed_connections_stay_dead_after_heal(tcp_proxy: TcpProxy) -> None:
    sock = socket.create_connection(("127.0.0.1", tcp_proxy.port), timeout=1.0)
    try:
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert sock.recv(64) == b"+PONG\r\n"
        tcp_proxy.blackhole()
        tcp_proxy.heal()
        sock.settimeout(0.3)
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        with pytest.raises(TimeoutError):
            sock.recv(64)
        tcp_proxy.cut()
        sock.settimeout(1.0)
        assert sock.recv(64) == b""
    finally:
        sock.close()


def test_refuse_and_accept_again(tcp_proxy: TcpProxy, make_client: ClientFactory) -> None:
    existing = make_client(tcp_proxy.url)
    assert existing.ping()
    port = tcp_proxy.port

    tcp_proxy.refuse()
    assert not tcp_proxy.accepting
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    with pytest.raises(redis.ConnectionError):
        make_client(tcp_proxy.url, timeout=0.5).ping()
    assert existing.ping(), "refuse() must not touch established connections"

    tcp_proxy.accept_again()
    assert tcp_proxy.port == port
    assert make_client(tcp_proxy.url).ping()


def test_proxy_resets_client_when_upstream_is_down(
    redis_server: RedisServer, tcp_proxy: TcpProxy, make_client: ClientFactory
) -> None:
    redis_server.stop()
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        make_client(tcp_proxy.url, timeout=1.0).ping()
    assert time.monotonic() - started < 1.0


def test_proxy_close_leaks_no_threads(
    redis_server: RedisServer, make_client: ClientFactory
) -> None:
    with TcpProxy(redis_server.host, redis_server.port) as proxy:
        port = proxy.port
        live = make_client(proxy.url)
        assert live.ping()
        hole = make_client(proxy.url, timeout=0.2)
        assert hole.ping()
        proxy.blackhole()
        with pytest.raises(redis.TimeoutError):
            hole.ping()
        assert proxy.threads()
    assert proxy.threads() == []
    assert not [t for t in threading.enumerate() if t.name.startswith(f"TcpProxy[{port}]")]
    assert proxy.connection_count == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()


def test_namespace_is_unique_per_test(namespace: str, redis_url: str) -> None:
    assert namespace.startswith("t-")
    assert len(namespace) == 14
    assert redis_ping(redis_url)


@pytest.mark.slow
def test_local_cluster_serves_every_slot_and_fails_over(redis_cli: str) -> None:
    """The cluster the scale-out tests stand on: 3 masters with a replica each, every slot
    served; killing a master (its own process) promotes its replica."""
    import redis.cluster
    from support.cluster import LocalCluster

    with LocalCluster(masters=3, replicas=1) as cluster:
        assert len(cluster.masters()) == 3
        client = redis.cluster.RedisCluster.from_url(cluster.url, socket_timeout=2)
        try:
            client.set("probe", "1")
            slot = client.keyslot("probe")
            master = cluster.master_of_slot(slot)
            master.kill()
            deadline = time.monotonic() + 30
            while True:
                try:
                    promoted = cluster.master_of_slot(slot)
                    break
                except (LookupError, redis.RedisError):
                    assert time.monotonic() < deadline, "no replica took over"
                    time.sleep(0.1)
            assert promoted is not master
            cluster.wait_ok()
        finally:
            client.close()
