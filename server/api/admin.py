"""``/v1/admin``: what an admin key may do across tenants (``"admin": true`` in the API keys
file; in open mode the one caller is admin): list every tenant with its usage and quota, list
any tenant's adapters, delete any tenant's adapter. Any other key gets 403 on these routes,
whatever tenant they name, so they tell a non-admin nothing about other tenants.

An admin key is still a tenant like any other everywhere else: its generation requests, its
``/v1/adapters`` and its prefix-cache namespace are its own tenant's; no adapter or cached KV of
another tenant is ever used for it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from adapters_store.types import Quota, TenantUsage, check_tenant
from server.api.context import OPEN_MODE, AppContext, Caller, context
from server.api.errors import APIError
from server.config import Principal

router = APIRouter()


async def admin_principal(who: Caller) -> Principal:
    """The caller, if its key is an admin key; 403 otherwise (after 401 and draining)."""
    if not who.admin:
        raise APIError(
            403,
            'this route needs an admin API key ("admin": true in the API keys file)',
            code="admin_required",
        )
    return who


Admin = Annotated[Principal, Depends(admin_principal)]


@router.get("/v1/admin/tenants")
async def list_tenants(request: Request, _admin: Admin) -> dict[str, Any]:
    """Every tenant that has an API key or stores adapters, sorted by id. ``stored_bytes``
    is what the byte quota counts: every version not yet collected."""
    ctx = context(request)
    found = {u.tenant: u for u in await ctx.run_store(ctx.store.tenants)}
    for tenant in _key_tenants(ctx):
        found.setdefault(tenant, TenantUsage(tenant, 0, 0))
    data = [_tenant_object(found[t], ctx.store.quotas.for_tenant(t)) for t in sorted(found)]
    return {"object": "list", "data": data}


@router.get("/v1/admin/tenants/{tenant}/adapters")
async def list_tenant_adapters(tenant: str, request: Request, _admin: Admin) -> dict[str, Any]:
    """The tenant's live adapters, as ``GET /v1/adapters`` shows them to the tenant."""
    ctx = context(request)
    records = await ctx.run_store(ctx.store.list, _checked(tenant))
    return {"object": "list", "data": [r.to_api() for r in records]}


@router.delete("/v1/admin/tenants/{tenant}/adapters/{adapter}")
async def delete_tenant_adapter(
    tenant: str, adapter: str, request: Request, _admin: Admin
) -> dict[str, Any]:
    """Hide every version of the tenant's adapter, as the tenant's own delete does (its bytes
    count against the tenant's quota until they are collected)."""
    ctx = context(request)
    record = await ctx.run_store(ctx.store.delete, _checked(tenant), adapter)
    return {"id": record.id, "object": "adapter", "deleted": True}


def _checked(tenant: str) -> str:
    try:
        return check_tenant(tenant)
    except ValueError:  # the input is not echoed: it may be long or unprintable
        raise APIError(
            400,
            "invalid tenant: expected 1 to 128 printable ASCII characters, no spaces",
            code="invalid_tenant",
            param="tenant",
        ) from None


def _key_tenants(ctx: AppContext) -> set[str]:
    if not ctx.keys.enabled:
        return {OPEN_MODE.tenant}
    return {principal.tenant for principal in ctx.keys.by_digest.values()}


def _tenant_object(usage: TenantUsage, quota: Quota) -> dict[str, Any]:
    return {
        "object": "tenant",
        "id": usage.tenant,
        "adapters": usage.adapters,
        "stored_bytes": usage.stored_bytes,
        "quota": {
            "max_adapters": quota.max_adapters,
            "max_total_bytes": quota.max_total_bytes,
            "max_virtual_tokens": quota.max_virtual_tokens,
            "max_upload_bytes": quota.max_upload_bytes,
        },
    }


# Responses, for the OpenAPI document only (the handlers build these shapes as dicts).


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TenantQuota(_Shape):
    max_adapters: int = Field(ge=1)
    max_total_bytes: int = Field(ge=1)
    max_virtual_tokens: int = Field(ge=1)
    max_upload_bytes: int = Field(ge=1)


class Tenant(_Shape):
    object: Literal["tenant"]
    id: str
    adapters: int = Field(ge=0, description="Live adapters (what max_adapters counts).")
    stored_bytes: int = Field(
        ge=0,
        description="Stored bytes of every version not yet collected, replaced and deleted "
        "ones included (what max_total_bytes counts).",
    )
    quota: TenantQuota


class TenantList(_Shape):
    object: Literal["list"]
    data: list[Tenant]


RESPONSE_MODELS = (TenantList,)
