"""Separate writer processes: SIGKILL between blob and metadata, and concurrent uploads of one
name from several processes, on both registries, blobs in the data dir. Workers are forked (no
second torch import)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
from store_helpers import StoreFactory, prefix_adapter, prompt_adapter

import adapters_store.blobs
from adapters_store.formats import CanonicalAdapter
from adapters_store.store import open_store
from adapters_store.types import AdapterNotFound

FORK = multiprocessing.get_context("fork")


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    """Blobs in the data dir only: these tests look at its files (test_s3_crash.py is the S3
    store's counterpart)."""
    return request.param


def _redis_url(request: pytest.FixtureRequest, backend: str) -> str | None:
    return request.getfixturevalue("redis_server").url if backend == "redis" else None


def _stalled_writer(
    data_dir: Path, redis_url: str | None, adapter: CanonicalAdapter, stage: str, flag: Path
) -> None:
    """Child: upload, but stop for good at ``stage`` (and say so through ``flag``)."""
    store = open_store(data_dir, redis_url=redis_url, gc_interval_s=None)

    def stall(*_args, **_kwargs):
        flag.write_text(stage)
        time.sleep(60)

    if stage == "after_blob":  # blob renamed into place and fsynced; metadata not yet written
        store.registry.commit = stall
    else:  # temp file written and fsynced, not yet renamed
        adapters_store.blobs.os.replace = stall
    store.put("acme", "x", adapter)


@pytest.mark.parametrize("stage", ["after_blob", "mid_blob"])
def test_sigkill_between_blob_and_metadata_leaves_no_adapter_and_the_orphan_goes(
    make_store: StoreFactory,
    backend: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    stage: str,
) -> None:
    data_dir, flag = tmp_path / "data", tmp_path / "paused"
    kept = prefix_adapter(seed=1)
    survivor = make_store(data_dir)
    survivor.put("acme", "kept", kept)
    survivor.close()

    adapter = prefix_adapter(seed=2)
    writer = FORK.Process(
        target=_stalled_writer,
        args=(data_dir, _redis_url(request, backend), adapter, stage, flag),
    )
    writer.start()
    deadline = time.monotonic() + 30
    while not flag.exists():
        assert writer.is_alive() and time.monotonic() < deadline, "writer never reached the pause"
        time.sleep(0.01)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    assert writer.exitcode == -signal.SIGKILL

    store = make_store(data_dir)  # start-up cleanup runs, but the orphan is younger than grace
    blobs = store.blobs
    leftovers = [blobs.path(adapter.sha256)] if stage == "after_blob" else list(blobs.tmp.iterdir())
    assert len(leftovers) == 1 and all(p.exists() for p in leftovers)
    with pytest.raises(AdapterNotFound):
        store.get("acme", "x")
    assert [r.name for r in store.list("acme")] == ["kept"]
    assert store.versions("acme", "x") == []
    store.close()

    old = time.time() - store.gc_grace_s - 1  # as if restarted after the grace period
    for path in leftovers:
        os.utime(path, (old, old))
    store = make_store(data_dir)
    assert not any(p.exists() for p in leftovers)
    assert {sha for sha, _ in store.blobs.scan()} == {kept.sha256}
    assert list(store.blobs.tmp.iterdir()) == []
    assert store.get("acme", "kept").sha256 == kept.sha256
    record = store.put("acme", "x", adapter)  # the name is usable; no version was taken
    assert record.version == 1


def _uploader(
    data_dir: Path,
    redis_url: str | None,
    adapters: dict[int, CanonicalAdapter],
    seeds: list[int],
    start: multiprocessing.synchronize.Barrier,
    results: multiprocessing.Queue,
) -> None:
    store = open_store(data_dir, redis_url=redis_url, gc_interval_s=None)
    start.wait(30)
    for seed in seeds:
        results.put((store.put("acme", "x", adapters[seed]).version, seed))
    store.close()


def test_concurrent_uploads_from_processes_get_consecutive_versions(
    make_store: StoreFactory, backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    data_dir, workers, each = tmp_path / "data", 4, 6
    adapters = {seed: prompt_adapter(seed) for seed in range(workers * each)}
    start, results = FORK.Barrier(workers), FORK.Queue()
    procs = [
        FORK.Process(
            target=_uploader,
            args=(
                data_dir,
                _redis_url(request, backend),
                adapters,
                list(range(w, workers * each, workers)),
                start,
                results,
            ),
        )
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=60) for _ in range(workers * each))  # version -> seed
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sorted(got) == list(range(1, workers * each + 1))
    store = make_store(data_dir)
    stored = {r.version: r.sha256 for r in store.versions("acme", "x")}
    assert stored == {version: adapters[seed].sha256 for version, seed in got.items()}
    live = store.get("acme", "x")
    assert (live.version, live.sha256) == (workers * each, adapters[got[workers * each]].sha256)
    assert {sha for sha, _ in store.blobs.scan()} == {a.sha256 for a in adapters.values()}
