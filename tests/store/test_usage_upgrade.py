"""Registries written before the byte quota counted hidden versions: their usage must come out
right (live count, bytes of every retained version) and never be freed twice.

- SQLite (``PRAGMA user_version`` 0): the usage rows counted live versions only; opening the
  file recomputes them from the versions it retains, once.
- Redis: a hidden version recorded then has a hidden-set member without its size and was never
  added to ``usage:<tenant> hidden``; purging it must leave ``hidden`` alone.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import redis
from store_helpers import prompt_adapter

from adapters_store.store import open_store
from adapters_store.types import TenantUsage
from bench.local_redis import LocalRedis


def test_sqlite_usage_written_before_is_recomputed_once(tmp_path: Path) -> None:
    store = open_store(tmp_path, gc_interval_s=None)
    x = [store.put("acme", "x", prompt_adapter(seed=i)) for i in range(3)]
    y = store.put("acme", "y", prompt_adapter(seed=9))
    store.delete("acme", "y")
    g = store.put("globex", "g", prompt_adapter(seed=10))
    store.close()
    # What the previous version left: usage of live versions only, user_version 0.
    db = sqlite3.connect(tmp_path / "registry.sqlite3", isolation_level=None)
    db.execute("UPDATE usage SET count = 1, bytes = ? WHERE tenant = 'acme'", (x[2].size_bytes,))
    db.execute("PRAGMA user_version = 0")
    db.close()

    store = open_store(tmp_path, gc_interval_s=None)
    try:
        stored = sum(r.size_bytes for r in x) + y.size_bytes
        assert store.tenants() == [
            TenantUsage("acme", 1, stored),
            TenantUsage("globex", 1, g.size_bytes),
        ]
    finally:
        store.close()
    db = sqlite3.connect(tmp_path / "registry.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone() == (1,)
    db.close()


def test_redis_hidden_versions_recorded_before_are_purged_without_freeing_twice(
    redis_server: LocalRedis, tmp_path: Path, store_clock
) -> None:
    store = open_store(
        tmp_path,
        redis_url=redis_server.url,
        gc_interval_s=None,
        gc_grace_s=10,
        clock=store_clock,
    )
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        v1 = store.put("acme", "x", prompt_adapter(seed=1))
        v2 = store.put("acme", "x", prompt_adapter(seed=2))  # v1 hidden, counted
        # Rewrite v1 as the previous version recorded it: a member without its size, and its
        # bytes not in ``hidden`` (they left ``bytes`` when it was hidden).
        hidden_key, usage_key = "prefix-serve:hidden", "prefix-serve:usage:acme"
        ((member, score),) = client.zrange(hidden_key, 0, -1, withscores=True)
        assert json.loads(member) == ["acme", "x", 1, v1.size_bytes]
        client.zrem(hidden_key, member)
        client.zadd(hidden_key, {json.dumps(["acme", "x", 1]): score})
        client.hincrby(usage_key, "hidden", -v1.size_bytes)
        assert store.usage("acme") == TenantUsage("acme", 1, v2.size_bytes)

        store.delete("acme", "x")  # recorded the new way: counted until purged
        assert store.usage("acme") == TenantUsage("acme", 0, v2.size_bytes)
        store_clock.now += 11
        assert store.collect() == 2
        assert store.usage("acme") == TenantUsage("acme", 0, 0)
        assert client.hgetall(usage_key) == {"count": "0", "bytes": "0", "hidden": "0"}
        assert client.zcard(hidden_key) == 0
    finally:
        client.close()
        store.close()
