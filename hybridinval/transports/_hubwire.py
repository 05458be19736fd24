"""What a host hub and its processes say to each other over the hub's Unix socket.

Frames, hub to process only: one type byte, a 4-byte big-endian length, the payload.

* ``M``: a backplane message, unchanged.
* ``C``: the hub is subscribed; delivered from now on is everything published. Carries, as
  ``SCM_RIGHTS`` ancillary data, the hub's subscribed sockets followed by its progress page
  (see :class:`SharedProgress`); the payload (:data:`CONNECTED_INFO`) is the number of
  sockets and this process's byte in the page.
* ``B``: the hub is blind (payload: the reason); so is every process behind it.

A process that connects gets ``C`` or ``B`` first, under the same lock as every later frame.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
from typing import Any

from ._progress import DeliveryProgress

__all__ = [
    "BLIND",
    "CONNECTED",
    "CONNECTED_INFO",
    "HEADER",
    "MESSAGE",
    "HubProgress",
    "SharedProgress",
    "frame",
]

HEADER = struct.Struct(">cI")
CONNECTED_INFO = struct.Struct(">HH")
MESSAGE, CONNECTED, BLIND = b"M", b"C", b"B"
MAX_FRAME = 64 * 1024 * 1024


def frame(kind: bytes, payload: bytes) -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


class SharedProgress(DeliveryProgress):
    """The hub's delivery progress, with :attr:`busy` mirrored in byte 0 of a page its
    processes map; byte ``n`` is 1 while the hub holds bytes for process ``n`` that its socket
    did not take yet (see :meth:`pending`).

    A process proves it is caught up upstream first: the hub's subscribed sockets hold nothing,
    the hub is not busy and holds nothing for it (so everything that reached the hub is in this
    process's socket), and its own subscriber is caught up on that socket. See
    :class:`HubProgress`.
    """

    SLOTS = mmap.PAGESIZE - 1  # processes one hub serves

    def __init__(self) -> None:
        self.fd = os.memfd_create("hybridinval-hub", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, mmap.PAGESIZE)
        self.page = mmap.mmap(self.fd, mmap.PAGESIZE)
        super().__init__()

    @property
    def busy(self) -> bool:
        return self.page[0] == 1

    @busy.setter
    def busy(self, value: bool) -> None:
        self.page[0] = 1 if value else 0

    def pending(self, slot: int, value: bool) -> None:
        self.page[slot] = 1 if value else 0

    def close(self) -> None:
        self.page.close()
        os.close(self.fd)


class HubProgress(DeliveryProgress):
    """A process's progress behind a hub: its own socket, then the hub's (see above)."""

    def __init__(self) -> None:
        super().__init__()
        self.hub_socks: tuple[int, ...] = ()
        self.hub_page: Any = None
        self.slot = 0

    def follow(self, hub_socks: tuple[int, ...], page: Any, slot: int) -> None:
        """The hub's subscribed sockets, progress page and this process's byte in it (before
        :meth:`subscribed`)."""
        self.hub_socks, self.hub_page, self.slot = hub_socks, page, slot

    def settled(self) -> bool:
        """Upstream to downstream, each stage's sockets before its busy flag (see
        :mod:`._progress`): the hub's Redis sockets, the hub's busy byte, the bytes it holds
        for this process, then this process's own socket and busy flag."""
        if self.socks is None:
            return True  # not subscribed: the listener is blind and keeps no L1
        page, hub_socks = self.hub_page, self.hub_socks
        if page is None:
            return False
        try:
            readable, _, _ = select.select(hub_socks, (), (), 0)
        except (OSError, ValueError):  # closed under us: about to go blind
            return False
        if readable or page[0] == 1 or page[self.slot] == 1:
            return False
        return super().settled()
