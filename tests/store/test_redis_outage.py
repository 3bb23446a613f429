"""Redis stopped (SIGSTOP) and killed (SIGKILL, restarted from its AOF) under running stores:
held adapters keep serving, registry calls fail fast with a typed error, recovery is
automatic."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from store_helpers import prefix_adapter, same_content, wait_for

from adapters_store.store import AdapterStore, open_store
from adapters_store.types import RegistryUnavailable
from bench.local_redis import LocalRedis


def fails_fast(call: Callable[[], object]) -> float:
    """Seconds ``call`` took to raise RegistryUnavailable (503 with Retry-After)."""
    start = time.monotonic()
    with pytest.raises(RegistryUnavailable) as err:
        call()
    assert (err.value.status, err.value.retry_after) == (503, 2)
    return time.monotonic() - start


def answers(store: AdapterStore) -> bool:
    try:
        store.list("acme")
    except RegistryUnavailable:
        return False
    return True


def open_replica(server: LocalRedis, tmp_path: Path, name: str) -> AdapterStore:
    return open_store(
        tmp_path / name,
        redis_url=server.url,
        blob_url=f"file://{tmp_path}/blobs",
        gc_interval_s=None,
    )


def test_stopped_redis_fails_calls_within_2s_and_keeps_serving_held_adapters(
    redis_server: LocalRedis, tmp_path: Path
) -> None:
    store = open_replica(redis_server, tmp_path, "a")
    try:
        held_adapter, other = prefix_adapter(seed=1), prefix_adapter(seed=2)
        held = store.put("acme", "held", held_adapter)
        store.put("acme", "cold", other)  # registered, never resolved here
        assert same_content(store.load(store.get("acme", "held")), held_adapter)
        wait_for(store.registry.watching, timeout=5)

        redis_server.pause()
        try:
            slowest = max(
                fails_fast(lambda: store.list("acme")),
                fails_fast(lambda: store.get("acme", "never-resolved")),
                fails_fast(lambda: store.put("acme", "new", other)),
            )
            assert slowest < 2.0
            deadline = time.monotonic() + 3  # through the watcher noticing the outage
            while time.monotonic() < deadline:
                start = time.monotonic()
                record = store.get("acme", "held")
                assert record == held and time.monotonic() - start < 2.0
                assert same_content(store.load(record), held_adapter)
                time.sleep(0.1)
            assert not store.registry.watching()
            assert store.ping() is False
        finally:
            redis_server.resume()

        recovery = wait_for(lambda: answers(store), timeout=5)
        assert recovery < 2.5  # one retry interval, plus a call
        wait_for(store.registry.watching, timeout=5)
        assert [r.name for r in store.list("acme")] == ["cold", "held"]
        assert store.put("acme", "new", other).version == 1
        assert store.ping() is True
    finally:
        store.close()


def test_held_adapters_keep_serving_through_the_reconnection(
    redis_server: LocalRedis, tmp_path: Path
) -> None:
    """When the watcher resubscribes it empties the name cache ("reset": announcements may
    have been missed). A call that failed just before Redis came back has opened the breaker
    for a retry interval; a held name looked up after the reset must reach Redis, not be
    refused for the rest of that interval."""
    store = open_replica(redis_server, tmp_path, "a")
    try:
        held = store.put("acme", "held", prefix_adapter(seed=1))
        assert store.get("acme", "held") == held
        wait_for(store.registry.watching, timeout=5)
        redis_server.pause()
        try:
            wait_for(lambda: not store.registry.watching(), timeout=5)
            fails_fast(lambda: store.list("acme"))  # the breaker opens for one interval
        finally:
            redis_server.resume()
        wait_for(store.registry.watching, timeout=5)  # resubscribed: the cache was reset
        assert store.get("acme", "held") == held
        assert store.lookup("acme", "held") == (held, False)  # from Redis, not stale
    finally:
        store.close()


def test_killed_redis_restarts_from_its_aof_and_replicas_reconnect(
    redis_server: LocalRedis, tmp_path: Path
) -> None:
    a = open_replica(redis_server, tmp_path, "a")
    b = open_replica(redis_server, tmp_path, "b")
    try:
        held_adapter, new = prefix_adapter(seed=1), prefix_adapter(seed=2)
        held = a.put("acme", "held", held_adapter)
        assert same_content(a.load(a.get("acme", "held")), held_adapter)
        events: list[tuple[str, str, str]] = []
        a.subscribe(lambda *e: events.append(e))

        redis_server.kill()
        assert fails_fast(lambda: a.list("acme")) < 2.0  # refused: fails at once
        assert fails_fast(lambda: b.put("acme", "x", new)) < 2.0
        assert a.get("acme", "held") == held  # still serving what it holds
        assert same_content(a.load(held), held_adapter)

        redis_server.start()  # same port and directory: the AOF is replayed
        wait_for(lambda: answers(a) and answers(b), timeout=5)
        wait_for(lambda: a.registry.watching() and b.registry.watching(), timeout=5)
        assert a.list("acme") == [held]  # nothing acknowledged was lost
        assert ("reset", "", "") in events  # a may have missed announcements: told so

        events.clear()
        v2 = b.put("acme", "held", new)
        wait_for(lambda: ("put", "acme", "held") in events, timeout=1.0)
        assert a.get("acme", "held") == v2 and v2.version == 2
        assert same_content(a.load(v2), new)
    finally:
        a.close()
        b.close()
