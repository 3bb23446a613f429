"""``/v1/adapters``: upload (PEFT files, an archive of them, or a text prefix), list, get,
delete; always within the caller's tenant.

Memory. A multipart upload arrives on disk: Starlette spools every file part over 1 MiB to a
temporary file. Its bytes enter memory only when it is processed (read, parsed and converted
in the engine thread, stored), and only under a lease of the app's ``UploadBudget``: the bytes
of uploads being processed at once are bounded, whatever the number of uploads in flight.
Processing an upload takes 3 to 6 times its charged bytes (the file, the tensor decoded from
it, its float32 canonical form, the encoded blob; the most for float16 files), so the server's
upload memory peaks at about 6x the budget.

Two things would keep an upload's bytes alive after its lease ends, and both are undone here:
a failed upload's traceback holds its frames (the bytes, the tensors), usually in a reference
cycle only the garbage collector breaks, so the error is answered and its frames cleared
inside the lease; and the engine thread keeps its last command (the function, and the future
with its result) until the next one, so the bytes go into the engine thread and the adapter
comes out through a box emptied here (``_engine_call``).
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from adapters_store.formats import CanonicalAdapter, parse_adapter, text_adapter
from adapters_store.types import AdapterNotFound, AdapterRecord, check_name
from adapters_store.validate import AdapterError, AdapterLimits, ModelShape, check_size
from server.api import degraded
from server.api.archive import archive_budget, read_archive
from server.api.context import Caller, context
from server.api.errors import APIError, to_api_error
from server.api.json_body import read_json
from server.api.schemas import TextAdapterBody
from server.api.upload_budget import Lease
from server.engine_client import EngineClient
from server.served_model import ServedModel

router = APIRouter()
T = TypeVar("T")
FILE_FIELDS = ("config", "weights", "archive")


@router.post("/v1/adapters", status_code=201)
async def upload(request: Request, who: Caller) -> JSONResponse:
    ctx = context(request)
    shape = ctx.model().facts.shape
    limits = ctx.store.adapter_limits(who.tenant)  # the tenant's quota bounds the parse
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in ("application/json", "multipart/form-data"):
        raise APIError(
            415,
            f"unsupported content type {media or 'none'!r}: send multipart/form-data (PEFT "
            "files or an archive) or application/json (a text prefix)",
            code="unsupported_media_type",
        )
    error: APIError | None = None
    async with ctx.uploads.lease(who.tenant) as lease:
        try:
            record, replaced = await _store_upload(request, media, who.tenant, shape, limits, lease)
        except Exception as exc:  # answered from here: see the module docstring
            error = to_api_error(exc)
            _clear_frames(exc)
    if error is not None:
        raise error
    body = record.to_api()
    if replaced is not None:  # allowed, but a client of the old kind should hear of it
        body["replaced_kind"] = replaced
    return JSONResponse(body, status_code=201)


@router.get("/v1/adapters")
async def list_adapters(request: Request, who: Caller) -> dict[str, Any]:
    ctx = context(request)
    records = await degraded.list_records(ctx, request, who.tenant)
    return {"object": "list", "data": [r.to_api() for r in records]}


@router.get("/v1/adapters/{name}")
async def get_adapter(name: str, request: Request, who: Caller) -> dict[str, Any]:
    ctx = context(request)
    return (await degraded.get_record(ctx, request, who.tenant, name)).to_api()


@router.get("/v1/adapters/{name}/versions")
async def adapter_versions(name: str, request: Request, who: Caller) -> dict[str, Any]:
    """The kept versions of a live name, oldest first (each one pinnable as ``name@N``)."""
    ctx = context(request)
    await ctx.run_store(ctx.store.get, who.tenant, name)  # a deleted name has none to pin
    records = await ctx.run_store(ctx.store.versions, who.tenant, name)
    return {"object": "list", "data": [r.to_api() for r in records]}


@router.delete("/v1/adapters/{name}")
async def delete_adapter(name: str, request: Request, who: Caller) -> dict[str, Any]:
    ctx = context(request)
    record = await ctx.run_store(ctx.store.delete, who.tenant, name)
    return {"id": record.id, "object": "adapter", "deleted": True}


async def _store_upload(
    request: Request,
    media: str,
    tenant: str,
    shape: ModelShape,
    limits: AdapterLimits,
    lease: Lease,
) -> tuple[AdapterRecord, str | None]:
    """Read, validate and store one upload, its bytes in memory only under ``lease``; the
    kind of the version it replaced, when that differs from the new one's."""
    ctx = context(request)
    if media == "application/json":
        body_limit = ctx.config.max_request_bytes
        name, adapter = await _text_upload(request, tenant, limits, lease, body_limit)
    else:
        name, adapter = await _file_upload(request, shape, limits, ctx.engine, lease)
    if adapter.kind == "text":  # its size in tokens, as the engine will place it
        count = await ctx.run_cpu(_count_tokens, ctx.model().tokenizer, adapter.text)
        adapter = replace(adapter, num_virtual_tokens=count)
    try:
        previous = await ctx.run_store(ctx.store.get, tenant, name)
    except AdapterNotFound:
        previous = None
    record = await ctx.run_store(ctx.store.put, tenant, name, adapter)
    changed = previous is not None and previous.kind != record.kind
    return record, previous.kind if changed else None  # type: ignore[union-attr]


def _count_tokens(tokenizer: Any, text: str) -> int:
    """Runs in the worker pool: the text's tokens, as ``to_segment`` makes them."""
    return len(tokenizer.encode(text, add_special_tokens=False))


async def _text_upload(
    request: Request, tenant: str, limits: AdapterLimits, lease: Lease, body_limit: int
) -> tuple[str, CanonicalAdapter]:
    """A JSON ``{"name", "text"}`` body. It is a JSON request like any other, so it is bounded
    by ``--max-request-bytes`` (a text prefix is at most 100,000 characters), not by the upload
    limit; ``read_json`` refuses nesting past its depth, bodies of millions of values and lone
    surrogates with 400."""
    raw = await _json_body(request, body_limit)
    await lease.acquire(len(raw))
    data = await read_json(context(request).json_lane, raw, tenant)
    try:
        body = TextAdapterBody.model_validate(data)
    except ValidationError as exc:
        where, message = _first_error(exc)
        raise APIError(400, message, code="invalid_request", param=where) from None
    return check_name(body.name), text_adapter(body.text, limits)


async def _json_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes: before reading when the
    declared length is over, else as soon as the bytes received pass it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _body_too_large(declared, limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _body_too_large(f"over {limit}", limit)
    return bytes(body)


def _body_too_large(size: str, limit: int) -> APIError:
    return APIError(
        413, f"the request body is {size} bytes; the limit is {limit}", code="body_too_large"
    )


def _first_error(exc: ValidationError) -> tuple[str | None, str]:
    """(the field at fault or None for the body, a message naming it)."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or None
    return where, f"{where or 'body'}: {err['msg']}"


async def _file_upload(
    request: Request, shape: ModelShape, limits: AdapterLimits, engine: EngineClient, lease: Lease
) -> tuple[str, CanonicalAdapter]:
    form = await request.form(max_files=3, max_fields=3)  # file parts over 1 MiB: on disk
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
        parts = {k: form.get(k) for k in FILE_FIELDS if k in form}
        # Sizes are known from the spooled parts: refuse an oversized one before waiting.
        charge = sum(_part_size(item, k, limits) for k, item in parts.items())
        if "archive" in parts:  # the files it may extract, held beside it
            charge += limits.max_file_bytes + limits.max_config_bytes
        await lease.acquire(charge)
        files = {k: await _read(item, k, limits) for k, item in parts.items()}
    finally:
        await form.close()
    if "archive" in files and len(files) == 1:
        archive = files.pop("archive")
        config, weights = await asyncio.to_thread(read_archive, archive, limits)
        del archive
        lease.shrink(len(config) + len(weights))
    elif set(files) == {"config", "weights"}:
        config, weights = files.pop("config"), files.pop("weights")
    else:
        raise APIError(
            400,
            "send either 'config' (adapter_config.json) and 'weights' "
            "(adapter_model.safetensors), or one 'archive' (.zip or .tar.gz)",
            param="config" if "archive" not in files else "archive",
        )
    # Validation and conversion run torch operators: in the engine thread, like all of them.
    adapter = await _engine_call(engine, parse_adapter, config, weights, shape, limits)
    return name, adapter


async def _engine_call(engine: EngineClient, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in the engine thread. The arguments and the result travel in a box that
    is empty when this returns: the engine loop keeps its last command (this function, its
    future) until the next command arrives, which must not pin an upload's bytes or tensors."""
    box: list[Any] = [args]

    def run(_model: ServedModel) -> None:
        call_args = box.pop()
        box.append(fn(*call_args))

    try:
        await engine.call(run)
        result: T = box.pop()
        return result
    finally:
        box.clear()


def _clear_frames(exc: BaseException) -> None:
    """Drop the locals of every finished frame in the tracebacks of ``exc``, its cause and its
    context: a failed upload's bytes and tensors are held there, often in a reference cycle
    (an exception kept in a local of a frame it passed through) that only the garbage collector
    would break, long after the upload's lease has let the next one in."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        traceback.clear_frames(item.__traceback__)  # skips frames still running
        stack += [item.__cause__, item.__context__]


def _part_limit(field: str, limits: AdapterLimits) -> int:
    return {
        "config": limits.max_config_bytes,
        "weights": limits.max_file_bytes,
        "archive": archive_budget(limits),
    }[field]


def _part_size(item: Any, field: str, limits: AdapterLimits) -> int:
    """A form part's size before it is read (its limit if unknown); refuses a part that is
    not a file or is over its limit."""
    limit = _part_limit(field, limits)
    if isinstance(item, str):
        size = len(item.encode())
    elif isinstance(item, UploadFile):
        size = limit if item.size is None else item.size
    else:
        raise AdapterError(f"'{field}' must be a file", param=field)
    check_size(size, limit, field, field)
    return size


async def _read(item: UploadFile | str | None, field: str, limits: AdapterLimits) -> bytes:
    """A form part's bytes, refusing one over its limit before reading it whole."""
    limit = _part_limit(field, limits)
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
