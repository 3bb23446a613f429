"""Plain data and errors shared by the adapter store and its users (API, engine).

No torch here: the registry and the HTTP layer import this without loading a model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
TENANT_RE = re.compile(r"^[\x21-\x7e]{1,128}$")


@dataclass(frozen=True, slots=True)
class AdapterRecord:
    """Registry metadata of one adapter version. ``id`` is server-made and unique per version;
    ``sha256`` is the canonical content hash (``CanonicalAdapter.sha256``), which also names the
    blob and the adapter's prefix-cache namespace."""

    id: str
    tenant: str
    name: str
    kind: str  # prefix_tuning | prompt_tuning | p_tuning | text
    num_virtual_tokens: int
    version: int
    sha256: str
    size_bytes: int
    created: int  # unix seconds

    def to_api(self) -> dict[str, Any]:
        """The adapter object of docs/api.md."""
        return {
            "id": self.id,
            "object": "adapter",
            "name": self.name,
            "kind": self.kind,
            "num_virtual_tokens": self.num_virtual_tokens,
            "version": self.version,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "created": self.created,
            "owned_by": self.tenant,
        }


class StoreError(Exception):
    """Base of the store's typed errors; ``status`` is the HTTP status the API maps it to."""

    status = 500


class AdapterNotFound(StoreError):
    """No such adapter for this tenant (another tenant's adapter is reported the same way)."""

    status = 404


class InvalidName(StoreError):
    status = 400


class QuotaExceeded(StoreError):
    """A per-tenant limit (adapter count, total bytes, upload size) would be passed."""

    status = 413


class WriteConflict(StoreError):
    status = 409


class RegistryUnavailable(StoreError):
    """The registry (e.g. Redis) did not answer in time; retry later."""

    status = 503
    retry_after = 2


class StorageFull(StoreError):
    """The blob location has no room left (ENOSPC, EDQUOT, EFBIG); nothing was written.
    Answered 507: retrying does not help until an operator frees space."""

    status = 507


class StorageNotWritable(StoreError):
    """The blob location refuses writes (read-only file system, permission denied); nothing
    was written. Answered 503 with ``Retry-After``: a remount or permission fix clears it."""

    status = 503
    retry_after = 30


class StorageUnavailable(StorageNotWritable):
    """The blob store did not answer (an S3 endpoint down, timing out or failing with 5xx);
    nothing was written (or read). Answered 503 with a short ``Retry-After``: it clears by
    itself. Adapters already held in memory keep serving meanwhile."""

    retry_after = 5


class BlobError(StoreError):
    """The stored blob of an adapter version is missing or fails its sha256 check. Such a blob
    is never served; the adapter must be uploaded again."""

    status = 500


@dataclass(frozen=True)
class Quota:
    """One tenant's limits. ``max_adapters`` counts live adapters (newest version of each
    name); ``max_total_bytes`` counts the stored size of every version not yet collected: live
    ones, and those replaced or deleted within the collection grace period, each version its
    own size. ``max_upload_bytes`` bounds one stored adapter (its blob: weights + config)."""

    max_adapters: int = 1000
    max_total_bytes: int = 8 * 2**30
    max_virtual_tokens: int = 512
    max_upload_bytes: int = 256 * 2**20


@dataclass(frozen=True, slots=True)
class TenantUsage:
    """What one tenant holds, as its quota counts it: ``adapters`` live adapters, and
    ``stored_bytes`` of every version not yet collected (live, replaced or deleted)."""

    tenant: str
    adapters: int
    stored_bytes: int


@dataclass(frozen=True)
class TenantQuotas:
    """``default`` for every tenant, unless ``per_tenant`` names one."""

    default: Quota = Quota()
    per_tenant: Mapping[str, Quota] = field(default_factory=dict)

    def for_tenant(self, tenant: str) -> Quota:
        return self.per_tenant.get(tenant, self.default)


def check_tenant(tenant: str) -> str:
    """Tenants come from server configuration (API keys), so a bad one is a bug, not input."""
    if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
        raise ValueError(f"invalid tenant {tenant!r}: expected 1-128 printable characters")
    return tenant


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidName(
            f"invalid adapter name {name!r}: use 1-64 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name
