"""LRUTier: eviction order, capacities, pinning, counters, histogram, shared loads."""

from __future__ import annotations

import threading
import time

import pytest

from adapters_store.tiers import LOAD_BUCKETS_S, Histogram, LRUTier


def tier(**kwargs) -> tuple[LRUTier[str, bytes], list[str]]:
    evicted: list[str] = []
    t: LRUTier[str, bytes] = LRUTier(
        "t", size_of=len, on_evict=lambda k, _v: evicted.append(k), **kwargs
    )
    return t, evicted


def test_lru_order_by_bytes_and_recency() -> None:
    t, evicted = tier(capacity_bytes=10)
    assert t.put("a", b"xxxx") and t.put("b", b"xxxx")
    assert t.get("a") == b"xxxx"  # a is now most recent; b is the LRU
    assert t.put("c", b"xxxx")
    assert evicted == ["b"]
    assert ("a" in t, "b" in t, "c" in t) == (True, False, True)
    s = t.stats()
    assert (s.hits, s.misses, s.evictions, s.resident_entries, s.resident_bytes) == (1, 0, 1, 2, 8)


def test_capacity_in_entries_and_oversized_values() -> None:
    t, evicted = tier(capacity_entries=2, capacity_bytes=100)
    for key in "abc":
        assert t.put(key, b"x")
    assert evicted == ["a"] and len(t) == 2
    assert t.put("huge", b"x" * 101) is False  # larger than the whole tier: nothing moves
    assert evicted == ["a"] and "huge" not in t and len(t) == 2


def test_replacing_a_key_keeps_one_entry_and_its_pins() -> None:
    t, evicted = tier(capacity_bytes=10)
    t.put("a", b"1234")
    t.pin("a")
    t.put("a", b"123456")
    s = t.stats()
    assert (s.resident_entries, s.resident_bytes, s.pinned_entries, s.evictions) == (1, 6, 1, 0)
    assert evicted == []


def test_pinned_entries_are_never_evicted() -> None:
    t, evicted = tier(capacity_bytes=8)
    t.put("a", b"xxxx", pin=True)
    t.put("b", b"xxxx")
    assert t.put("c", b"xxxx")  # evicts b, the only unpinned entry
    assert evicted == ["b"]
    t.pin("c")
    assert t.put("d", b"xxxx") is False  # all room is pinned
    assert evicted == ["b"] and "d" not in t
    t.unpin("c")
    assert t.put("d", b"xxxx") and evicted == ["b", "c"]
    with pytest.raises(KeyError):
        t.pin("missing")


def test_evict_of_a_pinned_entry_waits_for_the_last_unpin() -> None:
    t, evicted = tier()
    t.put("a", b"x")
    t.pin("a")
    t.pin("a")
    assert t.evict("a") is False
    assert t.get("a") is None  # no longer served to new users
    t.unpin("a")
    assert evicted == [] and "a" in t
    t.unpin("a")
    assert evicted == ["a"] and "a" not in t
    assert t.evict("a") is False


def test_get_with_pin_is_atomic_and_counted() -> None:
    t, _ = tier(capacity_entries=1)
    t.put("a", b"x")
    assert t.get("a", pin=True) == b"x"
    assert t.put("b", b"y") is False
    assert t.get("zz") is None
    s = t.stats()
    assert (s.hits, s.misses, s.pinned_entries) == (1, 1, 1)


def test_get_or_load_times_loads_and_shares_one_load_between_callers() -> None:
    clock = iter([10.0, 10.003, 20.0, 22.0])  # two loads: 3 ms, then 2 s
    t: LRUTier[str, bytes] = LRUTier("t", size_of=len, clock=lambda: next(clock))
    release = threading.Event()
    calls: list[str] = []

    def slow_load() -> bytes:
        calls.append("a")
        release.wait(5)
        return b"value"

    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda: results.append(t.get_or_load("a", slow_load)))
        for _ in range(4)
    ]
    for th in threads:
        th.start()
    time.sleep(0.1)
    release.set()
    for th in threads:
        th.join()
    assert calls == ["a"] and results == [b"value"] * 4
    assert t.get_or_load("a", slow_load) == b"value"  # a hit: no load
    t.get_or_load("b", lambda: b"bb")
    s = t.stats()
    assert (s.hits, s.misses, s.loads, s.load_failures) == (1, 5, 2, 0)
    assert s.load_seconds.count == 2
    assert s.load_seconds.sum == pytest.approx(2.003)
    i_3ms = LOAD_BUCKETS_S.index(0.005)  # 3 ms lies in (2.5 ms, 5 ms]
    i_2s = LOAD_BUCKETS_S.index(2.5)
    expected = [0] * (len(LOAD_BUCKETS_S) + 1)
    expected[i_3ms] = expected[i_2s] = 1
    assert s.load_seconds.counts == expected


def test_a_failed_load_reaches_every_waiter_and_stores_nothing() -> None:
    t, _ = tier()
    started, release = threading.Event(), threading.Event()

    def failing() -> bytes:
        started.set()
        release.wait(5)
        raise OSError("disk gone")

    errors: list[BaseException] = []

    def call() -> None:
        try:
            t.get_or_load("a", failing)
        except OSError as exc:
            errors.append(exc)

    first = threading.Thread(target=call)
    first.start()
    started.wait(5)
    second = threading.Thread(target=call)
    second.start()
    time.sleep(0.05)
    release.set()
    first.join()
    second.join()
    assert [str(e) for e in errors] == ["disk gone", "disk gone"]
    assert "a" not in t
    s = t.stats()
    assert (s.loads, s.load_failures, s.resident_entries) == (0, 1, 0)


def test_histogram_cumulative_matches_prometheus_buckets() -> None:
    h = Histogram(buckets=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.counts == [2, 1, 1]
    assert h.cumulative() == [(0.1, 2), (1.0, 3), (float("inf"), 4)]
    assert (h.count, h.sum) == (4, pytest.approx(3.65))
