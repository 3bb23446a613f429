"""Two replicas sharing one real redis-server and one blob location (file://)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from store_helpers import prefix_adapter, same_content, wait_for

from adapters_store.store import AdapterStore, open_store
from adapters_store.types import AdapterNotFound
from bench.local_redis import LocalRedis


def raises_not_found(fn: Callable[[], object]) -> bool:
    try:
        fn()
    except AdapterNotFound:
        return True
    return False


@pytest.fixture
def replicas(redis_server: LocalRedis, tmp_path: Path) -> Iterator[tuple[AdapterStore, ...]]:
    shared = f"file://{tmp_path}/shared-blobs"
    stores = tuple(
        open_store(tmp_path / name, redis_url=redis_server.url, blob_url=shared, gc_interval_s=None)
        for name in ("a", "b")
    )
    wait_for(lambda: all(s.registry.watching() for s in stores), timeout=5)
    yield stores
    for store in stores:
        store.close()


def test_replicas_see_each_others_uploads_and_deletions(replicas) -> None:
    a, b = replicas
    adapter = prefix_adapter(seed=1)
    record = a.put("acme", "x", adapter)
    assert b.get("acme", "x") == record
    assert same_content(b.load(record), adapter)  # read from the shared blob location
    assert [r.name for r in b.list("acme")] == ["x"]

    assert a.get("acme", "x") == record  # a now holds x; b deletes it
    b.delete("acme", "x")
    wait_for(lambda: raises_not_found(lambda: a.get("acme", "x")), timeout=1.0)
    assert a.list("acme") == []


def test_a_reupload_on_one_replica_replaces_the_other_replicas_copy_within_a_second(
    replicas,
) -> None:
    a, b = replicas
    old, new = prefix_adapter(seed=1), prefix_adapter(seed=2)
    events: list[tuple[str, str, str]] = []
    b.subscribe(lambda *e: events.append(e))
    a.put("acme", "x", old)
    wait_for(lambda: ("put", "acme", "x") in events, timeout=1.0)
    events.clear()
    held = b.get("acme", "x")  # b resolves and loads v1: name cached, content in its host tier
    assert same_content(b.load(held), old) and old.sha256 in b.host_tier

    v2 = a.put("acme", "x", new)
    elapsed = wait_for(lambda: ("put", "acme", "x") in events, timeout=1.0)
    assert elapsed < 1.0
    assert old.sha256 not in b.host_tier  # the stale copy is gone
    current = b.get("acme", "x")
    assert current == v2
    assert same_content(b.load(current), new)  # the new weights, never the old ones
    assert same_content(b.load(held), old)  # a request that started on v1 finishes on it
    assert events == [("put", "acme", "x")]  # b hears a's change once, and not its own

    b.delete("acme", "x")
    wait_for(lambda: raises_not_found(lambda: a.get("acme", "x")), timeout=1.0)
    assert events == [("put", "acme", "x"), ("delete", "acme", "x")]


def test_collection_on_one_replica_keeps_what_the_other_references(replicas) -> None:
    a, b = replicas
    adapter = prefix_adapter(seed=3)
    record = a.put("acme", "x", adapter)
    b.gc_grace_s = 0.0
    time.sleep(0.01)  # the blob is now older than b's (zero) grace
    assert b.collect() == 0
    assert same_content(b.load(record), adapter)
    a.delete("acme", "x")
    assert b.collect() == 1
    assert {sha for sha, _ in a.blobs.scan()} == set()
