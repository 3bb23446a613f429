"""A generic LRU cache tier with pinning, capacity limits, counters and a load-latency histogram.

Torch-free and value-agnostic: the store keeps decoded adapters in host memory with it, and the
engine's model runner keeps device copies with the same class. Counters and the histogram are
plain data (``TierStats``), so the metrics layer can export them without this module knowing
Prometheus.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Seconds; upper bounds of the histogram's buckets (Prometheus `le`), +Inf implied after them.
LOAD_BUCKETS_S: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@dataclass
class Histogram:
    """Fixed-bucket histogram. ``counts[i]`` counts observations ``<= buckets[i]`` and above the
    previous bound (not cumulative); ``counts[-1]`` is the +Inf bucket."""

    buckets: tuple[float, ...] = LOAD_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        assert list(self.buckets) == sorted(self.buckets), "bucket bounds must ascend"
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        i = 0
        while i < len(self.buckets) and value > self.buckets[i]:
            i += 1
        self.counts[i] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, count of observations <= it) per bucket, ending with (inf, count):
        Prometheus' ``_bucket{le=...}`` series."""
        out, total = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out

    def copy(self) -> Histogram:
        return Histogram(self.buckets, list(self.counts), self.sum, self.count)


@dataclass(frozen=True)
class TierStats:
    """A snapshot of one tier's counters (monotonic since creation) and gauges."""

    name: str
    hits: int
    misses: int
    loads: int  # successful loads through get_or_load
    load_failures: int
    evictions: int  # entries removed to make room or by evict(); not replaced values
    resident_entries: int
    resident_bytes: int
    pinned_entries: int
    load_seconds: Histogram


@dataclass
class _Pending(Generic[V]):
    """One load in flight, shared by every caller waiting for the same key."""

    done: threading.Event = field(default_factory=threading.Event)
    value: V | None = None  # set by the leader, before `done`, unless `error` is
    error: BaseException | None = None


@dataclass
class _Entry(Generic[V]):
    value: V
    size: int
    pins: int = 0
    doomed: bool = False  # evict() asked while pinned: removed at the last unpin


class LRUTier(Generic[K, V]):
    """Least-recently-used cache bounded by bytes and/or entries; pinned entries are never
    evicted (they still count towards the capacity).

    Invariants: ``resident_bytes`` is the sum of the entries' sizes; after any call, either the
    tier is within both capacities or every entry over them is pinned. Thread-safe: one lock
    guards the structure; loaders run outside it, one at a time per key (a second caller of
    ``get_or_load`` for a key being loaded waits for the first and shares its result).
    """

    def __init__(
        self,
        name: str,
        *,
        capacity_bytes: int | None = None,
        capacity_entries: int | None = None,
        size_of: Callable[[V], int] = lambda _value: 0,
        on_evict: Callable[[K, V], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """``size_of(value)`` is the value's size in bytes (used when put() is given none);
        ``on_evict(key, value)`` runs after an entry leaves (not under the lock; e.g. to free a
        device buffer). ``None`` capacities are unbounded."""
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.capacity_entries = capacity_entries
        self._size_of = size_of
        self._on_evict = on_evict
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()  # LRU first, MRU last
        self._loading: dict[K, _Pending[V]] = {}
        self._bytes = 0
        self._hits = self._misses = self._loads = self._load_failures = self._evictions = 0
        self._load_seconds = Histogram()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: K, *, pin: bool = False) -> V | None:
        """The value, made most recent (and pinned once more if ``pin``), or None on a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.doomed:
                self._misses += 1
                return None
            self._hits += 1
            self._entries.move_to_end(key)
            if pin:
                entry.pins += 1
            return entry.value

    def put(self, key: K, value: V, *, size: int | None = None, pin: bool = False) -> bool:
        """Insert or replace ``key`` as most recent, evicting unpinned LRU entries to make room.

        Returns False (and stores nothing) when the value cannot fit: larger than the capacity,
        or the room is held by pinned entries. Replacing keeps the old entry's pins.
        """
        size = self._size_of(value) if size is None else size
        assert size >= 0
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.size
            pins = old.pins if old is not None else 0
            victims = self._make_room(size, 1)
            if victims is None:
                if old is not None:  # put the old entry back where it was (as most recent)
                    self._entries[key] = old
                    self._bytes += old.size
                return False
            self._entries[key] = _Entry(value, size, pins + (1 if pin else 0))
            self._bytes += size
        self._notify(victims)
        return True

    def get_or_load(
        self, key: K, load: Callable[[], V], *, size: int | None = None, pin: bool = False
    ) -> V:
        """``get``, else ``load()`` (timed into the histogram) and ``put``. Concurrent callers
        for one key share a single load: its value, or its exception (then nothing is stored).
        The loaded value is returned even when it does not fit in the tier (it is then neither
        stored nor pinned: check ``key in tier`` before relying on a pin)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and not entry.doomed:
                self._hits += 1
                self._entries.move_to_end(key)
                if pin:
                    entry.pins += 1
                return entry.value
            self._misses += 1
            pending = self._loading.get(key)
            leader = pending is None
            if pending is None:
                pending = self._loading[key] = _Pending()
        if not leader:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            if pin:
                self._pin_if_present(key)  # absent if it did not fit: nothing to pin
            # The leader set the value (error is None); V itself may include None.
            return cast(V, pending.value)
        start = self._clock()
        try:
            value = load()
            with self._lock:
                self._loads += 1
                self._load_seconds.observe(self._clock() - start)
            self.put(key, value, size=size, pin=pin)
            pending.value = value
            return value
        except BaseException as exc:
            pending.error = exc
            with self._lock:
                self._load_failures += 1
            raise
        finally:
            with self._lock:
                del self._loading[key]
            pending.done.set()

    def _pin_if_present(self, key: K) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and not entry.doomed:
                entry.pins += 1

    def pin(self, key: K) -> None:
        """Protect ``key`` from eviction until a matching ``unpin``. KeyError if absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.doomed:
                raise KeyError(key)
            entry.pins += 1

    def unpin(self, key: K) -> None:
        """Undo one ``pin``; an entry whose eviction was asked while pinned leaves now."""
        victims = []
        with self._lock:
            entry = self._entries[key]
            assert entry.pins > 0, f"unpin of unpinned {key!r}"
            entry.pins -= 1
            if entry.pins == 0:
                if entry.doomed:
                    victims.append(self._remove(key))
                else:
                    victims = self._make_room(0, 0) or []  # capacity may have shrunk meanwhile
        self._notify(victims)

    def evict(self, key: K) -> bool:
        """Remove ``key`` now if unpinned (True), else as soon as its last pin is released
        (False; it stops being returned by ``get`` at once). False also when absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            if entry.pins:
                entry.doomed = True
                return False
            victim = self._remove(key)
        self._notify([victim])
        return True

    def clear(self) -> None:
        """Evict every unpinned entry; pinned ones leave at their last unpin."""
        for key in list(self._entries):
            self.evict(key)

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(
                name=self.name,
                hits=self._hits,
                misses=self._misses,
                loads=self._loads,
                load_failures=self._load_failures,
                evictions=self._evictions,
                resident_entries=len(self._entries),
                resident_bytes=self._bytes,
                pinned_entries=sum(1 for e in self._entries.values() if e.pins),
                load_seconds=self._load_seconds.copy(),
            )

    def _make_room(self, size: int, count: int) -> list[tuple[K, V]] | None:
        """Evict unpinned LRU entries until ``size`` more bytes and ``count`` more entries fit;
        None (and nothing evicted) if that is impossible. Caller holds the lock."""
        need_bytes = self._over(self.capacity_bytes, self._bytes + size)
        need_entries = self._over(self.capacity_entries, len(self._entries) + count)
        if need_bytes <= 0 and need_entries <= 0:
            return []
        chosen, freed_bytes, freed_entries = [], 0, 0
        for key, entry in self._entries.items():
            if freed_bytes >= need_bytes and freed_entries >= need_entries:
                break
            if entry.pins == 0:
                chosen.append(key)
                freed_bytes += entry.size
                freed_entries += 1
        if freed_bytes < need_bytes or freed_entries < need_entries:
            return None
        return [self._remove(key) for key in chosen]

    @staticmethod
    def _over(capacity: int | None, total: int) -> int:
        return 0 if capacity is None else total - capacity

    def _remove(self, key: K) -> tuple[K, V]:
        entry = self._entries.pop(key)
        self._bytes -= entry.size
        self._evictions += 1
        return key, entry.value

    def _notify(self, victims: list[tuple[K, V]]) -> None:
        if self._on_evict is not None:
            for key, value in victims:
                self._on_evict(key, value)
