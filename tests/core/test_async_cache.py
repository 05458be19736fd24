"""AsyncHybridCache: what only the asyncio cache has to prove.

The guarantees it shares with the blocking cache run in test_cache, test_lease and
test_backplane_faults against both (``both_apis``). Here: the API as documented, single flight
across coroutines, threads and event loops, cancellation, eviction behind a busy loop, a Redis
that does not answer (the loop goes on), processes that mix the two caches, fork, and the
connections of loops that come and go.

Plain ``asyncio.run`` in sync tests: no pytest plugin needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from support import RedisServer, TcpProxy
from support.inspect import entries, redis_l2
from support.waiting import wait_until

from hybridinval import AsyncHybridCache, HybridCache, SerializationError
from hybridinval.keyspace import Keyspace
from hybridinval.testing import MemoryHub, MemoryL2

AsyncFactory = Callable[..., AsyncHybridCache]


@pytest.fixture
def make_async(redis_url: str, namespace: str) -> Iterator[AsyncFactory]:
    """AsyncHybridCaches on the shared Redis in this test's namespace, closed at the end."""
    caches: list[AsyncHybridCache] = []

    def make(url: str | None = None, **options: Any) -> AsyncHybridCache:
        options.setdefault("namespace", namespace)
        cache = AsyncHybridCache.from_url(url or redis_url, **options)
        caches.append(cache)
        assert cache.sync.wait_until_subscribed(10)
        return cache

    yield make
    for cache in caches:
        cache.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


# -- the API -----------------------------------------------------------------------------------


def test_the_documented_api(redis_url: str, namespace: str) -> None:
    async def main() -> None:
        async with AsyncHybridCache.from_url(redis_url, namespace=namespace) as cache:
            assert await cache.wait_until_subscribed(10)
            await cache.set("user:1", {"id": 1}, ttl=300)
            assert await cache.get("user:1") == {"id": 1}
            assert await cache.get("absent") is None and await cache.get("absent", 0) == 0

            async def load() -> dict[str, int]:
                await asyncio.sleep(0)
                return {"id": 2}

            assert await cache.get_or_set("user:2", load, ttl=300) == {"id": 2}
            assert await cache.get_or_set("user:3", lambda: {"id": 3}) == {"id": 3}  # plain
            assert cache.get_local("user:2") == {"id": 2}
            await cache.invalidate("user:1", "user:2")
            assert cache.get_local("user:1") is None and await cache.get("user:2") is None
            assert await cache.invalidate_committed(["user:3"]) is True
            assert await cache.invalidate_committed([]) is True
            stats = cache.stats()
            assert stats["loads"] == 2 and stats["invalidations_sent"] == 3
        with pytest.raises(Exception, match="closed"):
            await cache.get("user:1")

    asyncio.run(main())


def test_bad_input_is_a_typed_error_naming_the_key(make_async: AsyncFactory) -> None:
    cache = make_async()

    async def main() -> None:
        reads: tuple[Callable[[Any], Any], ...] = (
            cache.get,
            lambda k: cache.get_or_set(k, lambda: 1),
        )
        for read in reads:
            with pytest.raises(TypeError, match="42"):
                await read(42)
            with pytest.raises(TypeError):
                await read(["unhashable"])
        with pytest.raises(TypeError, match="42"):
            cache.get_local(42)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await cache.invalidate("x" * 10_000)
        with pytest.raises(SerializationError, match="'k'"):
            await cache.set("k", object())
        with pytest.raises(SerializationError, match="'k'"):
            await cache.get_or_set("k", object)

    asyncio.run(main())


def test_on_in_memory_seams_the_blocking_store_runs_off_the_loop() -> None:
    hub, l2 = MemoryHub(), MemoryL2()
    a = AsyncHybridCache(l2=l2, transport=hub.transport())
    b = AsyncHybridCache(l2=l2, transport=hub.transport())

    async def main() -> None:
        assert await a.wait_until_subscribed(5) and await b.wait_until_subscribed(5)
        assert await a.get_or_set("k", lambda: "v1") == "v1"
        assert await b.get("k") == "v1"  # from the shared L2
        await b.set("k", "v2")
        await asyncio.to_thread(wait_until, lambda: "k" not in entries(a.sync), what="evicted")
        assert await a.get("k") == "v2"

    try:
        asyncio.run(main())
    finally:
        a.close()
        b.close()


# -- single flight -----------------------------------------------------------------------------


def test_one_load_for_a_hundred_coroutines(make_async: AsyncFactory) -> None:
    cache = make_async()
    loads = 0

    async def load() -> str:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.05)
        return "v"

    async def main() -> list[str]:
        return await asyncio.gather(*(cache.get_or_set("k", load) for _ in range(100)))

    assert asyncio.run(main()) == ["v"] * 100
    assert loads == 1 and cache.stats()["single_flight_waits"] == 99


def test_one_load_per_process_across_loops_threads_and_the_blocking_api(
    make_async: AsyncFactory,
) -> None:
    """Eight threads, each with its own event loop, plus four blocking callers: one load."""
    cache = make_async()
    loads: list[int] = []
    started = threading.Event()
    release = threading.Event()

    def load() -> str:  # a plain loader: runs on the leader's loop (or thread)
        loads.append(threading.get_ident())
        started.set()
        release.wait(10)
        return "v"

    results: list[object] = []

    def on_own_loop() -> None:
        results.append(asyncio.run(cache.get_or_set("k", load)))

    def blocking() -> None:
        results.append(cache.sync.get_or_set("k", load))

    threads = [threading.Thread(target=on_own_loop) for _ in range(8)]
    threads += [threading.Thread(target=blocking) for _ in range(4)]
    for thread in threads:
        thread.start()
    assert started.wait(10)
    wait_until(lambda: cache.stats()["single_flight_waits"] == 11, what="all others waiting")
    release.set()
    for thread in threads:
        thread.join(10)
    assert results == ["v"] * 12 and len(loads) == 1


def test_a_cancelled_waiter_cancels_nothing_for_the_others(make_async: AsyncFactory) -> None:
    cache = make_async()
    release = asyncio.Event

    async def main() -> None:
        gate = release()

        async def load() -> str:
            await gate.wait()
            return "v"

        leader = asyncio.create_task(cache.get_or_set("k", load))
        await asyncio.sleep(0.01)
        waiters = [asyncio.create_task(cache.get_or_set("k", load)) for _ in range(3)]
        await asyncio.sleep(0.01)
        waiters[0].cancel()
        await asyncio.sleep(0.01)
        gate.set()
        assert await leader == "v"
        assert [await w for w in waiters[1:]] == ["v", "v"]
        with pytest.raises(asyncio.CancelledError):
            await waiters[0]
        assert cache.get_local("k") == "v"

    asyncio.run(main())
    assert cache.stats()["loads"] == 1


def test_a_cancelled_load_reaches_its_waiters_and_caches_nothing(
    make_async: AsyncFactory, raw: redis.Redis, namespace: str
) -> None:
    cache = make_async()

    async def main() -> None:
        loading = asyncio.Event()

        async def load() -> str:
            loading.set()
            await asyncio.sleep(30)
            return "never"

        leader = asyncio.create_task(cache.get_or_set("k", load))
        await loading.wait()
        waiters = [asyncio.create_task(cache.get_or_set("k", load)) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert cache.stats()["single_flight_waits"] == 3
        leader.cancel()
        for task in (leader, *waiters):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert "k" not in entries(cache.sync) and not cache.sync._local.fills
        # The next caller loads afresh.
        assert await cache.get_or_set("k", lambda: "fresh") == "fresh"

    asyncio.run(main())
    assert raw.get(Keyspace(namespace).data("k"))[16:] == b'j"fresh"'


def test_a_cancelled_load_wakes_a_blocking_waiter_too(make_async: AsyncFactory) -> None:
    cache = make_async()
    out: list[object] = []

    async def main() -> None:
        loading = asyncio.Event()

        async def load() -> str:
            loading.set()
            await asyncio.sleep(30)
            return "never"

        leader = asyncio.create_task(cache.get_or_set("k", load))
        await loading.wait()

        def blocking() -> None:
            try:
                out.append(cache.sync.get("k"))
            except BaseException as exc:  # CancelledError is a BaseException
                out.append(type(exc))

        thread = threading.Thread(target=blocking)
        thread.start()
        await asyncio.to_thread(
            wait_until, lambda: cache.stats()["single_flight_waits"] == 1, what="waiting"
        )
        leader.cancel()
        await asyncio.to_thread(thread.join, 10)

    asyncio.run(main())
    assert out == [asyncio.CancelledError]


# -- eviction does not wait for the loop ------------------------------------------------------


def test_eviction_lands_while_the_loop_is_busy_in_cpu_bound_code(
    make_async: AsyncFactory, make_cache: Callable[..., HybridCache]
) -> None:
    """The handler below never yields to the loop; another cache invalidates the key meanwhile.
    The subscriber thread evicts it all the same, and the busy handler sees that it did."""
    cache = make_async()
    writer = make_cache()

    async def main() -> tuple[bool, float]:
        await cache.get_or_set("k", lambda: "old")
        assert "k" in entries(cache.sync)
        go = threading.Event()

        def invalidate_soon() -> None:
            go.wait(10)
            writer.invalidate("k")

        threading.Thread(target=invalidate_soon, daemon=True).start()
        # CPU-bound, on the loop's thread, no await: up to 10 s.
        go.set()
        started = time.perf_counter()
        deadline = time.monotonic() + 10
        while "k" in entries(cache.sync) and time.monotonic() < deadline:
            sum(range(100))
        busy_ms = (time.perf_counter() - started) * 1000
        evicted = "k" not in entries(cache.sync)
        assert await cache.get("k") is None  # and the next read after the handler misses
        return evicted, busy_ms

    evicted, busy_ms = asyncio.run(main())
    assert evicted, "the key was not evicted while the loop was busy"
    print(f"evicted {busy_ms:.2f} ms into a CPU-bound handler")  # figure for -s runs


# -- Redis that does not answer ---------------------------------------------------------------


def test_a_black_holed_redis_holds_the_task_never_the_loop(
    make_async: AsyncFactory, redis_server: RedisServer, tcp_proxy: TcpProxy
) -> None:
    cache = make_async(tcp_proxy.url, socket_timeout=0.5)

    async def main() -> tuple[str, int]:
        await cache.get("warm-up")  # the loop's connection exists
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.02)
        tcp_proxy.blackhole()
        before = ticks
        value = await cache.get_or_set("k", lambda: "from the loader")
        during = ticks - before
        stop.set()
        await ticking
        return value, during

    value, ticks_during_the_read = asyncio.run(main())
    assert value == "from the loader"
    assert cache.stats()["l2_errors"] >= 1
    # The read waited out the socket timeout (0.5 s); the loop ran the ticker meanwhile.
    assert ticks_during_the_read >= 5, ticks_during_the_read


def test_closing_does_not_block_the_loop(make_async: AsyncFactory) -> None:
    cache = make_async()

    async def main() -> int:
        await cache.get_or_set("k", lambda: 1)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await cache.aclose()
        task.cancel()
        return ticks

    assert asyncio.run(main()) > 1
    assert not cache.subscribed


# -- publishing after commit ------------------------------------------------------------------


def test_a_publish_cancelled_after_commit_is_retried(
    make_async: AsyncFactory, make_cache: Callable[..., HybridCache]
) -> None:
    cache = make_async()
    other = make_cache()
    other.get_or_set("k", lambda: "old")
    real = cache.l2

    class Stuck:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        async def invalidate_many(self, *args: Any) -> None:
            await asyncio.sleep(30)

    cache.l2 = Stuck()

    async def main() -> None:
        task = asyncio.create_task(cache.invalidate_committed(["k"]))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    # The change is committed: its invalidation still goes out (the retry uses the blocking
    # store), and this process flushed its own L1 meanwhile.
    wait_until(lambda: "k" not in entries(other), what="the retried invalidation")
    assert cache.stats()["publish_failures"] == 1
    wait_until(lambda: cache.pending_retries() == 0, what="retry done")


# -- processes and loops ----------------------------------------------------------------------


def _sync_process(url: str, namespace: str, conn: Any) -> None:
    """A process with the blocking cache: holds "from-async" in L1 until the asyncio process
    invalidates it, then invalidates "from-sync" itself."""
    cache = HybridCache.from_url(url, namespace=namespace)
    try:
        assert cache.wait_until_subscribed(10)
        cache.get_or_set("from-async", lambda: "old")
        conn.send("ready")
        deadline = time.monotonic() + 10
        while "from-async" in entries(cache) and time.monotonic() < deadline:
            time.sleep(0.001)
        evicted = "from-async" not in entries(cache)
        cache.invalidate("from-sync")
        conn.send(evicted)
    finally:
        cache.close()


def test_blocking_and_asyncio_processes_hear_each_other(
    make_async: AsyncFactory, redis_url: str, namespace: str
) -> None:
    import multiprocessing

    cache = make_async()
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_sync_process, args=(redis_url, namespace, theirs))
    child.start()
    try:

        async def main() -> bool:
            await cache.get_or_set("from-sync", lambda: "old")
            assert await asyncio.to_thread(ours.poll, 30) and ours.recv() == "ready"
            await cache.invalidate("from-async")
            assert await asyncio.to_thread(ours.poll, 10)
            evicted_there: bool = ours.recv()
            await asyncio.to_thread(
                wait_until, lambda: "from-sync" not in entries(cache.sync), what="evicted here"
            )
            return evicted_there

        assert asyncio.run(main())
    finally:
        child.join(10)
    assert child.exitcode == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX-only")
def test_a_forked_child_gets_its_own_identity_connections_and_subscriber(
    make_async: AsyncFactory, make_cache: Callable[..., HybridCache]
) -> None:
    cache = make_async()
    writer = make_cache()
    asyncio.run(cache.get_or_set("shared", lambda: "parent"))
    parent_id = cache.instance_id
    read_fd, write_fd = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then exit without running pytest's teardown
        code = 1
        try:

            async def child() -> dict[str, object]:
                report: dict[str, object] = {
                    "id_changed": cache.instance_id != parent_id,
                    "l1_empty": cache.get_local("shared") is None,
                    "subscribed": await cache.wait_until_subscribed(10),
                    "read": await cache.get_or_set("shared", lambda: "child"),
                }
                os.write(write_fd, b"x")
                await asyncio.to_thread(os.read, go_r, 1)
                deadline = time.monotonic() + 10
                while "shared" in entries(cache.sync) and time.monotonic() < deadline:
                    await asyncio.sleep(0.001)
                report["evicted"] = "shared" not in entries(cache.sync)
                await cache.aclose()
                return report

            os.write(write_fd, json.dumps(asyncio.run(child())).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    assert os.read(read_fd, 1) == b"x"
    writer.invalidate("shared")
    os.write(go_w, b"g")
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    report = json.loads(b"".join(chunks))
    # The child read L2 (the parent's value), not the parent's L1, on its own connections.
    assert report == {
        "id_changed": True,
        "l1_empty": True,
        "subscribed": True,
        "read": "parent",
        "evicted": True,
    }
    assert cache.instance_id == parent_id
    assert asyncio.run(cache.get_or_set("shared", lambda: "again")) == "again"


def test_loops_that_come_and_go_leave_no_connections_behind(
    make_async: AsyncFactory, raw: redis.Redis
) -> None:
    """asyncio.run per call (a Celery task's way): each loop gets its own connection, and
    those of closed loops are shut down when the next loop connects."""
    name = f"hi-loops-{os.getpid()}"
    cache = make_async(client_name=name)

    def ours() -> int:
        return sum(1 for c in raw.client_list() if c.get("name") == name)

    baseline = ours()  # the subscriber's, and the blocking client's
    for i in range(30):
        assert asyncio.run(cache.get_or_set(f"k{i}", lambda i=i: i)) == i
    wait_until(lambda: ours() <= baseline + 1, what="old loops' connections closed")


def test_a_loop_never_gets_another_loops_client(make_async: AsyncFactory) -> None:
    """Forced interleaving: thread A pauses right after its first write of the store's record
    of the last loop used; the main thread's loop B connects meanwhile; A resumes. B must still
    get its own client (a record written in parts could pair loop B with A's client)."""
    from hybridinval._l2_async import AsyncRedisL2

    paused, resume = threading.Event(), threading.Event()
    pause_in: list[int] = []

    class PausingStore(AsyncRedisL2):
        def __setattr__(self, name: str, value: Any) -> None:
            object.__setattr__(self, name, value)
            if pause_in and threading.get_ident() == pause_in[0] and name in ("_last", "_loop"):
                pause_in.clear()
                paused.set()
                resume.wait(10)

    cache = make_async(l1_enabled=False)
    cache.l2 = store = PausingStore(redis_l2(cache.sync))

    def in_thread_a() -> None:
        pause_in.append(threading.get_ident())
        asyncio.run(store.get("k"))

    loop_b = asyncio.new_event_loop()

    async def client_of_b() -> Any:
        execute: Any = store._execute()
        return execute.__self__  # the client whose execute_command it is

    try:
        thread = threading.Thread(target=in_thread_a)
        thread.start()
        assert paused.wait(10)
        loop_b.run_until_complete(client_of_b())  # B connects while A is half way
        resume.set()
        thread.join(10)
        own = store._clients[loop_b][0]
        assert loop_b.run_until_complete(client_of_b()) is own
    finally:
        resume.set()
        loop_b.run_until_complete(store.aclose())
        loop_b.close()


def test_a_cancelled_invalidate_still_finishes(
    make_async: AsyncFactory, make_cache: Callable[..., HybridCache]
) -> None:
    """The caller stops waiting; the L2 writes and the message still go out together (with a
    transport that publishes after the writes, half of them would leave others stale)."""
    cache = make_async()
    other = make_cache()
    other.get_or_set("k", lambda: "old")
    real = cache.l2

    class Held:
        release = threading.Event()

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        async def invalidate_many(self, *args: Any) -> None:
            await asyncio.to_thread(self.release.wait, 10)
            await real.invalidate_many(*args)

    held = Held()
    cache.l2 = held

    async def main() -> None:
        task = asyncio.create_task(cache.invalidate("k"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        held.release.set()
        await asyncio.to_thread(
            wait_until, lambda: "k" not in entries(other), what="the invalidation went out"
        )

    asyncio.run(main())


def test_a_blocking_read_on_the_loop_that_loads_the_key_fails_instead_of_hanging(
    make_async: AsyncFactory,
) -> None:
    cache = make_async()

    async def main() -> None:
        loading = asyncio.Event()

        async def load() -> str:
            loading.set()
            await asyncio.sleep(0.2)
            return "v"

        leader = asyncio.create_task(cache.get_or_set("k", load))
        await loading.wait()
        with pytest.raises(RuntimeError, match="await"):
            cache.sync.get("k")  # on the very loop that is loading "k"
        assert await leader == "v"

    asyncio.run(main())
