"""MemoryL1: bounded CLOCK eviction, expiry, and the map the hit path reads."""

from __future__ import annotations

import pytest

from hybridinval import MemoryL1

# The behaviour every L1 store owes the cache is checked by hybridinval.testing.L1StoreContract
# (tests/core/test_contracts.py, for MemoryL1 and NullL1); what follows is MemoryL1's own.


def test_memory_l1_entries_dict_is_never_replaced() -> None:
    # The cache's hit path binds MemoryL1.entries once and reads it without a lock.
    l1 = MemoryL1(max_entries=4)
    entries = l1.entries
    for i in range(10):
        l1.store(f"k{i}", i, 100.0)
    l1.expire(1000.0)
    l1.clear()
    assert l1.entries is entries


def test_memory_l1_replaced_entry_keeps_its_new_deadline() -> None:
    l1 = MemoryL1()
    l1.store("k", "old", 10.0)
    l1.store("k", "new", 30.0)
    assert l1.expire(20.0) == 0  # the stale heap item for "old" must not remove "new"
    assert l1.entries["k"][0] == "new"


def test_memory_l1_is_bounded_and_gives_hit_entries_a_second_chance() -> None:
    l1 = MemoryL1(max_entries=3)
    for key in "abc":
        l1.store(key, key, 100.0)
    l1.entries["a"][2] = 1  # a reader hit "a"
    l1.store("d", "d", 100.0)
    assert len(l1.entries) == 3
    assert "a" in l1.entries and "b" not in l1.entries
    assert l1.evictions == 1


def test_memory_l1_second_chance_is_one_pass_only() -> None:
    l1 = MemoryL1(max_entries=2)
    l1.store("a", "a", 100.0)
    l1.store("b", "b", 100.0)
    l1.entries["a"][2] = 1
    l1.entries["b"][2] = 1
    l1.store("c", "c", 100.0)  # both referenced: the hand clears both bits, then evicts "a"
    assert set(l1.entries) == {"b", "c"} and l1.entries["b"][2] == 0


def test_memory_l1_deadline_heap_stays_bounded_under_rewrites() -> None:
    l1 = MemoryL1(max_entries=10)
    for i in range(10_000):
        l1.store(f"k{i % 10}", i, 1000.0 + i)
    assert len(l1._deadlines) <= 2 * len(l1.entries) + 1024


def test_memory_l1_rejects_nonsense_bound() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        MemoryL1(0)
