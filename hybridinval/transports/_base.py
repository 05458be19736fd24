"""The backplane seam: how a cache hears which L1 entries other processes invalidated.

A transport carries the opaque bytes of :mod:`hybridinval._message` from every publisher to every
subscribed cache of the namespace, and tells its listener, loudly, whenever it may have missed
one. Everything the cache relies on is stated here; :mod:`hybridinval.testing` has the behaviour
suite every transport must pass (``TransportContract``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .._l2 import L2Store

__all__ = ["TICK_INTERVAL", "BackplaneListener", "Transport"]

TICK_INTERVAL = 0.1
"""The longest a transport may go without calling :meth:`BackplaneListener.on_tick` while it
runs (L1 expiry rides that tick)."""


class BackplaneListener(Protocol):
    """What a transport reports to its cache, from the transport's own thread.

    A listener never raises into the transport; a transport must survive one that does (log,
    and carry on)."""

    def on_message(self, payload: bytes) -> None:
        """A message, as published (possibly malformed: the listener validates it)."""
        ...

    def on_connected(self) -> None:
        """Subscribed and confirmed: every message published from now on will be delivered."""
        ...

    def on_blind(self, reason: str) -> None:
        """Messages may have been missed (a lost connection, a missed health check, a queue that
        expired). Called before any attempt to reconnect, and before any later delivery."""
        ...

    def on_resumed(self) -> None:
        """Subscribed again after a blind period, and every message published during it has
        been delivered (and handed to :meth:`on_message`) before this call: nothing was missed.
        For transports that keep a subscriber's messages while it is away (a broker queue);
        the others report :meth:`on_connected`, which assumes a gap."""
        ...

    def on_tick(self) -> None:
        """Housekeeping; called at least every :data:`TICK_INTERVAL` while the transport runs."""
        ...


class Transport(Protocol):
    """The backplane seam.

    Ordering: the cache calls :meth:`publish` only after the store's writes for the same keys
    have succeeded, so a process that hears a message reads the new state. A transport whose
    messages can be published by the L2 store's own write script (the same Redis server) says
    so through :meth:`script_channel`; the cache then never calls :meth:`publish` for them.
    """

    channel: str
    """A name for the logs (the Pub/Sub channel, the exchange, ...)."""

    tracks_delivery: bool
    """Whether :meth:`caught_up` can prove delivery progress. If not, L1 runs without a lease
    (staleness is then bounded by delivery lag alone) and the cache logs so."""

    def script_channel(self, l2: L2Store) -> str | None:
        """The channel on which ``l2``'s write scripts may publish this transport's messages in
        the same round trip as the writes, or ``None`` if messages must go through
        :meth:`publish`. Only a transport whose subscribers listen on the very server ``l2``
        writes to may return a channel."""
        ...

    def publish(self, message: bytes) -> None:
        """Send ``message`` to every subscriber of the namespace, this process included (the
        cache drops its own echoes). Raises ``BackendUnavailableError``."""
        ...

    def start(self, listener: BackplaneListener) -> None:
        """Start delivering to ``listener`` in the background. Idempotent; never blocks on the
        network (a cache may start while the server is down)."""
        ...

    def stop(self) -> None:
        """Stop delivering and release connections. Idempotent; may be called from any thread."""
        ...

    def reset_after_fork(self) -> None:
        """Forget the parent's thread and sockets without network I/O (this is a new child)."""
        ...

    def caught_up(self, timeout: float) -> float | None:
        """Wait up to ``timeout`` seconds until every message that has reached this process has
        been handed to the listener. Returns a ``time.monotonic()`` reading taken before a check
        that proved it (any message that arrived before that moment has been applied), or
        ``None`` on timeout. While not subscribed there is nothing to wait for (the listener was
        told it is blind): return at once. Called from reader threads; must never block the
        delivery thread. A transport with ``tracks_delivery = False`` returns ``None``."""
        ...
