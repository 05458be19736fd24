"""Forced interleavings of the delivery-progress check (the L1 lease's proof) and of group
sending, each the moment a review found: they fail on the code before the fix."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from support.waiting import wait_until

from hybridinval._group import GroupSend
from hybridinval.transports._progress import DeliveryProgress
from hybridinval.transports._resp import RespReader


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_a_subscriber_that_wakes_between_the_checks_is_not_settled(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message is in the socket; the subscriber has woken but not yet gone busy. It goes
    busy and reads the message just as the reader looks: the reader must not conclude that
    everything was applied."""
    ours, theirs = pair
    progress = DeliveryProgress()
    progress.subscribed(ours)
    progress.idle()
    theirs.sendall(b"message")
    real_select = select.select

    def subscriber_reads_now(*args: Any) -> Any:
        progress.busy = True  # the subscriber: busy, then it takes the bytes
        ours.recv(100)
        return real_select(*args)

    monkeypatch.setattr(select, "select", subscriber_reads_now)  # what _progress calls
    assert not progress.settled()  # the message is read, not applied
    monkeypatch.setattr(select, "select", real_select)
    progress.idle()  # applied
    assert progress.settled()


def test_half_a_reply_is_not_idle() -> None:
    reader = RespReader(None)
    reader._buf += b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhel"
    assert reader.next() is not None and reader.partial  # INCOMPLETE, bytes held
    reader._buf += b"lo\r\n"
    assert reader.next() == [b"message", b"ch", b"hello"] and not reader.partial


class InterruptibleCondition:
    """A threading.Condition whose wait() raises once in the thread named ``victim``."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.victim: str | None = None

    def __enter__(self) -> Any:
        return self._cond.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self._cond.__exit__(*exc)

    def notify_all(self) -> None:
        self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        if threading.current_thread().name == self.victim:
            self.victim = None
            raise KeyboardInterrupt
        return self._cond.wait(timeout)


def test_a_sender_interrupted_while_queued_leaves_no_one_waiting_for_it() -> None:
    entered, release = threading.Event(), threading.Event()
    sent: list[list[str]] = []

    def send(keys: list[str]) -> None:
        sent.append(keys)
        if keys == ["first"]:
            entered.set()
            release.wait(10)

    group = GroupSend(send)
    cond = InterruptibleCondition()
    group._cond = cond  # type: ignore[assignment]
    outcome: dict[str, Any] = {}

    def run(name: str, keys: list[str]) -> threading.Thread:
        def body() -> None:
            try:
                group(keys)
                outcome[name] = "ok"
            except BaseException as exc:
                outcome[name] = exc

        thread = threading.Thread(target=body, name=name)
        thread.start()
        return thread

    first = run("first", ["first"])
    assert entered.wait(10)
    cond.victim = "interrupted"
    interrupted = run("interrupted", ["lost"])
    interrupted.join(10)
    assert isinstance(outcome["interrupted"], KeyboardInterrupt)
    release.set()
    first.join(10)
    later = run("later", ["later"])
    later.join(10)
    assert not later.is_alive() and outcome["later"] == "ok"
    assert sent == [["first"], ["later"]]
    wait_until(lambda: not group._busy and group._queue == [], what="idle")
