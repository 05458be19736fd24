"""Shared fixtures: where Redis/PostgreSQL live, plus private servers and proxies.

Service policy: use what is configured or already running; otherwise start an
embedded Redis (tests must pass on a laptop with no services) or skip the
PostgreSQL tests. With ``HYBRIDINVAL_REQUIRE_SERVICES=1`` (CI) a missing
service is a test failure, never a skip, so CI cannot go green by skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import RedisServer, TcpProxy, redis_ping, redis_server_binary
from support.async_view import view_of

from hybridinval import HybridCache

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def _require_services() -> bool:
    return os.environ.get("HYBRIDINVAL_REQUIRE_SERVICES") == "1"


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say which services policy is active, so CI logs explain skips/failures."""
    try:
        binary = redis_server_binary()
    except RuntimeError:
        binary = "<none>"
    return [
        f"hybridinval: HYBRIDINVAL_REQUIRE_SERVICES={int(_require_services())}, "
        f"redis-server for private servers: {binary}"
    ]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a shared Redis for the whole session.

    Order: $HYBRIDINVAL_REDIS_URL, then a Redis already on 127.0.0.1:6379,
    then (unless services are required) a session-private embedded server.
    Tests share it, so they must scope keys/channels with ``namespace``
    and must never FLUSHALL.
    """
    env_url = os.environ.get("HYBRIDINVAL_REDIS_URL")
    if env_url:
        if not redis_ping(env_url, timeout=2.0):
            pytest.fail(f"HYBRIDINVAL_REDIS_URL={env_url} does not answer PING", pytrace=False)
        yield env_url
        return
    if redis_ping(DEFAULT_REDIS_URL, timeout=1.0):
        yield DEFAULT_REDIS_URL
        return
    if _require_services():
        pytest.fail(
            f"HYBRIDINVAL_REQUIRE_SERVICES=1 but no Redis answers at {DEFAULT_REDIS_URL} "
            "and HYBRIDINVAL_REDIS_URL is not set",
            pytrace=False,
        )
    server = RedisServer()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_cli() -> str:
    """``redis-cli``, with a ``redis-server`` of 7.0 or newer (the Redis Cluster tests give
    each node its bus port, and join the nodes with redis-cli), or skip (fail in CI). The
    embedded Redis bundled for machines without one (6.2) cannot."""
    import re
    import shutil
    import subprocess

    found = shutil.which("redis-cli")
    version = subprocess.run(
        [redis_server_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout
    match = re.search(r"v=(\d+)\.", version)
    reason = None
    if found is None:
        reason = "redis-cli is not on PATH (Debian: apt-get install redis-tools)"
    elif match is None or int(match.group(1)) < 7:
        reason = f"the Redis Cluster tests need redis-server 7.0 or newer, found: {version!r}"
    if reason is not None:
        if _require_services():
            pytest.fail(f"HYBRIDINVAL_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    assert found is not None
    return found


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """An AMQP broker (RabbitMQ) for the kombu backplane, or skip (fail in CI) if none.

    Order: $HYBRIDINVAL_AMQP_URL, then the local RabbitMQ (guest/guest on 127.0.0.1:5672)."""
    url = os.environ.get("HYBRIDINVAL_AMQP_URL") or DEFAULT_AMQP_URL
    try:
        from kombu.connection import Connection

        with Connection(url, connect_timeout=2) as conn:
            conn.connect()
    except Exception as exc:
        reason = f"no AMQP broker at {url}: {exc!r}"
        if _require_services():
            pytest.fail(f"HYBRIDINVAL_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return url


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """SQLAlchemy URL of a PostgreSQL database, or skip (fail in CI) if none.

    Order: $HYBRIDINVAL_DATABASE_URL (the name the example deployment and the demo read too;
    here it must be a PostgreSQL URL), then the local test database."""
    env_url = os.environ.get("HYBRIDINVAL_DATABASE_URL")
    if env_url:
        if not env_url.startswith("postgresql"):
            pytest.fail(
                f"HYBRIDINVAL_DATABASE_URL={env_url!r}: the tests that use it need PostgreSQL",
                pytrace=False,
            )
        return env_url
    reason: str
    try:
        import psycopg
    except ImportError:
        reason = "psycopg is not installed (pip install 'hybridinval[postgres]')"
    else:
        conninfo = DEFAULT_POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://", 1)
        try:
            psycopg.connect(conninfo, connect_timeout=2).close()
        except psycopg.Error as exc:
            reason = f"PostgreSQL unreachable at {conninfo}: {exc}".strip()
        else:
            return DEFAULT_POSTGRES_URL
    if _require_services():
        pytest.fail(f"HYBRIDINVAL_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def namespace() -> str:
    """Unique per-test prefix for keys and channels on the shared Redis."""
    return f"t-{uuid.uuid4().hex[:12]}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A test marked both_apis runs against the blocking cache and against the asyncio one
    # (support.async_view): the guarantees of the one are the other's.
    if "api" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_apis"):
        metafunc.parametrize("api", ["sync", "async"])


@pytest.fixture
def api() -> str:
    """Which API the caches of ``make_cache`` present: "sync" unless the test is marked
    ``both_apis`` (then it runs with each)."""
    return "sync"


@pytest.fixture
def make_cache(redis_url: str, namespace: str, api: str) -> Iterator[Callable[..., HybridCache]]:
    """Subscribed caches on the shared Redis in this test's namespace (``url=`` and any
    ``from_url`` option override); all closed at the end of the test."""
    caches: list[HybridCache] = []

    def make(**options: Any) -> HybridCache:
        options.setdefault("namespace", namespace)
        cache = view_of(HybridCache.from_url(options.pop("url", redis_url), **options), api)
        caches.append(cache)
        assert cache.wait_until_subscribed(10), "subscriber did not connect"
        return cache

    yield make
    for cache in caches:
        cache.close()


@pytest.fixture
def speedups() -> Any:
    """The C hit path module. Not built (no C compiler, or not Linux/CPython): skipped, like a
    missing service, and a failure under ``HYBRIDINVAL_REQUIRE_SERVICES=1`` (CI builds it)."""
    try:
        from hybridinval import _speedups
    except ImportError as exc:
        reason = (
            f"hybridinval._speedups is not built ({exc}); reinstall with a C compiler "
            f"(pip install -e .) to test the C hit path"
        )
        if _require_services():
            pytest.fail(f"HYBRIDINVAL_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return _speedups


@pytest.fixture(params=["c", "python"])
def hit_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once with the C hit path and once with the pure-Python one (caches built
    after this fixture use it)."""
    import hybridinval._hitpath as cache_module

    module = request.getfixturevalue("speedups") if request.param == "c" else None
    monkeypatch.setattr(cache_module, "_speedups", module)
    return str(request.param)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private Redis for this test only: safe to kill, restart or flush."""
    server = RedisServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[..., RedisServer]]:
    """Start private Redis servers with custom args, e.g.
    ``factory("--client-output-buffer-limit", "pubsub 64kb 0 0")``;
    all are closed at teardown.
    """
    servers: list[RedisServer] = []

    def make(*extra_args: str) -> RedisServer:
        server = RedisServer(extra_args=extra_args)
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.close()


@pytest.fixture
def tcp_proxy(redis_server: RedisServer) -> Iterator[TcpProxy]:
    """A fault-injecting proxy in front of this test's private ``redis_server``.

    Connect clients to ``tcp_proxy.url_for(db)``; drive ``redis_server``
    directly for kill/restart faults.
    """
    proxy = TcpProxy(redis_server.host, redis_server.port)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def proxy_factory() -> Iterator[Callable[[str, int], TcpProxy]]:
    """Create proxies to arbitrary ``(host, port)`` targets; closed at teardown."""
    proxies: list[TcpProxy] = []

    def make(host: str, port: int) -> TcpProxy:
        proxy = TcpProxy(host, port)
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.close()
