"""``/v1/adapters``: upload (PEFT files, an archive of them, or a text prefix), list, get,
delete; always within the caller's tenant."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from adapters_store.formats import CanonicalAdapter, parse_adapter, text_adapter
from adapters_store.types import check_name
from adapters_store.validate import AdapterError, AdapterLimits, ModelShape, check_size
from server.api.archive import archive_budget, read_archive
from server.api.context import Caller, context
from server.api.errors import APIError
from server.api.schemas import TextAdapterBody
from server.async_engine import AsyncEngine

router = APIRouter()
FILE_FIELDS = ("config", "weights", "archive")


@router.post("/v1/adapters", status_code=201)
async def upload(request: Request, who: Caller) -> JSONResponse:
    ctx = context(request)
    llm = ctx.llm()
    limits = ctx.store.adapter_limits(who.tenant)  # the tenant's quota bounds the parse
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "application/json":
        name, adapter = await _text_upload(request, limits)
    elif media == "multipart/form-data":
        name, adapter = await _file_upload(request, llm.shape, limits, ctx.engine)
    else:
        raise APIError(
            415,
            f"unsupported content type {media or 'none'!r}: send multipart/form-data (PEFT "
            "files or an archive) or application/json (a text prefix)",
            code="unsupported_media_type",
        )
    record = await ctx.run_store(ctx.store.put, who.tenant, name, adapter)
    return JSONResponse(record.to_api(), status_code=201)


@router.get("/v1/adapters")
async def list_adapters(request: Request, who: Caller) -> dict:
    ctx = context(request)
    records = await ctx.run_store(ctx.store.list, who.tenant)
    return {"object": "list", "data": [r.to_api() for r in records]}


@router.get("/v1/adapters/{name}")
async def get_adapter(name: str, request: Request, who: Caller) -> dict:
    ctx = context(request)
    return (await ctx.run_store(ctx.store.get, who.tenant, name)).to_api()


@router.delete("/v1/adapters/{name}")
async def delete_adapter(name: str, request: Request, who: Caller) -> dict:
    ctx = context(request)
    record = await ctx.run_store(ctx.store.delete, who.tenant, name)
    return {"id": record.id, "object": "adapter", "deleted": True}


async def _text_upload(request: Request, limits: AdapterLimits) -> tuple[str, CanonicalAdapter]:
    try:
        body = TextAdapterBody.model_validate(json.loads(await request.body()))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, ValidationError
        raise APIError(400, _first_error(exc), code="invalid_request") from None
    return check_name(body.name), text_adapter(body.text, limits)


def _first_error(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        return f"{where}: {err['msg']}"
    return "the request body is not valid JSON"


async def _file_upload(
    request: Request, shape: ModelShape, limits: AdapterLimits, engine: AsyncEngine
) -> tuple[str, CanonicalAdapter]:
    form = await request.form(max_files=3, max_fields=3)
    try:
        unknown = sorted(set(form.keys()) - {"name", *FILE_FIELDS})
        if unknown:
            raise APIError(400, f"unexpected form field {unknown[0]!r}", param=unknown[0])
        twice = [k for k in form if len(form.getlist(k)) > 1]
        if twice:
            raise APIError(400, f"the form field {twice[0]!r} appears twice", param=twice[0])
        name = form.get("name")
        if not isinstance(name, str):
            raise APIError(400, "the form needs a 'name' field", param="name")
        check_name(name)
        files = {k: await _read(form.get(k), k, limits) for k in FILE_FIELDS if k in form}
    finally:
        await form.close()
    if "archive" in files and len(files) == 1:
        config, weights = await asyncio.to_thread(read_archive, files["archive"], limits)
    elif set(files) == {"config", "weights"}:
        config, weights = files["config"], files["weights"]
    else:
        raise APIError(
            400,
            "send either 'config' (adapter_config.json) and 'weights' "
            "(adapter_model.safetensors), or one 'archive' (.zip or .tar.gz)",
            param="config" if "archive" not in files else "archive",
        )
    # Validation and conversion run torch operators: in the engine thread, like all of them.
    adapter = await engine.call(lambda _llm: parse_adapter(config, weights, shape, limits))
    return name, adapter


async def _read(item: UploadFile | str | None, field: str, limits: AdapterLimits) -> bytes:
    """A form part's bytes, refusing one over its limit before reading it whole."""
    limit = {
        "config": limits.max_config_bytes,
        "weights": limits.max_file_bytes,
        "archive": archive_budget(limits),
    }[field]
    if isinstance(item, str):
        data = item.encode()
    elif isinstance(item, UploadFile):
        if item.size is not None:
            check_size(item.size, limit, field, field)
        # A buffered read(n) allocates n bytes up front: ask for what the part holds.
        data = await item.read(limit + 1 if item.size is None else item.size + 1)
    else:
        raise AdapterError(f"'{field}' must be a file", param=field)
    check_size(len(data), limit, field, field)
    return data
