"""One behaviour suite for every L1 store: the contract of hybridinval._l1.L1Store."""

from __future__ import annotations

import pytest

from hybridinval import MemoryL1, NullL1


@pytest.fixture(params=["memory", "null"])
def l1(request: pytest.FixtureRequest) -> MemoryL1 | NullL1:
    return MemoryL1(max_entries=4) if request.param == "memory" else NullL1()


def test_store_evict_clear_are_idempotent(l1: MemoryL1 | NullL1) -> None:
    l1.store("a", 1, 100.0)
    l1.store("a", 1, 100.0)
    assert l1.evict_many(["a", "a", "missing"]) == (1 if isinstance(l1, MemoryL1) else 0)
    assert l1.evict_many(["a"]) == 0
    l1.store("b", 2, 100.0)
    l1.clear()
    assert l1.clear() == 0
    assert l1.entries == {}


def test_entries_dict_is_never_replaced(l1: MemoryL1 | NullL1) -> None:
    # The cache binds l1.entries once for its lock-free hot path.
    entries = l1.entries
    for i in range(10):
        l1.store(f"k{i}", i, 100.0)
    l1.expire(1000.0)
    l1.clear()
    assert l1.entries is entries


def test_expire_removes_only_due_entries(l1: MemoryL1 | NullL1) -> None:
    l1.store("soon", 1, 10.0)
    l1.store("later", 2, 20.0)
    l1.expire(15.0)
    assert "soon" not in l1.entries
    if isinstance(l1, MemoryL1):
        assert l1.entries["later"][0] == 2


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
