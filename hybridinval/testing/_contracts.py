"""Behaviour suites for the seams: what the cache relies on from every implementation.

Subclass one in a test module, name it ``Test...`` and give it a factory; pytest (or any
runner that collects ``test_*`` methods) runs every check against your implementation::

    from hybridinval.testing import L2StoreContract

    class TestMyStore(L2StoreContract):
        def make_store(self):
            return MyStore(...)   # a fresh, empty store (its own namespace)

The suites need no pytest features (no fixtures, plain ``assert``), so this module imports
without pytest. They run against hybridinval's own implementations in its tests, the Redis ones
and the in-memory ones of :mod:`hybridinval.testing`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .._l1 import L1Store
from .._l2 import L2Store
from ..errors import CorruptPayloadError
from ..serializers import Serializer
from ..transports import TICK_INTERVAL, Transport
from ._memory import MemoryL2

__all__ = [
    "L1StoreContract",
    "L2StoreContract",
    "RecordingListener",
    "SerializerContract",
    "TransportContract",
]


def _eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


class L1StoreContract:
    """The :class:`~hybridinval.L1Store` contract. Set ``keeps_entries = False`` for a store
    that never keeps anything (L1 disabled)."""

    keeps_entries = True

    def make_store(self) -> L1Store:
        """A fresh, empty store with room for at least 4 entries."""
        raise NotImplementedError

    def test_a_stored_entry_is_looked_up_with_its_deadline_and_version(self) -> None:
        l1 = self.make_store()
        assert l1.lookup("k") is None and len(l1) == 0
        l1.store("k", {"v": 1}, 100.0, b"ver")
        if self.keeps_entries:
            assert l1.lookup("k") == ({"v": 1}, 100.0, b"ver")
            assert len(l1) == 1
            l1.store("k", "new", 200.0)
            assert l1.lookup("k") == ("new", 200.0, None)
        else:
            assert l1.lookup("k") is None and len(l1) == 0

    def test_store_evict_and_clear_are_idempotent_and_count(self) -> None:
        l1 = self.make_store()
        l1.store("a", 1, 100.0)
        l1.store("a", 1, 100.0)
        assert l1.evict_many(["a", "a", "missing"]) == (1 if self.keeps_entries else 0)
        assert l1.evict_many(["a"]) == 0
        l1.store("b", 2, 100.0)
        l1.store("c", 3, 100.0)
        assert l1.clear() == (2 if self.keeps_entries else 0)
        assert l1.clear() == 0
        assert len(l1) == 0 and l1.lookup("b") is None and l1.snapshot() == {}

    def test_expire_removes_only_due_entries(self) -> None:
        l1 = self.make_store()
        l1.store("soon", 1, 10.0)
        l1.store("later", 2, 20.0)
        l1.store("replaced", 3, 10.0)
        l1.store("replaced", 4, 30.0)  # the new deadline counts, not the old one
        assert l1.expire(15.0) == (1 if self.keeps_entries else 0)
        assert l1.lookup("soon") is None
        if self.keeps_entries:
            assert l1.lookup("later") == (2, 20.0, None)
            assert l1.lookup("replaced") == (4, 30.0, None)

    def test_snapshot_is_a_copy_of_every_entry(self) -> None:
        l1 = self.make_store()
        l1.store("a", 1, 100.0, b"v1")
        l1.store("b", 2, 100.0)
        snap = l1.snapshot()
        l1.clear()
        if self.keeps_entries:
            assert snap == {"a": (1, 100.0, b"v1"), "b": (2, 100.0, None)}
        else:
            assert snap == {}

    def test_lookup_is_safe_beside_a_mutating_thread(self) -> None:
        l1 = self.make_store()
        stop = threading.Event()
        errors: list[BaseException] = []

        def mutate() -> None:
            i = 0
            while not stop.is_set():
                l1.store(f"k{i % 50}", i, 1e9)
                if i % 7 == 0:
                    l1.evict_many([f"k{(i * 3) % 50}"])
                if i % 101 == 0:
                    l1.clear()
                i += 1

        thread = threading.Thread(target=mutate)
        thread.start()
        try:
            for i in range(20_000):
                try:
                    entry = l1.lookup(f"k{i % 50}")
                    assert entry is None or len(entry) == 3
                    len(l1)
                except BaseException as exc:
                    errors.append(exc)
                    break
        finally:
            stop.set()
            thread.join()
        assert errors == []


class L2StoreContract:
    """The :class:`~hybridinval.L2Store` contract. ``make_store`` returns a fresh store that
    shares nothing with earlier ones (its own namespace); it is closed after each check.
    ``publishes_notify``: the store's scripts publish ``notify`` (set ``False`` for a store
    that refuses it, e.g. :class:`MemoryL2`)."""

    publishes_notify = True

    def make_store(self) -> L2Store:
        raise NotImplementedError

    @contextlib.contextmanager
    def store(self) -> Iterator[L2Store]:
        l2 = self.make_store()
        try:
            yield l2
        finally:
            l2.close()

    def test_a_miss_reads_no_version_and_a_fill_reads_none(self) -> None:
        with self.store() as l2:
            assert l2.get("absent") == (None, None)
            assert l2.get_for_fill("absent") == (None, b"")
            assert l2.version_ttl > 0

    def test_cas_set_stores_under_the_version_it_read(self) -> None:
        with self.store() as l2:
            _, version = l2.get_for_fill("k")
            assert l2.cas_set("k", b"payload", 60.0, version)
            assert l2.get("k") == (b"payload", version)
            assert l2.get_for_fill("k") == (b"payload", version)
            assert l2.cas_set("k", b"again", 60.0, version), "idempotent while unchanged"

    def test_an_invalidation_between_read_and_write_defeats_the_cas(self) -> None:
        with self.store() as l2:
            _, version = l2.get_for_fill("k")
            l2.invalidate_many(["k"])
            assert not l2.cas_set("k", b"stale", 60.0, version)
            assert l2.get("k") == (None, None)

    def test_set_writes_under_a_new_version_every_time(self) -> None:
        with self.store() as l2:
            seen = set()
            for i in range(5):
                version = l2.set("k", b"v%d" % i, 60.0)
                assert version not in seen and version != b""
                seen.add(version)
                assert l2.get("k") == (b"v%d" % i, version)
                assert l2.versions(["k"]) == [version]
            _, read = l2.get_for_fill("k")
            l2.set("k", b"other", 60.0)
            assert not l2.cas_set("k", b"stale", 60.0, read)

    def test_invalidate_deletes_and_changes_every_version(self) -> None:
        with self.store() as l2:
            l2.set("a", b"1", 60.0)
            l2.set("b", b"2", 60.0)
            before = l2.versions(["a", "b", "c"])
            assert before[2] == b""
            l2.invalidate_many(["a", "b", "c"])
            after = l2.versions(["a", "b", "c"])
            assert all(x != y for x, y in zip(before, after, strict=True))
            assert l2.get("a") == (None, None) and l2.get("b") == (None, None)
            l2.invalidate_many(["a"])
            assert l2.versions(["a"]) != after[:1], "each invalidation is a new version"
            l2.invalidate_many([])

    def test_versions_keep_order_across_many_keys(self) -> None:
        with self.store() as l2:
            keys = [f"k{i}" for i in range(2500)]
            l2.invalidate_many(keys[::2])
            versions = l2.versions(keys)
            assert len(versions) == len(keys)
            assert all(v != b"" for v in versions[::2]) and all(v == b"" for v in versions[1::2])

    def test_the_incarnation_is_stable_while_nothing_is_lost(self) -> None:
        with self.store() as l2:
            first = l2.incarnation()
            l2.set("k", b"v", 60.0)
            assert isinstance(first, str) and first and l2.incarnation() == first

    def test_values_are_binary_safe(self) -> None:
        with self.store() as l2:
            payload = bytes(range(256)) * 4
            version = l2.set("bin:\u00e9", payload, 60.0)
            assert l2.get("bin:\u00e9") == (payload, version)

    def test_reconnect_and_reset_after_fork_keep_it_usable(self) -> None:
        with self.store() as l2:
            l2.set("k", b"v", 60.0)
            l2.reconnect()
            assert l2.get("k")[0] == b"v"

    def test_notify_is_published_or_refused_never_dropped(self) -> None:
        with self.store() as l2:
            if self.publishes_notify:
                l2.set("k", b"v", 60.0, ("contract-channel", b"message"))
                l2.invalidate_many(["k"], ("contract-channel", b"message"))
                return
            for call in (
                lambda: l2.set("k", b"v", 60.0, ("channel", b"m")),
                lambda: l2.invalidate_many(["k"], ("channel", b"m")),
            ):
                try:
                    call()
                except ValueError:
                    continue
                raise AssertionError("a store that cannot publish must refuse notify")


class RecordingListener:
    """A :class:`~hybridinval.BackplaneListener` that records what it is told."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.events: list[str] = []
        self.ticks = 0
        self.connected = threading.Event()

    def on_message(self, payload: bytes) -> None:
        self.messages.append(bytes(payload))

    def on_connected(self) -> None:
        self.events.append("connected")
        self.connected.set()

    def on_blind(self, reason: str) -> None:
        self.events.append("blind")
        self.connected.clear()

    def on_resumed(self) -> None:
        self.events.append("resumed")
        self.connected.set()

    def on_tick(self) -> None:
        self.ticks += 1


class TransportContract:
    """The :class:`~hybridinval.Transport` contract. ``make_transports(n)`` returns ``n``
    transports of one fresh namespace (as ``n`` processes would have); each is stopped after
    the check."""

    def make_transports(self, n: int) -> list[Transport]:
        raise NotImplementedError

    @contextlib.contextmanager
    def started(self, n: int) -> Iterator[list[tuple[Transport, RecordingListener]]]:
        transports = self.make_transports(n)
        pairs = [(t, RecordingListener()) for t in transports]
        try:
            for transport, listener in pairs:
                transport.start(listener)
                transport.start(listener)  # idempotent
            for _, listener in pairs:
                assert listener.connected.wait(10), "on_connected within 10 s"
            yield pairs
        finally:
            for transport, _ in pairs:
                transport.stop()
                transport.stop()  # idempotent

    def test_every_subscriber_gets_every_message_in_order_and_unchanged(self) -> None:
        with self.started(3) as pairs:
            sender = pairs[0][0]
            sent = [b'{"n":%d}' % i for i in range(20)] + [bytes(range(256))]
            for message in sent:
                sender.publish(message)
            for _, listener in pairs:  # the sender hears its own messages too
                received = listener.messages
                assert _eventually(lambda: len(received) >= len(sent))  # noqa: B023
                assert received == sent

    def test_caught_up_proves_delivery(self) -> None:
        with self.started(2) as pairs:
            (sender, _), (receiver, listener) = pairs
            if not receiver.tracks_delivery:
                assert receiver.caught_up(0.0) is None
                return
            for i in range(50):
                sender.publish(b"m%d" % i)
            before = time.monotonic()
            assert _eventually(lambda: len(listener.messages) == 50)
            proven = receiver.caught_up(1.0)
            assert proven is not None and proven >= before

    #: How long the backlog of :meth:`test_a_listener_behind_a_backlog_stays_subscribed` takes
    #: to drain; longer than the transport's health check (interval plus timeout).
    backlog_seconds = 3.0

    def test_a_listener_behind_a_backlog_stays_subscribed(self) -> None:
        """A subscriber busy with a backlog is behind, not cut off: the answer to its health
        check waits behind the messages it has not read yet. It must not go blind (it missed
        nothing), and every message arrives, in order."""
        with self.started(2) as pairs:
            (sender, _), (_, listener) = pairs
            events = list(listener.events)  # as subscribed (a hub may report blind first)
            delay = 0.005  # per message: the sender publishes much faster than this
            record = listener.on_message

            def slow(payload: bytes) -> None:
                time.sleep(delay)
                record(payload)

            listener.on_message = slow  # type: ignore[method-assign]
            sent = [b"%06d:" % i + b"x" * 200 for i in range(int(self.backlog_seconds / delay))]
            for message in sent:  # far more than one read's worth
                sender.publish(message)
            assert _eventually(
                lambda: len(listener.messages) == len(sent), 20 * self.backlog_seconds
            )
            assert listener.events == events, listener.events
            assert listener.messages == sent

    def test_ticks_keep_coming(self) -> None:
        with self.started(1) as pairs:
            _, listener = pairs[0]
            start = listener.ticks
            time.sleep(6 * TICK_INTERVAL)
            assert listener.ticks - start >= 2

    def test_a_foreign_store_gets_no_script_channel(self) -> None:
        transport = self.make_transports(1)[0]
        assert transport.script_channel(MemoryL2()) is None
        assert isinstance(transport.channel, str) and transport.channel

    def test_stop_before_start_and_reset_after_fork_do_no_io(self) -> None:
        transport = self.make_transports(1)[0]
        transport.stop()
        transport.reset_after_fork()
        listener = RecordingListener()
        transport.start(listener)
        try:
            assert listener.connected.wait(10)
        finally:
            transport.stop()


class SerializerContract:
    """The :class:`~hybridinval.Serializer` contract."""

    samples: tuple[Any, ...] = (
        None,
        True,
        0,
        -(2**53),
        1.5,
        "",
        "\u00e9\u6f22\U0001f600",
        [],
        {},
        {"id": 1, "tags": ["a", "b"], "nested": {"x": [1, 2.5, None]}},
    )

    def make_serializer(self) -> Serializer:
        raise NotImplementedError

    def test_plain_data_round_trips(self) -> None:
        serializer = self.make_serializer()
        assert isinstance(serializer.name, str) and serializer.name
        for value in self.samples:
            data = serializer.dumps(value)
            assert isinstance(data, bytes)
            assert serializer.loads(data) == value

    def test_bytes_it_did_not_write_are_corrupt(self) -> None:
        serializer = self.make_serializer()
        good = serializer.dumps({"a": 1})
        for data in (b"", b"\x00\xff garbage", good[:-1] + b"\x00", b"z" + good):
            try:
                serializer.loads(data)
            except CorruptPayloadError:
                continue
            raise AssertionError(f"{data!r} was accepted")

    def test_a_value_it_cannot_encode_is_a_type_or_value_error(self) -> None:
        serializer = self.make_serializer()
        try:
            serializer.dumps(object())
        except (TypeError, ValueError):
            return
        except Exception as exc:  # pragma: no cover - reported
            raise AssertionError(f"dumps raised {type(exc).__name__}") from exc
        # a serializer that can encode anything (pickle) passes by round-tripping instead
