"""The S3 blob store beyond the contract suite, against real moto_server processes: URLs and
start-up errors, multipart uploads, the read-through cache, two replicas on one bucket, and an
outage (the server stopped with SIGSTOP: it accepts connections and answers nothing)."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save
from store_helpers import SHAPE, prefix_adapter, same_content, wait_for

from adapters_store.blob_cache import BlobCache
from adapters_store.blobs import LocalBlobStore, open_blobs, parse_s3_url
from adapters_store.formats import AdapterLimits, CanonicalAdapter, parse_adapter
from adapters_store.registry import SQLiteRegistry
from adapters_store.s3_blobs import S3BlobStore, make_client
from adapters_store.store import AdapterStore, open_store
from adapters_store.types import (
    AdapterNotFound,
    BlobError,
    Quota,
    StorageUnavailable,
    TenantQuotas,
)
from bench.local_redis import LocalRedis
from bench.local_s3 import LocalS3
from server.api.errors import to_api_error
from server.cli import main

MiB = 1 << 20
FORK = multiprocessing.get_context("fork")
_private_buckets = itertools.count()


def big_prompt_adapter(seed: int, nbytes: int) -> CanonicalAdapter:
    """A prompt-tuning adapter whose blob is a little over ``nbytes``."""
    rows = nbytes // (SHAPE.hidden_size * 4) + 1
    weights = torch.randn(rows, SHAPE.hidden_size, generator=torch.Generator().manual_seed(seed))
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": rows}
    config["token_dim"] = SHAPE.hidden_size
    limits = AdapterLimits(max_virtual_tokens=rows)
    return parse_adapter(
        json.dumps(config).encode(), st_save({"prompt_embeddings": weights}), SHAPE, limits
    )


BIG_QUOTA = TenantQuotas(Quota(max_virtual_tokens=1 << 20))


def s3_store(
    data_dir: Path,
    bucket: str,
    *,
    timeout_s: float = 5.0,
    cache_bytes: int = 64 * MiB,
    clock=time.time,
    **blob_options,
) -> AdapterStore:
    """A store on SQLite with blobs in ``bucket`` (the endpoint from the environment), with
    the client's timeouts set to ``timeout_s`` and a single attempt per request."""
    client = make_client(connect_timeout_s=timeout_s, read_timeout_s=timeout_s, max_attempts=1)
    cache = BlobCache(data_dir / "blob-cache", cache_bytes)
    blobs = S3BlobStore(bucket, "adapters", cache, client=client, **blob_options)
    registry = SQLiteRegistry(data_dir / "registry.sqlite3")
    return AdapterStore(registry, blobs, quotas=BIG_QUOTA, gc_interval_s=None, clock=clock)


def bucket_of(url: str) -> str:
    return parse_s3_url(url)[0]


def gets(store: AdapterStore) -> list[str]:
    """Keys of the GetObject requests ``store``'s client sends from now on."""
    seen: list[str] = []
    assert isinstance(store.blobs, S3BlobStore)
    store.blobs.client.meta.events.register(
        "before-call.s3.GetObject", lambda params, **_: seen.append(params["url_path"])
    )
    return seen


@pytest.fixture(scope="module")
def outage_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3]:
    """A moto_server for the tests that pause or kill it (never the session's)."""
    server = LocalS3(tmp_path_factory.mktemp("outage-s3"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_s3(outage_server: LocalS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalS3]:
    """``outage_server``, running (started again after a test that killed it), with its AWS
    environment set."""
    if outage_server.proc is None:
        outage_server.start()
    for name, value in outage_server.env.items():
        monkeypatch.setenv(name, value)
    yield outage_server
    if outage_server.proc is not None:
        outage_server.resume()


@pytest.fixture
def bucket(private_s3: LocalS3) -> str:
    """A new, empty bucket on ``private_s3``."""
    name = f"private-{next(_private_buckets)}"
    private_s3.create_bucket(name)
    return name


# URLs and start-up ---------------------------------------------------------------------------
def test_s3_urls_are_parsed_and_bad_ones_refused(tmp_path: Path, s3_url: str) -> None:
    assert parse_s3_url("s3://my-bucket/team/adapters/") == ("my-bucket", "team/adapters", 4 << 30)
    assert parse_s3_url("s3://my.bucket?cache_bytes=0") == ("my.bucket", "", 0)
    for url, reason in [
        ("s3://B/x", "bucket name of 3-63"),
        ("s3://ab/x", "bucket name of 3-63"),
        ("s3://bucket/x?cache=1", "unknown option 'cache'"),
        ("s3://bucket/x?cache_bytes=1GiB", "whole number of bytes"),
        ("s3://bucket/a/../b", "empty, . or .. segment"),
    ]:
        with pytest.raises(ValueError, match=reason):
            open_blobs(tmp_path, url)
    blobs = open_blobs(tmp_path, s3_url + "?cache_bytes=1000")
    assert isinstance(blobs, S3BlobStore)
    assert (blobs.bucket, blobs.prefix, blobs.url) == (
        bucket_of(s3_url),
        "adapters/",
        s3_url,
    )
    assert blobs.cache is not None
    assert (blobs.cache.root, blobs.cache.capacity_bytes) == (tmp_path / "blob-cache", 1000)


def test_without_boto3_s3_names_the_extra_and_file_stores_still_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # as where the s3 extra is not installed
    with pytest.raises(ValueError, match=r"install the s3 extra \(pip install 'prefix-serve\[s3"):
        open_blobs(tmp_path, "s3://bucket/x")
    assert main(["serve", "--data-dir", str(tmp_path), "--blob-url", "s3://bucket/x"]) == 2
    assert capsys.readouterr().err == (
        "prefix-serve serve: --blob-url s3://bucket/x: boto3 is not installed; install the s3 "
        "extra (pip install 'prefix-serve[s3]')\n"
    )
    store = open_store(tmp_path, gc_interval_s=None)  # no s3: boto3 is never needed
    try:
        assert isinstance(store.blobs, LocalBlobStore)
        assert store.put("acme", "x", prefix_adapter(seed=1)).version == 1
    finally:
        store.close()


def serve_error(capsys: pytest.CaptureFixture[str], tmp_path: Path, url: str) -> str:
    """What ``prefix-serve serve --blob-url URL`` says before exiting 2 (nothing is loaded)."""
    assert main(["serve", "--data-dir", str(tmp_path), "--blob-url", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"prefix-serve serve: --blob-url {url}")
    return err


def test_start_up_fails_fast_on_a_missing_bucket_refused_credentials_or_no_endpoint(
    tmp_path: Path,
    s3_server: LocalS3,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    err = serve_error(capsys, tmp_path, "s3://no-such-bucket/x")
    assert err.endswith(
        f"(endpoint {s3_server.endpoint}): S3 bucket 'no-such-bucket' does not exist at this "
        "endpoint\n"
    )

    strict = LocalS3(tmp_path / "strict", check_credentials=True)  # knows no access key
    strict.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", strict.endpoint)
        err = serve_error(capsys, tmp_path, "s3://bucket/x")
        assert "S3 refused the credentials or access to bucket 'bucket' (InvalidAccessKeyId" in err
        assert err.endswith("check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the policy\n")
    finally:
        strict.stop()

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", strict.endpoint)  # stopped: connection refused
    start = time.monotonic()
    err = serve_error(capsys, tmp_path, "s3://bucket/x")
    assert "adapter storage (S3 bucket 'bucket') is unreachable" in err
    assert time.monotonic() - start < 10
    assert not (tmp_path / "blob-cache").exists() and not (tmp_path / "blobs").exists()


# Uploads -------------------------------------------------------------------------------------
def test_a_large_blob_goes_up_in_parts_and_reads_back(tmp_path: Path, s3_url: str) -> None:
    store = s3_store(tmp_path, bucket_of(s3_url), multipart_threshold=5 * MiB, part_bytes=5 * MiB)
    try:
        adapter = big_prompt_adapter(seed=1, nbytes=11 * MiB)
        record = store.put("acme", "big", adapter)
        blobs = store.blobs
        assert isinstance(blobs, S3BlobStore)
        head = blobs.client.head_object(Bucket=blobs.bucket, Key=blobs.key(adapter.sha256))
        assert head["ETag"].endswith('-3"')  # three parts: 5 + 5 + the rest
        assert head["ContentLength"] == record.size_bytes
        assert blobs.client.list_multipart_uploads(Bucket=blobs.bucket).get("Uploads", []) == []
        store.host_tier.evict(adapter.sha256)
        assert blobs.cache is not None
        blobs.cache.evict(adapter.sha256)
        assert same_content(store.load(record), adapter)  # read back from the bucket
    finally:
        store.close()


def test_an_upload_cut_by_an_outage_is_never_visible_and_a_retry_succeeds(
    tmp_path: Path, private_s3: LocalS3, bucket: str, store_clock
) -> None:
    """The server stops answering after the first part: the put fails with 503 within its
    timeout, no version exists, the half upload never becomes an object; once the server is
    back, collection aborts what is left and the same upload succeeds."""
    store = s3_store(
        tmp_path,
        bucket,
        timeout_s=1.0,
        clock=store_clock,
        multipart_threshold=5 * MiB,
        part_bytes=5 * MiB,
    )
    try:
        blobs = store.blobs
        assert isinstance(blobs, S3BlobStore)
        adapter = big_prompt_adapter(seed=2, nbytes=11 * MiB)
        blobs.client.meta.events.register(
            "after-call.s3.UploadPart", lambda **_: private_s3.pause(), unique_id="outage"
        )
        start = time.monotonic()
        with pytest.raises(StorageUnavailable, match="is unreachable") as err:
            store.put("acme", "x", adapter)
        assert (err.value.status, err.value.retry_after) == (503, 5)
        # Part 2 (100-continue wait, send, answer) and the abort: a few 1 s timeouts, not
        # botocore's default of 60 s per try.
        assert time.monotonic() - start < 10
        blobs.client.meta.events.unregister("after-call.s3.UploadPart", unique_id="outage")
        assert store.versions("acme", "x") == []
        private_s3.resume()

        assert not blobs.exists(adapter.sha256)
        assert list(blobs.scan()) == []
        store_clock.now += store.gc_grace_s + 1
        store.collect()  # aborts an upload the failed abort left (if the server kept one)
        listing = blobs.client.list_multipart_uploads(Bucket=bucket)
        assert listing.get("Uploads", []) == []
        store_clock.now = time.time()
        assert store.put("acme", "x", adapter).version == 1
        store.host_tier.evict(adapter.sha256)
        assert same_content(store.load(store.get("acme", "x")), adapter)
    finally:
        store.close()


def test_an_outage_fails_uploads_and_cold_loads_with_503_while_held_adapters_serve(
    tmp_path: Path, private_s3: LocalS3, bucket: str
) -> None:
    store = s3_store(tmp_path, bucket, timeout_s=0.5, cache_bytes=0)
    try:
        held_adapter, cold_adapter = prefix_adapter(seed=1), prefix_adapter(seed=2)
        held = store.put("acme", "held", held_adapter)
        cold = store.put("acme", "cold", cold_adapter)
        store.host_tier.evict(cold_adapter.sha256)  # registered, not in memory
        assert same_content(store.load(held), held_adapter)

        private_s3.pause()
        try:
            start = time.monotonic()
            with pytest.raises(StorageUnavailable) as err:
                store.put("acme", "new", prefix_adapter(seed=3))
            answer = to_api_error(err.value).response()  # what the HTTP client gets
            assert (answer.status_code, answer.headers["Retry-After"]) == (503, "5")
            assert json.loads(answer.body)["error"]["code"] == "storage_unavailable"
            with pytest.raises(StorageUnavailable):
                store.load(cold)  # 503 and retry: not "missing", not "corrupt"
            assert time.monotonic() - start < 3
            assert store.versions("acme", "new") == []
            for _ in range(3):
                assert same_content(store.load(store.get("acme", "held")), held_adapter)
        finally:
            private_s3.resume()

        assert store.put("acme", "new", prefix_adapter(seed=3)).version == 1
        assert same_content(store.load(cold), cold_adapter)
    finally:
        store.close()


def test_a_killed_server_fails_uploads_at_once_with_nothing_recorded(
    tmp_path: Path, private_s3: LocalS3, bucket: str
) -> None:
    store = s3_store(tmp_path, bucket, timeout_s=1.0)
    try:
        private_s3.kill()
        start = time.monotonic()
        with pytest.raises(StorageUnavailable, match="is unreachable"):
            store.put("acme", "x", prefix_adapter(seed=1))
        assert time.monotonic() - start < 1.0
        assert store.versions("acme", "x") == [] and store.list("acme") == []
    finally:
        store.close()


def _stalled_uploader(data_dir: Path, bucket: str, adapter: CanonicalAdapter, flag: Path) -> None:
    """Child: upload in 5 MiB parts, and stop for good once the first part is in."""
    store = s3_store(data_dir, bucket, multipart_threshold=5 * MiB, part_bytes=5 * MiB)

    def stall(**_kwargs) -> None:
        flag.write_text("part 1 in")
        time.sleep(60)

    store.blobs.client.meta.events.register("after-call.s3.UploadPart", stall)  # type: ignore
    store.put("acme", "x", adapter)


def test_a_writer_killed_mid_upload_leaves_nothing_visible_and_the_retry_succeeds(
    tmp_path: Path, private_s3: LocalS3, bucket: str, store_clock
) -> None:
    adapter = big_prompt_adapter(seed=3, nbytes=11 * MiB)
    flag = tmp_path / "stalled"
    writer = FORK.Process(target=_stalled_uploader, args=(tmp_path, bucket, adapter, flag))
    writer.start()
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert writer.is_alive() and time.monotonic() < deadline, "writer never got to part 2"
        time.sleep(0.01)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    assert writer.exitcode == -signal.SIGKILL

    store = s3_store(tmp_path, bucket, clock=store_clock)
    try:
        blobs = store.blobs
        assert isinstance(blobs, S3BlobStore)
        assert store.versions("acme", "x") == []
        assert not blobs.exists(adapter.sha256) and list(blobs.scan()) == []
        uploads = blobs.client.list_multipart_uploads(Bucket=bucket)["Uploads"]
        assert [u["Key"] for u in uploads] == [blobs.key(adapter.sha256)]  # invisible
        store_clock.now += store.gc_grace_s + 1
        assert store.collect() == 0
        assert blobs.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        store_clock.now = time.time()
        assert store.put("acme", "x", adapter).version == 1
        store.host_tier.evict(adapter.sha256)
        assert same_content(store.load(store.get("acme", "x")), adapter)
    finally:
        store.close()


# The read-through cache ----------------------------------------------------------------------
def test_a_hot_adapter_is_fetched_once_per_replica_even_across_restarts(
    tmp_path: Path, private_s3: LocalS3, bucket: str
) -> None:
    writer = s3_store(tmp_path / "writer", bucket)
    reader = s3_store(tmp_path / "reader", bucket)
    try:
        adapter = prefix_adapter(seed=4)
        record = writer.put("acme", "x", adapter)
        fetched = gets(reader)
        assert same_content(reader.load(record), adapter)
        assert len(fetched) == 1  # one GET of the object
        reader.host_tier.evict(adapter.sha256)
        assert same_content(reader.load(record), adapter)
        assert len(fetched) == 1  # from the disk copy
        assert reader.blobs.cache.stats().hits == 1  # type: ignore[union-attr]
        reader.close()

        private_s3.pause()  # the bucket is gone for good, as far as the restart can tell
        try:
            reader = s3_store(tmp_path / "reader", bucket, timeout_s=0.5)
            fetched = gets(reader)
            assert same_content(reader.load(record), adapter)
            assert fetched == []
        finally:
            private_s3.resume()
    finally:
        writer.close()
        reader.close()


def test_a_damaged_cached_copy_is_fetched_again_never_served(tmp_path: Path, s3_url: str) -> None:
    store = s3_store(tmp_path, bucket_of(s3_url))
    try:
        adapter = prefix_adapter(seed=5)
        record = store.put("acme", "x", adapter)
        store.host_tier.evict(adapter.sha256)
        cache = store.blobs.cache  # type: ignore[union-attr]
        (copy,) = cache.root.glob(f"{adapter.sha256}.*")
        copy.write_bytes(copy.read_bytes()[:-1])  # torn
        fetched = gets(store)
        assert same_content(store.load(record), adapter)
        assert len(fetched) == 1
        stats = cache.stats()
        assert (stats.corrupt, stats.entries) == (1, 1)
    finally:
        store.close()


def test_the_cache_is_bounded_lru_and_keeps_its_order_across_restarts(tmp_path: Path) -> None:
    import hashlib

    def put(cache: BlobCache, i: int) -> str:
        data = bytes([i]) * 100
        sha = f"{i:02x}" * 32
        cache.put(sha, data, hashlib.sha256(data).hexdigest())
        return sha

    cache = BlobCache(tmp_path, capacity_bytes=250)
    a, b = put(cache, 1), put(cache, 2)
    time.sleep(0.01)
    assert cache.get(a) == bytes([1]) * 100  # a is now the most recent
    c = put(cache, 3)
    assert (a in cache, b in cache, c in cache) == (True, False, True)
    assert cache.stats().bytes == 200
    assert sorted(p.name.partition(".")[0] for p in tmp_path.iterdir()) == sorted([a, c])
    put(cache, 4)
    assert (a in cache, c in cache) == (False, True)

    again = BlobCache(tmp_path, capacity_bytes=100)  # smaller: the older copy goes
    assert [sha for sha in (a, b, c, f"{4:02x}" * 32) if sha in again] == [f"{4:02x}" * 32]
    assert BlobCache(tmp_path / "none", capacity_bytes=0).get(a) is None


# Replicas ------------------------------------------------------------------------------------
def test_two_replicas_share_one_bucket(
    redis_server: LocalRedis, tmp_path: Path, s3_url: str
) -> None:
    a, b = (
        open_store(tmp_path / name, redis_url=redis_server.url, blob_url=s3_url, gc_interval_s=None)
        for name in ("a", "b")
    )
    try:
        wait_for(lambda: a.registry.watching() and b.registry.watching(), timeout=5)
        old, new = prefix_adapter(seed=6), prefix_adapter(seed=7)
        v1 = a.put("acme", "x", old)
        assert same_content(b.load(b.get("acme", "x")), old)  # from the bucket
        v2 = b.put("acme", "x", new)
        wait_for(lambda: a.get("acme", "x") == v2, timeout=1.0)
        assert same_content(a.load(v2), new)
        assert same_content(a.load(v1), old)  # a request still on v1 finishes on it

        a.delete("acme", "x")
        b.gc_grace_s = 0.0
        time.sleep(0.01)
        assert b.collect() == 2
        assert list(a.blobs.scan()) == []
        with pytest.raises(AdapterNotFound):
            b.get("acme", "x")
        with pytest.raises(BlobError, match="missing"):
            b.load(v1)  # b collected it: neither its memory nor its disk holds it
    finally:
        a.close()
        b.close()
