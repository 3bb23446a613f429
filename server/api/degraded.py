"""Reads while the adapter registry (Redis) is unreachable: degraded, not failed.

What this replica already holds keeps being served: the base model, and every adapter it
has resolved (``AdapterStore.held``; their content is in its tiers or in the blob store, which
does not need the registry). Such answers may be stale (another replica may have replaced or
deleted an adapter meanwhile, unannounced here), so they carry ``STALE_HEADER``. Anything the
registry alone can answer (an adapter never resolved here) and every write (upload, delete)
stays a 503 with ``Retry-After`` (``RegistryUnavailable``), so nothing is ever written without
the registry.

The handlers mark the request (``mark_stale``); the HTTP layer (``ops.HTTPLayer``) adds the
header to the response, streams included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import Request

from adapters_store.types import AdapterRecord, RegistryUnavailable

if TYPE_CHECKING:
    from server.api.context import AppContext

STALE_HEADER = "X-Prefix-Serve-Stale"
STALE_VALUE = "registry-unavailable"
_STATE_KEY = "registry_stale"


def mark_stale(request: Request) -> None:
    """The answer to ``request`` was made without the registry: send ``STALE_HEADER``."""
    setattr(request.state, _STATE_KEY, True)


def stale_header(state: dict[str, Any]) -> tuple[bytes, bytes] | None:
    """The header for a request whose scope state is ``state``, if it was marked stale."""
    if state.get(_STATE_KEY):
        return STALE_HEADER.lower().encode(), STALE_VALUE.encode()
    return None


async def list_records(ctx: AppContext, request: Request, tenant: str) -> list[AdapterRecord]:
    """The tenant's live adapters from the registry; while it is unreachable, the ones this
    replica holds, and the request is marked stale."""
    try:
        return await ctx.run_store(ctx.store.list, tenant)
    except RegistryUnavailable:
        mark_stale(request)
        return ctx.store.held(tenant)


async def get_record(ctx: AppContext, request: Request, tenant: str, name: str) -> AdapterRecord:
    """The live version of ``name`` (AdapterNotFound, or RegistryUnavailable for a name this
    replica does not hold while the registry is down); marks the request stale when the
    record came from what this replica held."""
    record, stale = await ctx.run_store(ctx.store.lookup, tenant, name)
    if stale:
        mark_stale(request)
    return record
