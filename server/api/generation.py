"""``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models`` (OpenAI's shapes)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from server.api import streaming
from server.api.context import AppContext, Caller, context
from server.api.errors import APIError
from server.api.jobs import ClientGone, Job, usage
from server.api.schemas import ChatCompletionRequest, CompletionRequest, _Generation
from server.async_engine import EngineInput
from server.config import Principal
from server.engine.request import AdapterSegment, RequestOutput, SamplingParams

router = APIRouter()
MAX_CHOICES = 64  # prompts x n of one request
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
G = TypeVar("G", bound=_Generation)


@router.get("/v1/models")
async def models(request: Request, who: Caller) -> dict:
    ctx = context(request)
    base = ctx.llm().model_id
    data = [_model(base, ctx.started, "prefix-serve", None)]
    records = await ctx.run_store(ctx.store.list, who.tenant)
    data += [_model(r.name, r.created, r.tenant, base) for r in records]
    return {"object": "list", "data": data}


def _model(model_id: str, created: int, owner: str, parent: str | None) -> dict:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": owner,
        "parent": parent,
    }


@router.post("/v1/completions")
async def completions(request: Request, who: Caller) -> Response:
    body, ctx, llm, segments = await _prepare(request, who, CompletionRequest)
    prompts = _completion_prompts(body.prompt, llm.tokenizer)
    limit = body.max_tokens or DEFAULT_COMPLETION_TOKENS
    return await _generate(ctx, request, body, who, segments, prompts, limit, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, who: Caller) -> Response:
    body, ctx, llm, segments = await _prepare(request, who, ChatCompletionRequest)
    prompt = _chat_prompt(body, llm.tokenizer)
    limit = body.token_limit
    if limit is None:  # as much as the context leaves
        used = sum(s.length for s in segments) + len(prompt)
        limit = max(1, llm.engine.max_model_len - used)
    return await _generate(ctx, request, body, who, segments, [prompt], limit, chat=True)


async def _prepare(
    request: Request, who: Principal, model: type[G]
) -> tuple[G, AppContext, Any, list[AdapterSegment]]:
    """The parts both generation routes start with, in order: the body (after auth), the
    loaded model (or 503), a cheap 429 before any costly work, the caller's adapters."""
    body = await _body(request, model)
    ctx = context(request)
    llm = ctx.llm()
    ctx.engine.check_admission(body.n)
    segments = await ctx.resolver.segments(who.tenant, body.model, llm.model_id, body.adapters)
    return body, ctx, llm, segments


async def _body(request: Request, model: type[G]) -> G:
    """The JSON body, read once the caller is authenticated (as a FastAPI body parameter it
    was parsed first: a malformed body without a key answered 400, not 401)."""
    media = request.headers.get("content-type") or "application/json"
    media = media.split(";")[0].strip().lower()
    if not (
        media == "application/json" or media.startswith("application/") and media.endswith("+json")
    ):
        raise APIError(
            400, f"the body must be application/json, not {media!r}", code="invalid_request"
        )
    raw = await request.body()
    try:
        data = json.loads(raw) if raw else None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:  # answered like FastAPI's own validation errors
        raise RequestValidationError(exc.errors()) from None


async def _generate(
    ctx: AppContext,
    request: Request,
    body: _Generation,
    who: Principal,
    segments: list[AdapterSegment],
    prompts: list[list[int]],
    max_tokens: int,
    chat: bool,
) -> Response:
    if len(prompts) * body.n > MAX_CHOICES:
        raise APIError(400, f"prompts x n must be at most {MAX_CHOICES}", param="n")
    inputs = [
        EngineInput(ids, _params(body, max_tokens, choice), segments, who.tenant)
        for ids in prompts
        for choice in range(body.n)
    ]
    meta = _Meta(body, chat)
    job = Job(ctx.engine, inputs, ctx.config.request_timeout, ctx.metrics)
    request.state.job = job  # read by the request log line
    request.state.adapter_ids = tuple(s.key[:16] for s in segments)
    request.state.stream = bool(body.stream)
    job.watch(request)
    try:
        if body.stream:
            # Wait for the first token so that a request the engine refuses still gets its
            # status code; then stream.
            first = await job.first()
            gen = streaming.events(job, first, meta, body.n, body.stops, body.include_usage)
            return StreamingResponse(gen, media_type="text/event-stream", headers=_SSE_HEADERS)
        finals = await job.results()
    except ClientGone:  # nobody is listening; nginx's "client closed request"
        return Response(status_code=499)
    return JSONResponse(_response(meta, finals, body.n))


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _Meta:
    """Fields shared by every chunk of one response."""

    def __init__(self, body: _Generation, chat: bool) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())
        self.model = body.model


def _params(body: _Generation, max_tokens: int, choice: int) -> SamplingParams:
    seed = body.seed if body.seed is None else (body.seed + choice) % 2**64
    temperature = 1.0 if body.temperature is None else body.temperature
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k,
        seed=seed,
        stop=body.stops,
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
    )


def _completion_prompts(prompt: Any, tokenizer: Any) -> list[list[int]]:
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for p in prompt:
        ids = tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "the prompt is empty", code="invalid_request", param="prompt")
        out.append(ids)
    return out


def _chat_prompt(body: ChatCompletionRequest, tokenizer: Any) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    except Exception as exc:  # jinja2 errors raised by the template itself
        raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None
    return list(ids)


def _response(meta: _Meta, finals: list[RequestOutput], n: int) -> dict:
    choices = []
    for i, out in enumerate(finals):
        choice: dict[str, Any] = {"index": i, "finish_reason": out.finish_reason}
        if meta.chat:
            choice["message"] = {"role": "assistant", "content": out.text}
            choice["logprobs"] = None
        else:
            choice["text"] = out.text
            choice["logprobs"] = None
        choices.append(choice)
    return {
        "id": meta.id,
        "object": meta.object,
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage(finals, n),
    }
