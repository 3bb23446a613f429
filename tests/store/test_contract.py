"""The store's contract, run on both registries (SQLite and a real redis-server), each with
blobs in the data dir and in an S3 bucket (a real moto_server)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from store_helpers import (
    StoreFactory,
    corrupt_blob,
    make_adapter,
    prefix_adapter,
    prompt_adapter,
    same_content,
)

from adapters_store.codec import encode
from adapters_store.registry import NewVersion
from adapters_store.store import AdapterStore
from adapters_store.types import (
    AdapterNotFound,
    BlobError,
    InvalidName,
    Quota,
    QuotaExceeded,
    TenantQuotas,
    TenantUsage,
)

KINDS = ["prefix_tuning", "prompt_tuning", "p_tuning", "text"]


def blob_shas(store: AdapterStore) -> set[str]:
    return {sha for sha, _ in store.blobs.scan()}


@pytest.mark.parametrize("kind", KINDS)
def test_put_get_list_load_delete(store: AdapterStore, kind: str) -> None:
    adapter = make_adapter(kind, seed=1)
    before = int(time.time())
    record = store.put("acme", "helper", adapter)
    assert (record.tenant, record.name, record.kind, record.version) == ("acme", "helper", kind, 1)
    assert record.num_virtual_tokens == adapter.num_virtual_tokens
    assert record.sha256 == adapter.sha256
    assert record.size_bytes == len(encode(adapter))
    assert before <= record.created <= time.time()
    assert record.id.startswith("adp-")
    assert store.get("acme", "helper") == record
    assert store.list("acme") == [record]
    assert same_content(store.load(record), adapter)
    assert blob_shas(store) == {adapter.sha256}

    assert store.delete("acme", "helper") == record
    with pytest.raises(AdapterNotFound):
        store.get("acme", "helper")
    with pytest.raises(AdapterNotFound):
        store.delete("acme", "helper")
    assert store.list("acme") == []


def test_list_is_sorted_by_name_and_shows_newest_versions(store: AdapterStore) -> None:
    for i, name in enumerate(["zeta", "alpha", "mid", "alpha"]):
        store.put("acme", name, prefix_adapter(seed=i))
    assert [(r.name, r.version) for r in store.list("acme")] == [
        ("alpha", 2),
        ("mid", 1),
        ("zeta", 1),
    ]


def test_reupload_serves_new_weights_while_old_requests_finish_on_old(
    store: AdapterStore,
) -> None:
    old, new = prefix_adapter(seed=1), prefix_adapter(seed=2)
    v1 = store.put("acme", "x", old)
    in_flight = store.get("acme", "x")  # a request resolved the name before the re-upload
    assert same_content(store.load(in_flight), old)  # now held in the host tier

    v2 = store.put("acme", "x", new)
    assert (v1.version, v2.version) == (1, 2) and v2.sha256 == new.sha256 != old.sha256
    current = store.get("acme", "x")
    assert current == v2
    assert same_content(store.load(current), new)
    assert same_content(store.load(current), new)  # second time from the host tier
    assert same_content(store.load(in_flight), old)  # the old request still finishes on v1
    stats = store.host_tier.stats()
    assert (stats.loads, stats.hits) == (3, 1)  # v1 left the host tier on the change: reloaded
    assert [r.version for r in store.versions("acme", "x")] == [1, 2]


def test_versions_are_never_reused(store: AdapterStore) -> None:
    store.put("acme", "x", prefix_adapter(seed=1))
    store.put("acme", "x", prefix_adapter(seed=2))
    store.delete("acme", "x")
    assert store.put("acme", "x", prefix_adapter(seed=3)).version == 3


def test_tenants_are_isolated(store: AdapterStore) -> None:
    a = store.put("acme", "x", prefix_adapter(seed=1))
    with pytest.raises(AdapterNotFound):
        store.get("globex", "x")
    with pytest.raises(AdapterNotFound):
        store.delete("globex", "x")
    assert store.list("globex") == []
    b = store.put("globex", "x", prefix_adapter(seed=2))
    assert (b.tenant, b.version) == ("globex", 1)
    store.delete("globex", "x")
    assert store.get("acme", "x") == a


@pytest.mark.parametrize("name", ["", "Upper", "a" * 65, "../x", "x/y", "x\n", "-x", ".x"])
def test_invalid_names_are_refused_before_anything_is_written(
    store: AdapterStore, name: str
) -> None:
    with pytest.raises(InvalidName) as err:
        store.put("acme", name, prefix_adapter(seed=1))
    assert err.value.status == 400
    assert store.list("acme") == [] and blob_shas(store) == set()


def test_quotas_refuse_and_leave_the_store_as_it_was(make_store: StoreFactory, store_clock) -> None:
    size = len(encode(prefix_adapter(seed=0)))  # every 3-token test prefix adapter is this big
    quotas = TenantQuotas(
        default=Quota(max_adapters=2, max_total_bytes=3 * size + 100, max_virtual_tokens=4),
        per_tenant={"big": Quota(max_adapters=10, max_upload_bytes=size - 1)},
    )
    clock = store_clock
    store = make_store(quotas=quotas, clock=clock, gc_grace_s=10)
    store.put("acme", "a", prefix_adapter(seed=1))
    store.put("acme", "b", prefix_adapter(seed=2))
    store.put("acme", "b", prefix_adapter(seed=3))  # not one more adapter, but more bytes
    assert store.registry.usage("acme") == (2, 3 * size)
    before, blobs_before = store.list("acme"), blob_shas(store)

    with pytest.raises(QuotaExceeded, match="would have 3 adapters; the limit is 2") as err:
        store.put("acme", "c", prefix_adapter(seed=4))
    assert err.value.status == 413
    with pytest.raises(QuotaExceeded, match="virtual tokens; the limit is 4"):
        store.put("acme", "a", prefix_adapter(seed=5, num_virtual_tokens=5))
    with pytest.raises(QuotaExceeded, match=f"bytes stored; the limit is {size - 1}"):
        store.put("big", "a", prefix_adapter(seed=6))
    assert store.list("acme") == before and store.list("big") == []
    assert blob_shas(store) == blobs_before  # a refused upload's blob is removed at once

    store.delete("acme", "b")  # one adapter left, but b's two versions are still stored
    assert store.registry.usage("acme") == (1, 3 * size)
    with pytest.raises(QuotaExceeded, match=f"would store {4 * size} bytes of adapters; the limit"):
        store.put("acme", "c", prefix_adapter(seed=8))
    clock.now += 11
    assert store.collect() == 2  # b's versions are collected: their bytes are free again
    assert store.registry.usage("acme") == (1, size)
    store.put("acme", "c", prefix_adapter(seed=8))
    assert store.registry.usage("acme") == (2, 2 * size)
    bigger = prefix_adapter(seed=7, num_virtual_tokens=4)
    big = len(encode(bigger))
    with pytest.raises(QuotaExceeded, match=f"would store {2 * size + big} bytes.*the limit is "):
        store.put("acme", "c", bigger)  # 2 adapters, and c's first version still counts
    assert store.registry.usage("acme") == (2, 2 * size)
    limits = store.adapter_limits("big")
    assert (limits.max_virtual_tokens, limits.max_file_bytes) == (512, size - 1)


def test_stored_bytes_count_every_version_until_it_is_collected(
    make_store: StoreFactory, store_clock
) -> None:
    clock = store_clock
    store = make_store(clock=clock, gc_grace_s=10)
    x = [store.put("acme", "x", prompt_adapter(seed=i)) for i in range(3)]  # 2 now hidden
    y = store.put("globex", "y", prefix_adapter(seed=9))
    x_bytes = sum(r.size_bytes for r in x)
    assert store.usage("acme") == TenantUsage("acme", 1, x_bytes)
    assert store.tenants() == [
        TenantUsage("acme", 1, x_bytes),
        TenantUsage("globex", 1, y.size_bytes),
    ]
    clock.now += 5
    store.delete("acme", "x")  # the live version is hidden 5 s after the other two
    assert store.usage("acme") == TenantUsage("acme", 0, x_bytes)
    clock.now += 6
    assert store.collect() == 2  # versions 1 and 2, past the grace; version 3 not yet
    assert store.usage("acme") == TenantUsage("acme", 0, x[2].size_bytes)
    clock.now += 5
    assert store.collect() == 1
    assert store.usage("acme") == TenantUsage("acme", 0, 0)
    assert store.tenants() == [TenantUsage("globex", 1, y.size_bytes)]
    assert store.usage("nobody") == TenantUsage("nobody", 0, 0)


def test_reuploads_cannot_store_more_than_the_byte_quota_before_collection(
    make_store: StoreFactory,
    store_clock,
) -> None:
    adapters = [prompt_adapter(seed=i) for i in range(4)]
    size = len(encode(adapters[0]))  # every 3-token prompt adapter is this big
    clock = store_clock
    store = make_store(
        quotas=TenantQuotas(default=Quota(max_total_bytes=2 * size)), clock=clock, gc_grace_s=10
    )
    store.put("acme", "x", adapters[0])
    store.put("acme", "x", adapters[1])
    with pytest.raises(QuotaExceeded, match=f"would store {3 * size} bytes") as err:
        store.put("acme", "x", adapters[2])
    assert err.value.status == 413
    assert [r.version for r in store.versions("acme", "x")] == [1, 2]
    assert blob_shas(store) == {adapters[0].sha256, adapters[1].sha256}
    clock.now += 11
    assert store.collect() == 1  # version 1
    assert store.put("acme", "x", adapters[2]).version == 3  # no number used by the refusal
    assert store.usage("acme") == TenantUsage("acme", 1, 2 * size)
    with pytest.raises(QuotaExceeded, match=f"would store {3 * size} bytes"):
        store.put("acme", "y", adapters[3])


def test_delete_hides_at_once_and_collects_the_blob_after_the_grace(
    make_store: StoreFactory,
    store_clock,
) -> None:
    clock = store_clock
    store = make_store(clock=clock, gc_grace_s=300)
    adapter = prompt_adapter(seed=1)
    store.put("acme", "x", adapter)
    in_flight = store.get("acme", "x")
    store.delete("acme", "x")
    with pytest.raises(AdapterNotFound):
        store.get("acme", "x")
    assert same_content(store.load(in_flight), adapter)  # a running request finishes

    assert store.collect() == 0  # within the grace: kept
    assert blob_shas(store) == {adapter.sha256}
    assert [r.version for r in store.versions("acme", "x")] == [1]

    clock.now += 301
    assert store.collect() == 1
    assert blob_shas(store) == set() and store.versions("acme", "x") == []
    with pytest.raises(BlobError, match="missing"):
        store.load(in_flight)


def test_a_blob_stays_while_any_version_names_its_content(
    make_store: StoreFactory, store_clock
) -> None:
    clock = store_clock
    store = make_store(clock=clock, gc_grace_s=10)
    shared, other = prefix_adapter(seed=1), prefix_adapter(seed=2)
    store.put("acme", "x", shared)
    store.put("globex", "y", shared)  # same content, another tenant: one blob
    store.put("acme", "x", other)  # x's v1 (shared content) is now hidden
    clock.now += 11
    assert store.collect() == 0
    assert blob_shas(store) == {shared.sha256, other.sha256}
    store.delete("globex", "y")
    clock.now += 11
    assert store.collect() == 1
    assert blob_shas(store) == {other.sha256}
    assert same_content(store.load(store.get("acme", "x")), other)


def test_collection_racing_an_upload_of_the_same_content_never_loses_the_blob(
    make_store: StoreFactory,
    store_clock,
) -> None:
    """The collector hides a blob, then asks the registry again; an upload commits, then
    checks that its blob is there. Whichever of the two comes second sees the other."""
    clock = store_clock
    store = make_store(clock=clock, gc_grace_s=10)
    adapter = prefix_adapter(seed=1)
    sha = adapter.sha256
    store.put("acme", "old", adapter)
    store.delete("acme", "old")
    clock.now += 11
    store.registry.purge_hidden(clock.now - 10)  # now nothing names the blob

    # 1. A version naming the content commits after the hide, before the re-check (its blob
    # write is not even needed): the collector puts the blob back.
    def commit_then_recheck() -> bool:
        new = NewVersion("acme", "a", adapter.kind, adapter.num_virtual_tokens, sha, 1)
        store.registry.commit(new, Quota(), clock(), store.registry.begin())
        return not store.registry.is_referenced(sha)

    assert store.blobs.collect(sha, commit_then_recheck) is False
    assert blob_shas(store) == {sha}
    store.delete("acme", "a")
    clock.now += 11
    store.registry.purge_hidden(clock.now - 10)

    # 2. An upload wrote the blob, the collector removes it before the upload commits: the
    # upload's post-commit check finds it missing and writes it again.
    collected: list[bool] = []
    commit = store.registry.commit

    def collect_then_commit(*args, **kwargs):
        collected.append(store.blobs.collect(sha, lambda: not store.registry.is_referenced(sha)))
        return commit(*args, **kwargs)

    store.registry.commit = collect_then_commit  # type: ignore[method-assign]
    record = store.put("acme", "b", adapter)
    store.registry.commit = commit  # type: ignore[method-assign]
    assert collected == [True]
    assert blob_shas(store) == {sha}
    store.host_tier.evict(sha)
    assert same_content(store.load(record), adapter)


def test_a_corrupt_blob_is_an_error_and_never_served(store: AdapterStore) -> None:
    adapter = prefix_adapter(seed=1)
    record = store.put("acme", "x", adapter)
    corrupt_blob(store, record.sha256)
    for _ in range(2):
        with pytest.raises(BlobError, match="hashes to"):
            store.load(record)
    stats = store.host_tier.stats()
    assert (stats.load_failures, stats.loads, stats.resident_entries) == (2, 0, 0)


def test_idle_adapters_cost_only_metadata_and_the_host_tier_is_an_lru(
    make_store: StoreFactory,
) -> None:
    adapters = [prefix_adapter(seed=i) for i in range(5)]
    nbytes = adapters[0].kv.nbytes
    store = make_store(host_cache_bytes=2 * nbytes)
    records = [store.put("acme", f"a{i}", a) for i, a in enumerate(adapters)]
    stats = store.host_tier.stats()
    assert (stats.resident_entries, stats.resident_bytes) == (0, 0)  # registered, not loaded
    for record in records[:3]:
        store.load(record)
    stats = store.host_tier.stats()
    assert (stats.resident_entries, stats.resident_bytes) == (2, 2 * nbytes)
    assert (stats.loads, stats.evictions) == (3, 1)
    assert records[0].sha256 not in store.host_tier and records[2].sha256 in store.host_tier


def test_concurrent_same_name_uploads_get_consecutive_versions(store: AdapterStore) -> None:
    adapters = {seed: prompt_adapter(seed) for seed in range(24)}
    got: dict[int, int] = {}  # version -> seed
    lock = threading.Lock()

    def upload(seeds: list[int]) -> None:
        for seed in seeds:
            record = store.put("acme", "x", adapters[seed])
            with lock:
                got[record.version] = seed

    threads = [threading.Thread(target=upload, args=(list(range(i, 24, 4)),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 25))
    stored = {r.version: r.sha256 for r in store.versions("acme", "x")}
    assert stored == {v: adapters[seed].sha256 for v, seed in got.items()}
    live = store.get("acme", "x")
    assert live.version == 24 and live.sha256 == adapters[got[24]].sha256
    assert store.registry.usage("acme") == (1, 24 * live.size_bytes)  # all the same size


def test_subscribers_hear_local_changes(store: AdapterStore) -> None:
    events: list[tuple[str, str, str]] = []
    store.subscribe(lambda *e: events.append(e))
    store.put("acme", "x", prefix_adapter(seed=1))
    store.delete("acme", "x")
    assert [e for e in events if e[0] != "reset"] == [
        ("put", "acme", "x"),
        ("delete", "acme", "x"),
    ]


def test_data_survives_reopening(make_store: StoreFactory, tmp_path: Path) -> None:
    first = make_store()
    record = first.put("acme", "x", make_adapter("text", seed=3))
    first.close()
    again = make_store()
    assert again.get("acme", "x") == record
    assert again.load(record).text == "You are assistant number 3."
