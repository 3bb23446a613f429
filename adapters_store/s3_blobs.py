"""Blob storage in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, Cloudflare R2, GCS's XML
API), with a bounded read-through copy on the replica's disk (``blob_cache.py``).

Layout under ``s3://<bucket>/<prefix>/``::

    objects/<sha256>.safetensors     the blobs; user metadata ``bytes-sha256``: the hash of the
                                     object's bytes, checked on every read
    trash/<sha256>.<ns>.<random>     blobs being collected (see ``collect``)

The same guarantees as ``LocalBlobStore``, from S3's own: a PUT or a completed multipart upload
appears whole or not at all, and reads, lists and HEADs after a write see it (strong
read-after-write consistency, which every store named above provides). A multipart upload is
completed only once every part is in and aborted on any failure; one cut short by a dead
process stays invisible and ``clean`` aborts it after the grace period.

boto3 is imported here, and this module only when an ``s3://`` URL is used (the ``s3`` extra).
Endpoint, region and credentials come from boto3's usual sources: ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ``~/.aws/config``, an instance or pod role.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from adapters_store.blob_cache import BlobCache
from adapters_store.blobs import SHA_RE, SUFFIX
from adapters_store.types import BlobError, StorageFull, StorageNotWritable, StorageUnavailable

MULTIPART_THRESHOLD = 64 << 20  # larger blobs go up in parts
PART_BYTES = 16 << 20  # S3's minimum part is 5 MiB (all but the last)
DIGEST_KEY = "bytes-sha256"  # x-amz-meta-bytes-sha256
MISSING = {"404", "NoSuchKey", "NotFound"}
DENIED = {
    "403",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
}
FULL = {"XMinioStorageFull", "QuotaExceeded"}  # MinIO; Ceph RGW bucket or user quota


def load_boto3(blob_url: str = "s3://...") -> Any:
    try:
        import boto3
    except ImportError:
        raise ValueError(
            f"--blob-url {blob_url}: boto3 is not installed; install the s3 extra "
            "(pip install 'prefix-serve[s3]')"
        ) from None
    return boto3


def make_client(
    connect_timeout_s: float = 3.0, read_timeout_s: float = 10.0, max_attempts: int = 3
) -> Any:
    """An S3 client from the standard AWS configuration. Timeouts and retries (attempts in
    all, with backoff) default to what answers an upload with 503 within about half a minute
    of an endpoint that stopped answering; ``AWS_MAX_ATTEMPTS`` and ``AWS_RETRY_MODE``, when
    set, win over ``max_attempts``."""
    boto3 = load_boto3()
    import botocore.session
    from botocore.config import Config

    session = botocore.session.get_session()
    session.register_component("data_loader", _service_models())
    options: dict[str, Any] = {
        "connect_timeout": connect_timeout_s,
        "read_timeout": read_timeout_s,
        "max_pool_connections": 16,
    }
    if not (os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE")):
        options["retries"] = {"mode": "standard", "total_max_attempts": max_attempts}
    return boto3.session.Session(botocore_session=session).client("s3", config=Config(**options))


@functools.cache
def _service_models() -> Any:
    """botocore's loader of service models, shared by every client of the process: the parsed
    models are read-only, and parsing them again costs each new client ~0.15 s."""
    from botocore.loaders import create_loader

    return create_loader()


class S3BlobStore:
    """Blobs as objects of one bucket under one prefix, shared by every replica; each replica
    keeps a verified local copy of what it read and wrote (``cache``; None: no copies). Same
    interface and guarantees as ``LocalBlobStore``; a blob is never modified, rewriting one
    stores identical bytes.

    Errors: StorageUnavailable (endpoint unreachable, timeouts, 5xx: 503, retry soon),
    StorageNotWritable (credentials refused, bucket gone: 503), StorageFull (the store reports
    no room: 507), BlobError (missing or corrupt blob: never served).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str,
        cache: BlobCache | None,
        *,
        client: Any = None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_bytes: int = PART_BYTES,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.cache = cache
        self.client = client if client is not None else make_client()
        self.multipart_threshold = multipart_threshold
        self.part_bytes = part_bytes
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")

    def key(self, sha: str) -> str:
        if not SHA_RE.fullmatch(sha):
            raise ValueError(f"not a sha256 hex digest: {sha!r}")
        return f"{self.prefix}objects/{sha}{SUFFIX}"

    def probe(self) -> None:
        """Check that the endpoint answers, the bucket exists and these credentials may list
        it (one request); ValueError with a one-line reason otherwise."""
        try:
            with self._errors("reach"):
                self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except StorageNotWritable as exc:  # StorageUnavailable included
            endpoint = self.client.meta.endpoint_url
            raise ValueError(f"--blob-url {self.url} (endpoint {endpoint}): {exc}") from None

    def write(self, sha: str, data: bytes) -> None:
        """Store ``data`` as blob ``sha``: one PUT, or a multipart upload completed only when
        every part is in and aborted on any failure. Either way the object appears whole or
        not at all. Keeps a copy in the local cache."""
        key = self.key(sha)
        digest = hashlib.sha256(data).hexdigest()
        with self._errors("write"):
            if len(data) <= self.multipart_threshold:
                self.client.put_object(
                    Bucket=self.bucket, Key=key, Body=data, Metadata={DIGEST_KEY: digest}
                )
            else:
                self._multipart(key, data, digest)
        if self.cache is not None:
            self.cache.put(sha, data, digest)

    def read(self, sha: str) -> bytes:
        """The bytes of blob ``sha``, from the local cache if it holds an intact copy, else from
        the bucket, checked against the digest recorded at upload (BlobError if missing or
        different: never served)."""
        key = self.key(sha)
        cached = self.cache.get(sha) if self.cache is not None else None
        if cached is not None:
            return cached
        with self._errors("read"):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=key)
            except Exception as exc:
                if _code(exc) in MISSING:
                    raise BlobError(f"blob {sha} is missing from the blob store") from None
                raise
            data: bytes = response["Body"].read()
        expected = response.get("Metadata", {}).get(DIGEST_KEY)
        actual = hashlib.sha256(data).hexdigest()
        if expected is None:
            raise BlobError(f"blob {sha} is corrupt (the object has no {DIGEST_KEY} metadata)")
        if actual != expected:
            raise BlobError(
                f"blob {sha} is corrupt (the stored object hashes to {actual}, "
                f"its upload to {expected})"
            )
        if self.cache is not None:
            self.cache.put(sha, data, actual)
        return data

    def exists(self, sha: str) -> bool:
        """Whether the bucket holds blob ``sha`` now (never answered from the cache)."""
        return self._exists(self.key(sha))

    def scan(self) -> Iterator[tuple[str, float]]:
        """(sha256, last modification in unix seconds) of every stored blob."""
        start = f"{self.prefix}objects/"
        for item in self._list(start):
            name = item["Key"][len(start) :]
            sha = name.removesuffix(SUFFIX)
            if name.endswith(SUFFIX) and SHA_RE.fullmatch(sha):
                yield sha, item["LastModified"].timestamp()

    def collect(self, sha: str, unreferenced: Callable[[], bool]) -> bool:
        """Delete blob ``sha`` if ``unreferenced()`` still holds once it is out of sight.

        S3 has no rename, so "out of sight" is: copy the object into trash/, delete it, then
        ask the registry again, and copy it back if a version names it now. As in
        ``LocalBlobStore.collect``, an upload of the same content that commits meanwhile is
        seen by one side: either this re-check finds its record (and restores the blob), or
        its own post-commit ``exists`` runs after the delete and writes the blob again
        (``AdapterStore.put``). Returns True if deleted.
        """
        key = self.key(sha)
        trashed = f"{self.prefix}trash/{sha}.{time.time_ns()}.{secrets.token_hex(4)}"
        with self._errors("collect"):
            try:
                self._copy(key, trashed)
            except Exception as exc:
                if _code(exc) in MISSING:
                    return False
                raise
            self.client.delete_object(Bucket=self.bucket, Key=key)
        try:
            keep = not unreferenced()
        except BaseException:
            self._restore(trashed, sha)
            raise
        if keep:
            self._restore(trashed, sha)
            return False
        with self._errors("collect"):
            self.client.delete_object(Bucket=self.bucket, Key=trashed)
        if self.cache is not None:
            self.cache.evict(sha)
        return True

    def clean(self, older_than: float, referenced: Callable[[str], bool]) -> int:
        """Remove what dead writers and collectors left, older than ``older_than`` (unix
        seconds): multipart uploads never completed (aborted), and trash entries (put back if
        referenced and missing). Younger ones may belong to a live process on another replica.
        Returns the count removed."""
        removed = 0
        with self._errors("clean"):
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}objects/"):
                for upload in page.get("Uploads", []):
                    if upload["Initiated"].timestamp() < older_than:
                        self._abort(upload["Key"], upload["UploadId"])
                        removed += 1
            for item in self._list(f"{self.prefix}trash/"):
                name = item["Key"].rpartition("/")[2]
                sha, _, rest = name.partition(".")
                stamp = rest.partition(".")[0]
                if not SHA_RE.fullmatch(sha) or not stamp.isdigit():
                    continue
                if int(stamp) / 1e9 >= older_than:
                    continue
                if referenced(sha) and not self.exists(sha):
                    self._restore(item["Key"], sha)
                else:
                    self.client.delete_object(Bucket=self.bucket, Key=item["Key"])
                    removed += 1
        return removed

    # -- internals

    def _multipart(self, key: str, data: bytes, digest: str) -> None:
        upload = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=key, Metadata={DIGEST_KEY: digest}
        )["UploadId"]
        try:
            parts = []
            view = memoryview(data)
            for number, start in enumerate(range(0, len(data), self.part_bytes), start=1):
                part = self.client.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload,
                    PartNumber=number,
                    Body=bytes(view[start : start + self.part_bytes]),
                )
                parts.append({"PartNumber": number, "ETag": part["ETag"]})
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            # Best effort: if the store is unreachable now, ``clean`` aborts it later.
            with contextlib.suppress(Exception):
                self._abort(key, upload)
            raise

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:
            if _code(exc) not in MISSING | {"NoSuchUpload"}:
                raise

    def _copy(self, source: str, target: str) -> None:
        # Objects up to 5 GiB copy in one request; blobs are bounded far below that by the
        # per-upload quota. Metadata (the digest) is copied with the object.
        self.client.copy_object(
            Bucket=self.bucket, Key=target, CopySource={"Bucket": self.bucket, "Key": source}
        )

    def _restore(self, trashed: str, sha: str) -> None:
        # Gone if another replica's clean() got it; the uploader's post-commit check rewrites.
        with self._errors("restore"):
            try:
                self._copy(trashed, self.key(sha))
            except Exception as exc:
                if _code(exc) in MISSING:
                    return
                raise
            self.client.delete_object(Bucket=self.bucket, Key=trashed)

    def _exists(self, key: str) -> bool:
        with self._errors("check"):
            try:
                self.client.head_object(Bucket=self.bucket, Key=key)
            except Exception as exc:
                if _code(exc) in MISSING:
                    return False
                raise
        return True

    def _list(self, prefix: str) -> Iterator[dict[str, Any]]:
        with self._errors("list"):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                yield from page.get("Contents", [])

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """botocore's exceptions -> the store's typed errors, each with a one-line message."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            yield
        except ClientError as exc:
            code = _code(exc)
            detail = exc.response.get("Error", {}).get("Message") or code
            if code == "NoSuchBucket" or (code == "404" and action == "reach"):
                raise StorageNotWritable(
                    f"S3 bucket {self.bucket!r} does not exist at this endpoint"
                ) from None
            if code in DENIED:
                raise StorageNotWritable(
                    f"S3 refused the credentials or access to bucket {self.bucket!r} ({code}: "
                    f"{detail}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the policy"
                ) from None
            if code in FULL:
                raise StorageFull(
                    f"adapter storage is full (S3 {code}: {detail}); free space or delete "
                    "adapters, then upload again"
                ) from None
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status >= 500 or code in {"SlowDown", "RequestTimeout", "Throttling"}:
                raise StorageUnavailable(
                    f"adapter storage (S3 bucket {self.bucket!r}) failed to {action} "
                    f"({code}: {detail}); retry later"
                ) from None
            raise
        except NoCredentialsError:
            raise StorageNotWritable(
                "no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or give the pod a role)"
            ) from None
        except BotoCoreError as exc:  # connection refused or reset, timeouts, short reads
            raise StorageUnavailable(
                f"adapter storage (S3 bucket {self.bucket!r}) is unreachable: {exc}; retry later"
            ) from None


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def probe_s3_url(blob_url: str) -> None:
    """Check ``s3://bucket/prefix`` before a server starts: boto3 installed, endpoint reached,
    bucket there, credentials accepted; ValueError with a one-line reason otherwise."""
    from adapters_store.blobs import parse_s3_url

    bucket, prefix, _ = parse_s3_url(blob_url)
    S3BlobStore(bucket, prefix, None, client=make_client()).probe()


def open_s3_blobs(
    bucket: str, prefix: str, cache_dir: str | os.PathLike[str], cache_bytes: int
) -> S3BlobStore:
    """The store for ``s3://bucket/prefix`` with its cache in ``cache_dir``; no request yet."""
    return S3BlobStore(bucket, prefix, BlobCache(Path(cache_dir), cache_bytes))
