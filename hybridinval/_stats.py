"""What ``HybridCache.stats()`` returns, field by field."""

from __future__ import annotations

from typing import TypedDict

__all__ = ["CacheStats"]


class CacheStats(TypedDict):
    """What :meth:`HybridCache.stats` returns. Counters run since the cache started in this
    process (a forked child starts from zero) and are approximate under heavy contention."""

    l1_hits: int | None
    """Reads answered from L1; ``None`` unless built with ``count_hits=True``."""
    l1_misses: int
    """Reads L1 could not answer (each started or joined a fill)."""
    l1_size: int
    """Entries in L1 now."""
    l2_hits: int
    l2_misses: int
    l2_errors: int
    """L2 round trips that failed (the read fell back to the loader, the write was skipped)."""
    l2_corrupt: int
    """L2 payloads the serializer could not read (treated as misses)."""
    l2_cas_rejections: int
    """Loaded values not written to L2 because the key changed (or the fill ran too long)."""
    loads: int
    """Loader calls."""
    single_flight_waits: int
    """Reads that waited for another thread's fill of the same key."""
    fill_guard_rejections: int
    """Loaded values not stored in L1 because an invalidation or a blind period overtook them."""
    invalidations_sent: int
    keys_invalidated: int
    invalidations_received: int
    """Backplane messages applied from other processes."""
    keys_evicted_remote: int
    """L1 entries those messages evicted."""
    echoes_ignored: int
    """This process's own messages, heard back and dropped."""
    messages_malformed: int
    flushes: int
    """Times L1 was emptied (a blind period, a lease flush, ``clear_local()``, a publish
    failure)."""
    blind_periods: int
    """Times the backplane may have missed messages (L1 set aside and bypassed)."""
    publish_failures: int
    """After-commit invalidations that failed and went to the background retry."""
    publish_retries_succeeded: int
    l1_restored: int
    """Entries set aside during a blind period and restored because L2 proved them unchanged."""
    l1_quarantine_dropped: int
    lease_waits: int
    """Hits that found the backplane behind and waited for it."""
    lease_flushes: int
    """Times a reader waited ``l1_lease_wait`` in vain and flushed L1 instead."""
    keys_replayed: int
    """Keys invalidated again after the store's incarnation changed (``failover_replay``)."""
    pending_publishes: int
    """Committed keys whose invalidation awaits the background retry."""
    subscribed: bool
    """Whether the backplane is confirmed and L1 in use."""
    instance_id: str
    """This process's cache instance (in every message it sends)."""
    lag_samples: int
    """Backplane lags kept (the last ``lag_samples`` messages)."""
    lag_p50_us: int | None
    """Median time from a message's send to its arrival here, in microseconds (clocks of
    different machines make this approximate)."""
    lag_p99_us: int | None
    lag_max_us: int | None
