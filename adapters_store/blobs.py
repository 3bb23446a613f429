"""Blob storage: one immutable object per adapter content, named by its sha256.

Two stores share one interface (``BlobStore``): ``LocalBlobStore`` here (the data directory, or
a shared volume given as ``file:///path``) and ``S3BlobStore`` (``s3://bucket/prefix``, in
``s3_blobs.py``, imported only when used). Layout of the local one under its root::

    objects/ab/<sha256>.safetensors   the blobs, sharded by the first two hex digits
    tmp/<sha256>.<random>.part        writes in progress (renamed into objects/ when complete)
    trash/<sha256>.<ns>.<random>      blobs being collected (see ``collect``)

Torch-free: blobs are bytes here; ``codec.py`` knows what is inside them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlparse

from adapters_store.types import BlobError, StorageFull, StorageNotWritable

SHA_RE = re.compile(r"[0-9a-f]{64}")
SUFFIX = ".safetensors"
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # no room: 507
_NOT_WRITABLE_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}  # refused: 503


class BlobStore(Protocol):
    """Where blobs live. ``write`` makes a blob visible whole or not at all; ``read`` never
    returns bytes other than those written (BlobError if missing or damaged); ``collect`` and
    ``clean`` are safe to run from several replicas at once (see ``LocalBlobStore``)."""

    def write(self, sha: str, data: bytes) -> None: ...

    def read(self, sha: str) -> bytes: ...

    def exists(self, sha: str) -> bool: ...

    def scan(self) -> Iterator[tuple[str, float]]: ...

    def collect(self, sha: str, unreferenced: Callable[[], bool]) -> bool: ...

    def clean(self, older_than: float, referenced: Callable[[str], bool]) -> int: ...


class LocalBlobStore:
    """Blobs in a directory that every replica sharing it sees as one POSIX file system.

    Writes are atomic and durable: temp file, fsync, rename, fsync of the directory. A blob
    is never modified in place; rewriting one replaces it with identical bytes.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.trash = self.root / "trash"
        for d in (self.objects, self.tmp, self.trash):
            d.mkdir(parents=True, exist_ok=True)

    def path(self, sha: str) -> Path:
        if not SHA_RE.fullmatch(sha):
            raise ValueError(f"not a sha256 hex digest: {sha!r}")
        return self.objects / sha[:2] / (sha + SUFFIX)

    def write(self, sha: str, data: bytes) -> None:
        """Store ``data`` as blob ``sha`` (the caller vouches that it is that content).

        StorageFull if the location has no room (ENOSPC, EDQUOT, EFBIG), StorageNotWritable
        if it refuses writes (EROFS, EACCES, EPERM); either way no temp file is left behind.
        """
        final = self.path(sha)
        tmp = self.tmp / f"{sha}.{secrets.token_hex(8)}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            shard_is_new = not final.parent.exists()
            final.parent.mkdir(exist_ok=True)
            if shard_is_new:
                _fsync_dir(self.objects)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            # On a read-only file system unlink fails with EROFS even when the file is absent;
            # that must not replace the error being reported.
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if exc.errno in _FULL_ERRNOS:
                raise StorageFull(
                    f"adapter storage is full ({exc.strerror}); free space or delete adapters, "
                    "then upload again"
                ) from exc
            if exc.errno in _NOT_WRITABLE_ERRNOS:
                raise StorageNotWritable(
                    f"adapter storage is not writable ({exc.strerror}); retry later"
                ) from exc
            raise

    def read(self, sha: str) -> bytes:
        try:
            return self.path(sha).read_bytes()
        except FileNotFoundError:
            raise BlobError(f"blob {sha} is missing from the blob store") from None

    def exists(self, sha: str) -> bool:
        return self.path(sha).exists()

    def scan(self) -> Iterator[tuple[str, float]]:
        """(sha256, modification time in unix seconds) of every stored blob."""
        for shard in self.objects.iterdir():
            for entry in os.scandir(shard):
                sha = entry.name.removesuffix(SUFFIX)
                if entry.name.endswith(SUFFIX) and SHA_RE.fullmatch(sha):
                    try:
                        yield sha, entry.stat().st_mtime
                    except FileNotFoundError:  # collected meanwhile by another replica
                        continue

    def collect(self, sha: str, unreferenced: Callable[[], bool]) -> bool:
        """Delete blob ``sha`` if ``unreferenced()`` still holds once it is out of sight.

        The blob is first renamed into trash/, then the registry is asked again: an upload of
        the same content that committed meanwhile either wrote its own copy after the rename or
        finds the blob missing after its commit and writes it again (``AdapterStore.put``), so
        a committed record never ends up without its blob. Returns True if deleted.
        """
        trashed = self.trash / f"{sha}.{time.time_ns()}.{secrets.token_hex(4)}"
        try:
            os.replace(self.path(sha), trashed)
        except FileNotFoundError:
            return False
        try:
            keep = not unreferenced()
        except BaseException:
            self._restore(trashed, sha)
            raise
        if keep:
            self._restore(trashed, sha)
            return False
        trashed.unlink(missing_ok=True)
        return True

    def clean(self, older_than: float, referenced: Callable[[str], bool]) -> int:
        """Remove what crashed writers and collectors left: temp files, and trash entries (or
        put back those that are referenced), older than ``older_than`` (unix seconds).
        Younger ones may belong to a live process on another replica. Returns the count."""
        removed = 0
        for entry in os.scandir(self.tmp):
            if _mtime(entry) < older_than:
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
        for entry in os.scandir(self.trash):
            sha, _, rest = entry.name.partition(".")
            stamp = rest.partition(".")[0]
            if not SHA_RE.fullmatch(sha) or not stamp.isdigit():
                continue
            if int(stamp) / 1e9 >= older_than:
                continue
            if referenced(sha) and not self.exists(sha):
                self._restore(Path(entry.path), sha)
            else:
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
        return removed

    def _restore(self, trashed: Path, sha: str) -> None:
        # Gone if another replica's clean() got it; the uploader's post-commit check rewrites.
        final = self.path(sha)
        final.parent.mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(trashed, final)


def open_blobs(data_dir: str | os.PathLike[str], blob_url: str | None = None) -> BlobStore:
    """``blob_url`` None: ``<data_dir>/blobs``; ``file:///path``: a shared volume at /path;
    ``s3://bucket/prefix``: an S3-compatible bucket (the ``s3`` extra), with a read-through
    copy in ``<data_dir>/blob-cache`` of at most ``?cache_bytes=N`` bytes (default 4 GiB).
    ValueError with the reason if the URL cannot be used. Makes no network request."""
    if blob_url is None:
        return LocalBlobStore(Path(data_dir) / "blobs")
    if parse_blob_url(blob_url) == "file":
        return LocalBlobStore(unquote(urlparse(blob_url).path))
    from adapters_store.s3_blobs import open_s3_blobs

    bucket, prefix, cache_bytes = parse_s3_url(blob_url)
    return open_s3_blobs(bucket, prefix, Path(data_dir) / "blob-cache", cache_bytes)


def parse_blob_url(blob_url: str) -> str:
    """The kind of store ``blob_url`` names, "file" or "s3", once its form is checked (and, for
    s3, that boto3 is installed); ValueError naming what is wrong. Creates nothing."""
    url = urlparse(blob_url)
    if url.scheme == "file" and url.netloc in ("", "localhost") and url.path and not url.query:
        return "file"
    if url.scheme == "s3":
        parse_s3_url(blob_url)
        from adapters_store.s3_blobs import load_boto3

        load_boto3(blob_url)
        return "s3"
    raise ValueError(
        f"--blob-url {blob_url!r}: expected file:///absolute/path or s3://bucket/prefix"
    )


S3_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
DEFAULT_CACHE_BYTES = 4 << 30


def parse_s3_url(blob_url: str) -> tuple[str, str, int]:
    """``s3://bucket[/prefix][?cache_bytes=N]`` -> (bucket, prefix, cache bytes); ValueError
    naming what is wrong."""
    url = urlparse(blob_url)
    if url.scheme != "s3" or not S3_BUCKET_RE.fullmatch(url.netloc):
        raise ValueError(
            f"--blob-url {blob_url!r}: expected s3://bucket/prefix with a bucket name of 3-63 "
            "characters of a-z, 0-9, '.' and '-'"
        )
    query = parse_qs(url.query, keep_blank_values=True)
    unknown = set(query) - {"cache_bytes"}
    if unknown:
        raise ValueError(f"--blob-url {blob_url!r}: unknown option {sorted(unknown)[0]!r}")
    cache_bytes = DEFAULT_CACHE_BYTES
    if "cache_bytes" in query:
        (text,) = query["cache_bytes"][-1:]
        if not text.isdigit():
            raise ValueError(
                f"--blob-url {blob_url!r}: cache_bytes must be a whole number of bytes (0: none)"
            )
        cache_bytes = int(text)
    prefix = unquote(url.path).strip("/")
    if "//" in prefix or any(part in (".", "..") for part in prefix.split("/")):
        raise ValueError(f"--blob-url {blob_url!r}: the prefix has an empty, . or .. segment")
    return url.netloc, prefix, cache_bytes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mtime(entry: os.DirEntry[str]) -> float:
    try:
        return entry.stat().st_mtime
    except FileNotFoundError:
        return float("inf")
