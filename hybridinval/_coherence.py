"""Coherence: the backplane listener that keeps this process's L1 from serving what it can no
longer trust.

:class:`Coherence` is what a :class:`~hybridinval.transports.Transport` reports to:

* a message evicts the keys it names (or everything) and cancels their in-flight fills; the
  process's own echoes are dropped;
* a **blind** period (the transport may have missed messages) sets L1 aside and bypasses it;
* once **subscribed** again, L1 starts empty on a new epoch, and entries set aside whose L2
  version did not change are restored off the delivery thread (an invalidation always replaces
  the version before its message is published, so an unchanged version proves that nothing was
  missed for that key);
* the **L1 lease**: a hit may rely on L1 only within ``l1_lease`` of a proof that every message
  which reached this process has been applied (:meth:`Coherence.renew_lease`).

It stands on :class:`~hybridinval._local.LocalState` and the L2 and transport seams, and never
calls back into the cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from ._l1 import Entry
from ._l2 import L2Store
from ._local import LocalState
from ._message import MalformedMessage, decode_message
from .errors import BackendUnavailableError
from .transports import Transport

__all__ = ["Coherence"]

log = logging.getLogger("hybridinval")

_monotonic = time.monotonic


class Coherence:
    """The backplane listener of one cache in one process."""

    def __init__(
        self,
        local: LocalState,
        l2: L2Store,
        transport: Transport,
        *,
        instance_id: str,
        lease: Any,
        l1_lease: float | None,
        l1_lease_wait: float,
        lag_samples: int,
        is_closed: Any,
        on_new_incarnation: Any = None,
    ) -> None:
        self.local = local
        self.l2 = l2
        self.transport = transport
        self.instance_id = instance_id
        self.lease = lease
        self.l1_lease = l1_lease
        self.l1_lease_wait = l1_lease_wait
        self.lags_us: deque[int] = deque(maxlen=lag_samples)
        self._is_closed = is_closed
        self._incarnation = ""  # of L2, as read at the last subscription
        self._known_incarnation = ""  # the last one read at all
        self._on_new_incarnation = on_new_incarnation
        self._malformed_log_after = 0.0
        self._lease_log_after = 0.0

    # -- the transport's callbacks (on its thread) ---------------------------------------------

    def on_message(self, payload: bytes) -> None:
        local = self.local
        stats = local.stats
        try:
            message = decode_message(payload)
        except MalformedMessage as exc:
            stats["messages_malformed"] += 1
            # Rate-limited: a misbehaving publisher on our channel must not flood the logs.
            now = _monotonic()
            if now >= self._malformed_log_after:
                self._malformed_log_after = now + 1.0
                log.warning(
                    "ignoring malformed backplane message %.200r: %s (%d so far)",
                    payload,
                    exc,
                    stats["messages_malformed"],
                )
            return
        lag_us = (time.time_ns() - message.sent_at_ns) // 1000
        if message.sender == self.instance_id:
            stats["echoes_ignored"] += 1
            return
        stats["invalidations_received"] += 1
        with local.lock:
            if message.flush:
                local.flush_locked()
            else:
                stats["keys_evicted_remote"] += local.l1.evict_many(message.keys)
                # (Also drops them from what was set aside: a backlog replayed before a resume.)
                local.cancel_locked(message.keys)
        self.lags_us.append(lag_us)

    def on_tick(self) -> None:
        local = self.local
        with local.lock:
            local.l1.expire(_monotonic())

    def on_connected(self) -> None:
        local = self.local
        with local.lock:
            quarantine, since = local.quarantine, local.quarantined_at
            # Anything stored before is from before the gap; new epoch so that fills begun while
            # blind cannot store either. The quarantine stays until a restore has dealt with it:
            # if the connection drops again first (a flapping network), the next one restores.
            local.flush_locked(keep_quarantine=True)
            local.trusted = True
            epoch = local.epoch
            if quarantine:
                local.restoring = set(quarantine)
                local.quarantine_unproven = True
        log.info("backplane %s: subscribed (instance %s)", self.transport.channel, self.instance_id)
        # Off the delivery thread: its Redis round trips must not hold up the messages that
        # arrive meanwhile (those cancel the keys they name through cancel_locked).
        threading.Thread(
            target=self._after_subscribe,
            args=(quarantine, since, epoch),
            name="hybridinval-restore",
            daemon=True,
        ).start()

    def on_resumed(self) -> None:
        """Nothing was missed while blind (the transport replayed it all through on_message,
        which dropped what it named from the set-aside L1): bring L1 back as it was set aside,
        with no L2 round trip. A new epoch all the same: fills begun while blind read L2 at
        moments the replayed messages may postdate."""
        local = self.local
        with local.lock:
            unproven = local.quarantine_unproven
        if unproven:
            # Some of what is set aside dates from an earlier gap whose restore had not proven
            # it yet (the link dropped again first): only L2 may vouch for it.
            self.on_connected()
            return
        now = _monotonic()
        with local.lock:
            quarantine = local.quarantine
            local.flush_locked()
            restored = 0
            for key, (value, expires_at, version) in quarantine.items():
                if expires_at > now:
                    local.l1.store(key, value, expires_at, version)
                    restored += 1
            local.stats["l1_restored"] += restored
            local.trusted = True
        log.info(
            "backplane %s: resubscribed with nothing missed; %d L1 entries kept (instance %s)",
            self.transport.channel,
            restored,
            self.instance_id,
        )

    def on_blind(self, reason: str) -> None:
        local = self.local
        with local.lock:
            was_trusted = local.trusted
            # Set L1 aside rather than drop it: once subscribed again, entries whose L2 version
            # did not change can come back (see _restore) instead of every process refilling
            # its whole L1 from L2 at once after a Redis restart or failover.
            quarantine = {**local.quarantine, **local.l1.snapshot()}
            since = local.quarantined_at if local.quarantine else _monotonic()
            unproven = local.quarantine_unproven
            local.flush_locked()
            local.quarantine, local.quarantined_at = quarantine, since
            local.quarantine_unproven = unproven
            local.stats["blind_periods"] += was_trusted
            # Last: whoever sees `subscribed` turn False (without the lock) finds L1 empty.
            local.trusted = False
        if was_trusted:
            log.warning(
                "backplane %s: blind (%s); L1 set aside and bypassed until resubscribed",
                self.transport.channel,
                reason,
            )

    # -- restore after a gap --------------------------------------------------------------------

    def _after_subscribe(self, quarantine: dict[str, Entry], since: float, epoch: int) -> None:
        local = self.local
        try:
            if local.stats["blind_periods"]:
                # The fault that cut the subscriber may have left pooled L2 sockets silently
                # dead (a partition); each would cost a caller a full socket timeout.
                self.l2.reconnect()
            try:
                incarnation = self.l2.incarnation()
            except BackendUnavailableError:
                incarnation = ""
            previous, self._incarnation = self._incarnation, incarnation
            if incarnation:
                known, self._known_incarnation = self._known_incarnation, incarnation
                if known and known != incarnation and self._on_new_incarnation is not None:
                    self._on_new_incarnation()  # the store may have lost our last writes
            if not quarantine:
                return
            if incarnation and incarnation == previous:
                self._restore(quarantine, since, epoch)
            else:  # Redis restarted, failed over or was flushed: its versions prove nothing
                local.stats["l1_quarantine_dropped"] += len(quarantine)
        except Exception:
            if self._is_closed():  # close() pulled the connections from under us
                log.debug("L1 restore abandoned: the cache was closed", exc_info=True)
            else:
                log.exception("restoring L1 after resubscribing failed; L1 refills from L2")
        finally:
            with local.lock:
                if local.epoch == epoch:  # done with the quarantine: restored or proven stale
                    local.restoring = None
                    local.quarantine = {}
                    local.quarantine_unproven = False

    def _restore(self, quarantine: dict[str, Entry], since: float, epoch: int) -> None:
        """Bring back entries set aside while blind whose L2 version is unchanged.

        An invalidation replaces a key's version token in L2 before its message is published,
        so a token unchanged since the entry was filled proves no invalidation happened while
        we could not hear. An invalidation after the version read below is heard (we are
        subscribed): its message, or this process's own invalidate(), removes the key from
        ``restoring`` before the store, or evicts it after.
        """
        local = self.local
        if _monotonic() - since > self.l2.version_ttl / 2:
            # A version key may have expired and been recreated meanwhile: prove nothing.
            local.stats["l1_quarantine_dropped"] += len(quarantine)
            return
        now = _monotonic()
        candidates = {k: e for k, e in quarantine.items() if e[2] is not None and e[1] > now}
        keys = list(candidates)
        try:
            versions = self.l2.versions(keys) if keys else []
        except BackendUnavailableError as exc:
            log.debug("L1 restore skipped: %s", exc)
            return
        restored = 0
        with local.lock:
            still = local.restoring
            if epoch != local.epoch or not local.trusted or still is None:
                return
            for key, version in zip(keys, versions, strict=True):
                value, expires_at, was = candidates[key]
                if version == was and key in still and local.l1.lookup(key) is None:
                    local.l1.store(key, value, expires_at, version)
                    restored += 1
            local.stats["l1_restored"] += restored
        log.info(
            "backplane %s: %d of %d L1 entries unchanged in L2, kept",
            self.transport.channel,
            restored,
            len(quarantine),
        )

    # -- the L1 lease (called by reader threads) -------------------------------------------------

    def renew_lease(self) -> None:
        """Prove that every message which reached this process has been applied, then let L1
        answer without a check until ``l1_lease`` after the proof.

        A message that arrived before the proof was applied before any read that relies on the
        lease; one that arrives after it is at most ``l1_lease`` old when the lease runs out.
        A subscriber that stays behind for ``l1_lease_wait`` (starved of CPU, or stuck in a
        burst) makes this reader flush L1 instead: L2 is updated before every message is
        published, so what is filled from it afterwards is at least as new as every message
        still queued.
        """
        caught_up = self.transport.caught_up
        assert self.l1_lease is not None
        proven = caught_up(0.0)
        if proven is None:
            self.local.stats["lease_waits"] += 1
            proven = caught_up(self.l1_lease_wait)
            if proven is None:
                proven = self.flush_for_lease()
        self.lease.until = proven + self.l1_lease

    def try_renew_lease(self) -> bool:
        """:meth:`renew_lease` without waiting: renew if the proof holds right now. For readers
        that must not block (an event loop), which wait by polling this instead."""
        assert self.l1_lease is not None
        proven = self.transport.caught_up(0.0)
        if proven is None:
            return False
        self.lease.until = proven + self.l1_lease
        return True

    def flush_for_lease(self) -> float:
        """The subscriber stayed behind for ``l1_lease_wait``: flush L1 (what is filled from L2
        afterwards is at least as new as every message still queued), renew the lease from now
        and return now."""
        assert self.l1_lease is not None
        local = self.local
        proven = _monotonic()
        with local.lock:
            local.stats["lease_flushes"] += 1
            local.flush_locked()
        if proven >= self._lease_log_after:
            self._lease_log_after = proven + 1.0
            log.warning(
                "backplane %s: subscriber still behind after %.0f ms; L1 flushed (%d times so far)",
                self.transport.channel,
                self.l1_lease_wait * 1000,
                local.stats["lease_flushes"],
            )
        self.lease.until = proven + self.l1_lease
        return proven
