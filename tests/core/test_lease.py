"""The L1 lease: an invalidation that has reached this process is applied before L1 answers.

Delivery to the socket is not enough on a busy machine: the subscriber thread may not run for
milliseconds while request threads keep serving L1 hits. These tests stall the subscriber at
the two places where a message can wait, with the message already delivered, and check that a
read begun after the lease ran out never returns the old value:

* in the socket, not yet read (the subscriber is parked after select() said "readable");
* read by redis-py but not yet applied (the subscriber is stuck inside the listener).

A control test runs the same stall with the lease turned off and gets the old value, which
shows the stall is a real hazard and not an artefact the lease tests could pass by accident.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from support.inspect import entries
from support.waiting import wait_until

from hybridinval import HybridCache

CacheFactory = Callable[..., HybridCache]
LEASE = 0.001

# Every test on the C and the Python hit path, of the blocking and of the asyncio cache.
pytestmark = [pytest.mark.usefixtures("hit_path"), pytest.mark.both_apis]


class ParkAfterSelect:
    """Parks the subscriber right after select() reports data, before it reads a byte."""

    def __init__(self, cache: HybridCache) -> None:
        self.transport: Any = cache.transport
        self.original = getattr(self.transport, "_wait_readable")  # noqa: B009
        self.armed = False
        self.entered = threading.Event()
        self.parked = threading.Event()
        self.release = threading.Event()
        setattr(self.transport, "_wait_readable", self)  # noqa: B010
        # The subscriber may be blocked in the original wait right now; arm only once it has
        # come round to this one (at the latest after its 100 ms tick).
        assert self.entered.wait(5)
        self.armed = True

    def __call__(self, sock: Any, timeout: float) -> None:
        self.entered.set()
        self.original(sock, timeout)
        if self.armed and select.select((sock,), (), (), 0)[0]:
            self.armed = False
            self.parked.set()
            self.release.wait(10)


class StuckInListener:
    """Blocks the subscriber inside on_message for the first message after arming."""

    def __init__(self, cache: HybridCache) -> None:
        self.original = cache._coherence.on_message
        self.armed = False
        self.stuck = threading.Event()
        self.release = threading.Event()
        cache._coherence.on_message = self  # type: ignore[method-assign]  # looked up per call

    def __call__(self, payload: bytes) -> None:
        if self.armed:
            self.armed = False
            self.stuck.set()
            self.release.wait(10)
        self.original(payload)


def filled(cache: HybridCache, key: str, value: object) -> None:
    cache.get_or_set(key, lambda: value)
    # In L1 (not get_local: the asyncio cache's misses when the lease cannot be renewed now).
    assert entries(cache)[key][0] == value


def parked_with_news(reader: HybridCache, writer: HybridCache) -> ParkAfterSelect:
    """The reader holds "k" = "v1" in L1; the writer has set "v2", and the message waits in the
    reader's socket (its subscriber is parked); the lease that covered the fill has run out."""
    filled(reader, "k", "v1")
    park = ParkAfterSelect(reader)
    writer.set("k", "v2")
    assert park.parked.wait(5)
    time.sleep(3 * LEASE)
    return park


def read_in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def test_a_message_still_in_the_socket_is_applied_before_l1_answers(
    make_cache: CacheFactory,
) -> None:
    reader = make_cache(l1_lease=LEASE, l1_lease_wait=10.0)
    park = parked_with_news(reader, make_cache())
    thread, out = read_in_thread(lambda: reader.get("k"))
    # The reader must be waiting for the subscriber, not answering from L1.
    wait_until(lambda: reader.stats()["lease_waits"] >= 1, what="the reader waits")
    assert out == []
    park.release.set()
    thread.join(5)
    assert out == ["v2"]
    assert reader.stats()["lease_flushes"] == 0  # caught up in time: nothing flushed


def test_a_subscriber_stuck_mid_message_makes_readers_flush_instead_of_serving(
    make_cache: CacheFactory,
) -> None:
    reader = make_cache(l1_lease=LEASE, l1_lease_wait=0.05)
    writer = make_cache()
    filled(reader, "k", "v1")
    filled(reader, "other", "o1")
    stuck = StuckInListener(reader)
    stuck.armed = True
    writer.set("k", "v2")
    assert stuck.stuck.wait(5)
    try:
        time.sleep(3 * LEASE)
        # Read by redis-py, not applied: the subscriber is "busy"; after l1_lease_wait the
        # reader gives up on it, flushes L1 and reads L2, which the writer updated first.
        assert reader.get("k") == "v2"
        stats = reader.stats()
        assert stats["lease_flushes"] >= 1 and stats["lease_waits"] >= 1
        assert reader.get_local("other") is None  # flushed, not picked over
    finally:
        stuck.release.set()
    wait_until(lambda: reader.stats()["invalidations_received"] >= 1, what="message applied")
    assert reader.get("k") == "v2"


def test_control_without_a_lease_the_same_stall_serves_the_old_value(
    make_cache: CacheFactory,
) -> None:
    reader = make_cache(l1_lease=None)
    park = parked_with_news(reader, make_cache())
    try:
        assert reader.get("k") == "v1"  # the hazard the lease closes
        assert reader.stats()["lease_waits"] == 0
    finally:
        park.release.set()
    wait_until(lambda: reader.get_local("k") is None, what="late eviction")


def test_get_local_and_get_or_set_honour_the_lease_too(make_cache: CacheFactory, api: str) -> None:
    reader = make_cache(l1_lease=LEASE, l1_lease_wait=10.0)
    writer = make_cache()
    reads: dict[str, Callable[[], object]] = {
        "get_local": lambda: reader.get_local("k", "missing"),
        "get_or_set": lambda: reader.get_or_set("k", lambda: "loaded"),
    }
    for name, read in reads.items():
        park = parked_with_news(reader, writer)
        waits = reader.stats()["lease_waits"]
        thread, out = read_in_thread(read)
        if api == "async" and name == "get_local":
            # The asyncio cache's get_local never waits (it runs on the loop): the lease it
            # cannot renew at once makes it a miss.
            thread.join(5)
            assert out == ["missing"]
            park.release.set()
            wait_until(lambda: "k" not in entries(reader), what="the late eviction")
        else:
            wait_until(lambda w=waits: reader.stats()["lease_waits"] > w, what="the reader waits")
        park.release.set()
        thread.join(5)
        assert out and out[0] != "v1", out
        park.transport._wait_readable = park.original
        received = reader.stats()["invalidations_received"]
        writer.invalidate("k")
        wait_until(
            lambda r=received: reader.stats()["invalidations_received"] > r,
            what="the reset reaches the reader",
        )


def test_no_waiting_while_not_subscribed(namespace: str) -> None:
    """Redis down: L1 is not in use, so there is nothing to wait for, ever."""
    cache = HybridCache.from_url(
        "redis://127.0.0.1:1/0", namespace=namespace, l1_lease=LEASE, l1_lease_wait=10.0
    )
    try:
        for i in range(20):
            assert cache.get_or_set("k", lambda i=i: i) == i  # the loader, every time
            time.sleep(2 * LEASE)
        assert cache.stats()["lease_waits"] == 0
    finally:
        cache.close()


def test_bad_lease_settings_are_refused(redis_url: str) -> None:
    with pytest.raises(ValueError, match="l1_lease"):
        HybridCache.from_url(redis_url, l1_lease=0)
    with pytest.raises(ValueError, match="l1_lease_wait"):
        HybridCache.from_url(redis_url, l1_lease_wait=-1)


def test_a_transport_that_cannot_report_progress_runs_without_a_lease(
    redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    base = HybridCache.from_url(redis_url, namespace=namespace)

    class Opaque:
        """Delegates everything, but cannot prove delivery progress."""

        tracks_delivery = False

        def __init__(self, inner: Any) -> None:
            self._inner = inner
            self.channel = inner.channel

        def caught_up(self, timeout: float) -> float | None:
            raise AssertionError("a transport that does not track delivery is never asked")

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

    try:
        with caplog.at_level("WARNING", logger="hybridinval"):
            cache = HybridCache(l2=base.l2, transport=Opaque(base.transport), namespace=namespace)
        assert cache.l1_lease is None
        assert "without a lease" in caplog.text
        assert cache.wait_until_subscribed(10)
        assert cache.get_or_set("k", lambda: 1) == 1
        cache.transport.stop()
    finally:
        base.close()


def renewals(cache: HybridCache) -> list[None]:
    """Records each lease renewal of ``cache`` (it goes on renewing as before)."""
    calls: list[None] = []
    coherence = cache._coherence
    # The blocking paths renew with renew_lease(); the asyncio ones with try_renew_lease(),
    # polled (once when the subscriber is caught up, as here).
    for name in ("renew_lease", "try_renew_lease"):
        original = getattr(coherence, name)

        def counted(*args: Any, original: Callable[..., Any] = original) -> Any:
            calls.append(None)
            return original(*args)

        setattr(coherence, name, counted)
    return calls


def test_a_cache_without_l1_holds_no_lease(make_cache: CacheFactory) -> None:
    """With L1 off there is nothing a lease would protect: no select() per lease period."""
    cache = make_cache(l1_enabled=False, l1_lease=LEASE)
    calls = renewals(cache)
    cache.set("k", 1)
    for _ in range(5):
        assert cache.get("k") == 1
        time.sleep(2 * LEASE)
    assert cache.l1_lease is None and cache.stats()["lease_waits"] == 0
    assert calls == []


def test_only_a_hit_renews_the_lease(make_cache: CacheFactory) -> None:
    """A miss never serves L1, so it never waits for the subscriber; a hit after the lease ran
    out renews it first."""
    cache = make_cache(l1_lease=LEASE)
    calls = renewals(cache)
    for read in (cache.get, cache.get_local, lambda key: cache.get_or_set(key, lambda: None)):
        time.sleep(2 * LEASE)
        read("absent")
        cache.invalidate("absent")
    assert calls == []
    cache.get_or_set("k", lambda: 1)
    reads: tuple[Callable[[str], Any], ...] = (
        cache.get,
        cache.get_local,
        lambda key: cache.get_or_set(key, lambda: 2),
    )
    for read in reads:
        time.sleep(2 * LEASE)
        assert read("k") == 1
    assert len(calls) == 3
