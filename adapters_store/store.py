"""AdapterStore: where adapters live between requests, and how the engine gets them.

Consistency (docs/design.md, decision 6):
- put: blob first (temp file, fsync, rename), metadata last, so a crash in between leaves an
  unreferenced blob and no visible adapter; ``collect`` removes such orphans (at start-up and
  every ``gc_interval_s``) once they are older than ``gc_grace_s``.
- A put of an existing name commits the next version and hides the previous one. A request
  holding the old ``AdapterRecord`` can still ``load`` it (host tier, or its blob, kept for
  ``gc_grace_s`` after it was hidden); the next ``get`` returns the new version.
- delete hides every version at once; blobs are collected later.
- Quota: a tenant's stored bytes are those of every version not yet collected, live or hidden
  (a replaced or deleted version frees its bytes when ``collect`` forgets it, ``gc_grace_s``
  after it was hidden), so re-uploading a name cannot store more than the quota meanwhile.
Tiers: this store keeps decoded adapters in host memory (``host_tier``, an LRU by bytes, keyed
by content sha256 so a cached copy is never another version's); the blob store is below it; the
engine keeps the device tier. A registered adapter that nobody loads costs only its metadata.
"""

from __future__ import annotations

import builtins
import functools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict, Unpack

from adapters_store.blobs import BlobStore, open_blobs
from adapters_store.codec import adapter_nbytes, decode, encode
from adapters_store.formats import AdapterLimits, CanonicalAdapter
from adapters_store.registry import Change, NewVersion, Registry, SQLiteRegistry
from adapters_store.tiers import LRUTier
from adapters_store.types import (
    AdapterNotFound,
    AdapterRecord,
    QuotaExceeded,
    RegistryUnavailable,
    TenantQuotas,
    TenantUsage,
    check_name,
    check_tenant,
)

log = logging.getLogger(__name__)

DEFAULT_HOST_CACHE_BYTES = 1 << 30
Subscriber = Callable[[str, str, str], None]


class StoreOptions(TypedDict, total=False):
    """AdapterStore's keyword options that ``open_store`` passes through."""

    name_cache_entries: int
    gc_grace_s: float
    gc_interval_s: float | None
    clock: Callable[[], float]


class AdapterStore:
    """Uploads, look-ups and loads of adapters, by (tenant, name). Thread-safe.

    Errors are the typed ``StoreError``s of ``types.py``: AdapterNotFound, InvalidName,
    QuotaExceeded, RegistryUnavailable (registry down: retry), StorageFull (no room: 507),
    StorageNotWritable (read-only or permission denied: 503, retry), BlobError. A put that
    fails on the blob leaves neither a record nor a temp file.
    """

    def __init__(
        self,
        registry: Registry,
        blobs: BlobStore,
        *,
        quotas: TenantQuotas | None = None,
        host_cache_bytes: int = DEFAULT_HOST_CACHE_BYTES,
        name_cache_entries: int = 100_000,
        gc_grace_s: float = 300.0,
        gc_interval_s: float | None = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``gc_grace_s`` must exceed the longest time between a blob's write and its
        metadata's commit on any replica (normally milliseconds; Redis commits are refused
        after 30 s), and how long a request may hold a record before loading it."""
        self.registry = registry
        self.blobs = blobs
        self.quotas = quotas or TenantQuotas()
        self.host_tier: LRUTier[str, CanonicalAdapter] = LRUTier(
            "host", capacity_bytes=host_cache_bytes, size_of=adapter_nbytes
        )
        self.gc_grace_s = gc_grace_s
        self._clock = clock
        # (tenant, name) -> live record, for serving through a registry outage and, while the
        # registry's announcements are received, for answering get() without a round trip.
        self._names: OrderedDict[tuple[str, str], AdapterRecord] = OrderedDict()
        self._names_max = name_cache_entries
        self._names_gen = 0  # bumped by every change; a get() that raced one does not cache
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []
        self._stop = threading.Event()
        self._gc_thread: threading.Thread | None = None
        registry.watch(self._on_announcement)
        if gc_interval_s is not None:
            self._gc_thread = threading.Thread(
                target=self._gc_loop, args=(gc_interval_s,), name="store-gc", daemon=True
            )
            self._gc_thread.start()

    def adapter_limits(self, tenant: str) -> AdapterLimits:
        """Limits to parse this tenant's uploads with (``formats.parse_adapter``)."""
        quota = self.quotas.for_tenant(tenant)
        return AdapterLimits(
            max_virtual_tokens=quota.max_virtual_tokens, max_file_bytes=quota.max_upload_bytes
        )

    def put(self, tenant: str, name: str, adapter: CanonicalAdapter) -> AdapterRecord:
        """Store ``adapter`` as the next version of ``name``; returns its record.

        Checks the name and the tenant's quotas (QuotaExceeded leaves the store as it was).
        Concurrent puts of one name, from any replica, get consecutive versions; the highest
        is live. After this returns, ``get`` on this store returns the new version, and other
        replicas drop their copy of the old one on the announcement.
        """
        check_tenant(tenant)
        check_name(name)
        quota = self.quotas.for_tenant(tenant)
        # A text prefix's count is of real tokens, bounded by its text's size instead.
        if adapter.kind != "text" and adapter.num_virtual_tokens > quota.max_virtual_tokens:
            raise QuotaExceeded(
                f"adapter has {adapter.num_virtual_tokens} virtual tokens; the limit is "
                f"{quota.max_virtual_tokens}"
            )
        data = encode(adapter)
        if len(data) > quota.max_upload_bytes:
            raise QuotaExceeded(
                f"adapter is {len(data)} bytes stored; the limit is {quota.max_upload_bytes}"
            )
        token = self.registry.begin()  # fails fast, before any write, if the registry is down
        new = NewVersion(
            tenant, name, adapter.kind, adapter.num_virtual_tokens, adapter.sha256, len(data)
        )
        self.blobs.write(adapter.sha256, data)
        try:
            record, replaced = self.registry.commit(new, quota, self._clock(), token)
        except QuotaExceeded:
            self._collect_blob(adapter.sha256)
            raise
        if not self.blobs.exists(adapter.sha256):  # a collector raced us: see blobs.collect
            self.blobs.write(adapter.sha256, data)
        self._changed(Change("put", tenant, name, replaced), record.sha256)
        return record

    def get(self, tenant: str, name: str) -> AdapterRecord:
        """The live version of ``name``; AdapterNotFound if none (or another tenant's).

        While the registry is unreachable, a name this store resolved before still resolves
        (adapters already held keep serving); others raise RegistryUnavailable.
        """
        return self.lookup(tenant, name)[0]

    def lookup(self, tenant: str, name: str) -> tuple[AdapterRecord, bool]:
        """``get``, and whether its answer is possibly stale: True when the registry did not
        answer and the record is the one this store held (a newer version or a deletion made
        meanwhile on another replica would not be known here)."""
        base, at, version = name.partition("@")
        if at:  # "name@N": version N, while it is kept and the name is not deleted
            return self.pinned(tenant, base, version), False
        key = (tenant, name)
        if self.registry.watching():
            with self._lock:
                record = self._names.get(key)
                if record is not None:
                    self._names.move_to_end(key)
                    return record, False
        with self._lock:
            gen = self._names_gen
        try:
            record = self.registry.get(tenant, name)
        except RegistryUnavailable:
            with self._lock:
                record = self._names.get(key)
            if record is None:
                raise
            return record, True
        except AdapterNotFound:
            with self._lock:
                self._names.pop(key, None)
            raise
        with self._lock:
            if gen == self._names_gen:
                self._names[key] = record
                self._names.move_to_end(key)
                while len(self._names) > self._names_max:
                    self._names.popitem(last=False)
        return record, False

    def held(self, tenant: str) -> list[AdapterRecord]:
        """The tenant's adapters this store has resolved and would still serve while the
        registry is unreachable (the names ``get`` answers from memory then), sorted by name.
        What the registry lists may differ: this is for degraded answers only."""
        with self._lock:
            records = [r for (t, _), r in self._names.items() if t == tenant]
        return sorted(records, key=lambda r: r.name)

    def list(self, tenant: str) -> list[AdapterRecord]:
        """The live version of each of the tenant's adapters, sorted by name."""
        return self.registry.list(tenant)

    def versions(self, tenant: str, name: str) -> builtins.list[AdapterRecord]:
        """Every retained version (live and hidden, not yet collected), oldest first."""
        return self.registry.versions(tenant, name)

    def pinned(self, tenant: str, name: str, version: str) -> AdapterRecord:
        """Version ``version`` (decimal digits) of ``name``: the live one or a replaced one
        not yet collected. A deleted name pins nothing (DELETE hides every version).
        AdapterNotFound otherwise."""
        if not (version.isascii() and version.isdigit() and len(version) <= 18):
            raise AdapterNotFound(f"adapter {name!r}@{version!r} not found")
        live = self.get(tenant, name)
        if live.version == int(version):
            return live
        for record in self.versions(tenant, name):
            if record.version == int(version):
                return record
        raise AdapterNotFound(f"adapter {name!r} has no version {version} kept")

    def usage(self, tenant: str) -> TenantUsage:
        """What the tenant's quota counts now: live adapters, bytes of uncollected versions."""
        adapters, stored = self.registry.usage(tenant)
        return TenantUsage(tenant, adapters, stored)

    def tenants(self) -> builtins.list[TenantUsage]:
        """The usage of every tenant that holds a live adapter or an uncollected version,
        sorted by tenant (for admins; with Redis, a scan of the registry's keys)."""
        return self.registry.tenants()

    def delete(self, tenant: str, name: str) -> AdapterRecord:
        """Hide every version of ``name`` (returns the one that was live); AdapterNotFound if
        none. Its blobs are collected after ``gc_grace_s``."""
        record = self.registry.hide(tenant, name, self._clock())
        self._changed(Change("delete", tenant, name, record.sha256))
        return record

    def load(self, record: AdapterRecord) -> CanonicalAdapter:
        """The adapter content of ``record``: from the host tier, else read from its blob and
        verified against ``record.sha256`` (BlobError if missing or corrupt; never served)."""
        return self.host_tier.get_or_load(
            record.sha256, functools.partial(self._read, record.sha256)
        )

    def subscribe(self, callback: Subscriber) -> None:
        """Call ``callback(event, tenant, name)`` after each change: "put" or "delete" made
        through this store (on the caller's thread) or another replica (on a background
        thread, within a second), and "reset" ("", "") when announcements from other replicas
        may have been missed (registry reconnected): drop every name -> version mapping."""
        with self._lock:
            self._subscribers.append(callback)

    def ping(self) -> bool:
        """True if the registry answers (for /ready)."""
        return self.registry.ping()

    def collect(self) -> int:
        """Remove blobs no retained version names, once older than ``gc_grace_s``; forget
        versions hidden longer than that (their bytes leave their tenants' usage); clean temp
        and trash leftovers. Returns the number of blobs removed. Safe to run on several
        replicas at once."""
        cutoff = self._clock() - self.gc_grace_s
        self.registry.purge_hidden(cutoff)
        referenced = self.registry.referenced()
        removed = 0
        for sha, mtime in list(self.blobs.scan()):
            if sha not in referenced and mtime < cutoff and self._collect_blob(sha):
                removed += 1
        self.blobs.clean(cutoff, self.registry.is_referenced)
        return removed

    def close(self) -> None:
        self._stop.set()
        if self._gc_thread is not None:
            self._gc_thread.join()
        self.registry.close()

    # -- internals

    def _read(self, sha: str) -> CanonicalAdapter:
        return decode(self.blobs.read(sha), sha)

    def _collect_blob(self, sha: str) -> bool:
        removed = self.blobs.collect(sha, lambda: not self.registry.is_referenced(sha))
        if removed:
            self.host_tier.evict(sha)
        return removed

    def _changed(self, change: Change, live_sha256: str | None = None) -> None:
        """A change made here or announced by another replica: forget the name's cached
        version (never replace it: with puts racing, the last to get here is not necessarily
        the newest), then tell subscribers. ``live_sha256``: the new live content, if known."""
        with self._lock:
            self._names_gen += 1
            if change.event == "reset":
                self._names.clear()
            else:
                self._names.pop((change.tenant, change.name), None)
            subscribers = list(self._subscribers)
        replaced = change.replaced_sha256
        if replaced is not None and replaced != live_sha256:
            self.host_tier.evict(replaced)  # memory only: entries are keyed by content
        for callback in subscribers:
            try:
                callback(change.event, change.tenant, change.name)
            except Exception:
                log.exception("adapter store subscriber failed on %s", change)

    def _on_announcement(self, change: Change) -> None:
        self._changed(change)

    def _gc_loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.collect()
            except RegistryUnavailable as exc:
                log.warning("adapter blob collection skipped: %s", exc)
            except Exception:
                log.exception("adapter blob collection failed")


def open_store(
    data_dir: str | os.PathLike[str],
    redis_url: str | None = None,
    blob_url: str | None = None,
    quotas: TenantQuotas | None = None,
    host_cache_bytes: int = DEFAULT_HOST_CACHE_BYTES,
    **options: Unpack[StoreOptions],
) -> AdapterStore:
    """The store the server runs with: registry in ``<data_dir>/registry.sqlite3``, or Redis
    at ``redis_url``; blobs under ``<data_dir>/blobs``, or at ``blob_url`` (``file:///path``).
    Cleans up after a crash (``collect``) before returning; if the registry is unreachable
    then, the store still opens (and /ready reports it). ``options``: AdapterStore's."""
    if redis_url:
        from adapters_store.redis_registry import RedisRegistry

        registry: Registry = RedisRegistry(redis_url)
    else:
        registry = SQLiteRegistry(Path(data_dir) / "registry.sqlite3")
    store = AdapterStore(
        registry,
        open_blobs(data_dir, blob_url),
        quotas=quotas,
        host_cache_bytes=host_cache_bytes,
        **options,
    )
    try:
        store.collect()
    except RegistryUnavailable as exc:
        log.warning("start-up cleanup of adapter blobs skipped: %s", exc)
    return store
