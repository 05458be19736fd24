"""Group sending: the threads of a process that invalidate while another's round trip is in
flight share the next round trip (one script call, one message), and each still returns only
once its keys are gone from L2, or raises that round trip's error."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from support.inspect import entries
from support.waiting import wait_until

from hybridinval import HybridCache
from hybridinval._group import GroupSend
from hybridinval.errors import BackendUnavailableError


class GatedL2Calls:
    """Wraps ``l2.invalidate_many``: records each call's keys; the first call waits for
    :attr:`release`; ``fail_from`` makes calls from that index raise."""

    def __init__(self, l2: Any, fail_from: int | None = None) -> None:
        self.real = l2.invalidate_many
        self.calls: list[list[str]] = []
        self.finished: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_from = fail_from
        l2.invalidate_many = self

    def __call__(self, keys: Any, notify: Any = None) -> None:
        index = len(self.calls)
        self.calls.append(list(keys))
        if index == 0:
            self.entered.set()
            assert self.release.wait(10)
        if self.fail_from is not None and index >= self.fail_from:
            raise BackendUnavailableError("injected")
        self.real(keys, notify)
        self.finished.append(index)


def run(target: Callable[[], object]) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def body() -> None:
        try:
            target()
            outcome.append("ok")
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    return thread, outcome


def queued(cache: HybridCache, n: int) -> None:
    wait_until(lambda: len(cache._group_send._queue) == n, what=f"{n} senders queued")


def test_senders_behind_a_round_trip_share_the_next_and_wait_for_it(
    make_cache: Callable[..., HybridCache],
) -> None:
    writer, reader = make_cache(), make_cache()
    for key in "abc":
        reader.get_or_set(key, lambda key=key: key)
    gate = GatedL2Calls(writer.l2)
    first, first_out = run(lambda: writer.invalidate("a"))
    assert gate.entered.wait(10)
    riders = [run(lambda key=key: writer.invalidate(key)) for key in "bc"]
    queued(writer, 2)
    assert all(not out for _, out in riders)  # nothing returns before its round trip
    gate.release.set()
    for thread, _ in [(first, first_out), *riders]:
        thread.join(10)
    assert first_out == ["ok"] and all(out == ["ok"] for _, out in riders)
    assert gate.calls[0] == ["a"] and sorted(gate.calls[1]) == ["b", "c"]
    assert len(gate.calls) == 2 and gate.finished == [0, 1]
    assert writer._group_send.merged == 1
    wait_until(lambda: not entries(reader), what="all three evicted")
    assert reader.stats()["invalidations_received"] == 2  # two messages, not three
    assert writer.stats()["invalidations_sent"] == 3


def test_a_rider_returns_only_after_the_round_trip_that_carried_it(
    make_cache: Callable[..., HybridCache],
) -> None:
    """Each rider's keys are gone from L2 when its call returns (what a commit relies on)."""
    writer = make_cache()
    for key in "ab":
        writer.set(key, key)
    gate = GatedL2Calls(writer.l2)
    first, _ = run(lambda: writer.invalidate("x"))
    assert gate.entered.wait(10)
    seen: list[Any] = []

    def rider() -> None:
        writer.invalidate("a", "b")
        seen.append(writer.l2.get("a")[0])  # read L2 right after returning

    thread, out = run(rider)
    queued(writer, 1)
    gate.release.set()
    first.join(10)
    thread.join(10)
    assert out == ["ok"] and seen == [None]


def test_a_failed_shared_round_trip_fails_every_rider(
    make_cache: Callable[..., HybridCache],
) -> None:
    writer = make_cache()
    gate = GatedL2Calls(writer.l2, fail_from=1)
    first, first_out = run(lambda: writer.invalidate("a"))
    assert gate.entered.wait(10)
    plain, plain_out = run(lambda: writer.invalidate("b"))
    committed: list[bool] = []
    after_commit, _ = run(lambda: committed.append(writer.invalidate_committed(["c"])))
    queued(writer, 2)
    gate.release.set()
    for thread in (first, plain, after_commit):
        thread.join(10)
    assert first_out == ["ok"]
    assert isinstance(plain_out[0], BackendUnavailableError)
    assert committed == [False] and writer.pending_retries() == 1  # the retry has it
    gate.fail_from = None
    wait_until(lambda: writer.pending_retries() == 0, what="retried")


def test_an_interrupted_leader_fails_its_riders_as_a_store_failure() -> None:
    """A leader interrupted mid-send (not a store failure) re-raises what interrupted it; its
    riders' keys may not have gone out, so they get a store failure (their retry takes over)."""
    release, entered = threading.Event(), threading.Event()

    def send(keys: list[str]) -> None:
        if keys == ["first"]:
            entered.set()
            release.wait(10)
        if "second" in keys:
            raise KeyboardInterrupt

    group = GroupSend(send)
    first, first_out = run(lambda: group(["first"]))
    assert entered.wait(10)
    second, second_out = run(lambda: group(["second"]))
    wait_until(lambda: len(group._queue) == 1, what="the next leader queued")
    rider, rider_out = run(lambda: group(["rider"]))
    wait_until(lambda: len(group._queue) == 2, what="its rider queued")
    release.set()
    for thread in (first, second, rider):
        thread.join(10)
    assert first_out == ["ok"]
    assert isinstance(second_out[0], KeyboardInterrupt)
    assert isinstance(rider_out[0], BackendUnavailableError)
    assert not group._busy and group._queue == []


def test_an_idle_sender_goes_out_at_once(make_cache: Callable[..., HybridCache]) -> None:
    writer = make_cache()
    gate = GatedL2Calls(writer.l2)
    gate.release.set()
    writer.invalidate("a")
    writer.invalidate("b")
    assert gate.calls == [["a"], ["b"]] and writer._group_send.merged == 0


@pytest.mark.parametrize("threads", [8])
def test_many_threads_lose_no_key(make_cache: Callable[..., HybridCache], threads: int) -> None:
    writer, reader = make_cache(), make_cache()
    keys = [f"k{t}-{i}" for t in range(threads) for i in range(50)]
    for key in keys:
        reader.get_or_set(key, lambda key=key: key)
    barrier = threading.Barrier(threads)

    def invalidate(t: int) -> None:
        barrier.wait()
        for i in range(50):
            writer.invalidate(f"k{t}-{i}")

    workers = [threading.Thread(target=invalidate, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    wait_until(lambda: not entries(reader), what="every key evicted")
    assert all(writer.l2.get(k)[0] is None for k in keys)
    sent = writer._group_send
    assert sent.round_trips + sent.merged == len(keys)
