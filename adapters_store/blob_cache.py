"""A replica's local copy of remote blobs (read-through cache of ``S3BlobStore``), bounded in
bytes, least recently used out first.

One file per blob, ``<sha256>.<bytes sha256>``: the first is the blob's name (the adapter's
content hash), the second the sha256 of the file's bytes as the bucket recorded them at upload.
A read hashes the file again and drops it on a mismatch, so a torn or damaged copy is fetched
again, never served. Blobs are immutable, so a copy is never stale; the only reason to drop one
is room (or its collection, which the store tells the cache). Files are written to a temp name
and renamed; no fsync: a copy lost in a crash is simply fetched again.

The recency order survives restarts through the files' modification times (touched on every
hit). Several processes may share the directory (replicas on one data dir, forked workers):
each keeps its own index and treats a file another one removed as a miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from adapters_store.blobs import SHA_RE


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits: int
    misses: int
    corrupt: int  # copies dropped because their bytes no longer matched
    entries: int
    bytes: int


class BlobCache:
    """At most ``capacity_bytes`` of blob copies under ``root`` (0: cache nothing). Thread-safe."""

    def __init__(self, root: str | os.PathLike[str], capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError("the blob cache capacity must be >= 0 bytes")
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._index: OrderedDict[str, tuple[str, int]] = OrderedDict()  # sha -> (bytes sha, size)
        self._bytes = 0
        self._hits = self._misses = self._corrupt = 0
        found = []
        for entry in os.scandir(self.root):
            sha, _, digest = entry.name.partition(".")
            if SHA_RE.fullmatch(sha) and SHA_RE.fullmatch(digest):
                with contextlib.suppress(FileNotFoundError):
                    stat = entry.stat()
                    found.append((stat.st_mtime, sha, digest, stat.st_size))
            elif entry.name.startswith("tmp."):  # a write cut short by a crash
                Path(entry.path).unlink(missing_ok=True)
        for _, sha, digest, size in sorted(found):
            self._index[sha] = (digest, size)
            self._bytes += size
        with self._lock:
            self._evict_over_capacity()

    def get(self, sha: str) -> bytes | None:
        """The cached bytes of blob ``sha``, verified; None if absent or no longer intact."""
        with self._lock:
            entry = self._index.get(sha)
            if entry is None:
                self._misses += 1
                return None
        path = self.root / f"{sha}.{entry[0]}"
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # removed by another process sharing the directory
            data = None
        if data is not None and hashlib.sha256(data).hexdigest() == entry[0]:
            with self._lock:
                self._hits += 1
                if sha in self._index:
                    self._index.move_to_end(sha)
            with contextlib.suppress(OSError):
                os.utime(path)
            return data
        with self._lock:
            self._misses += 1
            self._corrupt += data is not None
            self._drop(sha)
        return None

    def put(self, sha: str, data: bytes, digest: str) -> None:
        """Keep a copy of blob ``sha`` whose bytes hash to ``digest`` (already verified by the
        caller). Blobs larger than the whole capacity are not kept. Never raises for lack of
        room or a failed write: a cache that cannot write only costs refetches."""
        size = len(data)
        if size > self.capacity_bytes:
            return
        tmp = self.root / f"tmp.{secrets.token_hex(8)}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.root / f"{sha}.{digest}")
        except OSError:
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            old = self._index.pop(sha, None)
            if old is not None:
                self._bytes -= old[1]
                if old[0] != digest:
                    (self.root / f"{sha}.{old[0]}").unlink(missing_ok=True)
            self._index[sha] = (digest, size)
            self._bytes += size
            self._evict_over_capacity()

    def evict(self, sha: str) -> None:
        with self._lock:
            self._drop(sha)

    def __contains__(self, sha: str) -> bool:
        with self._lock:
            return sha in self._index

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self._hits, self._misses, self._corrupt, len(self._index), self._bytes
            )

    def _evict_over_capacity(self) -> None:
        while self._bytes > self.capacity_bytes and self._index:
            self._drop(next(iter(self._index)))

    def _drop(self, sha: str) -> None:
        entry = self._index.pop(sha, None)
        if entry is not None:
            self._bytes -= entry[1]
            (self.root / f"{sha}.{entry[0]}").unlink(missing_ok=True)
