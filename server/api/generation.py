"""``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models`` (OpenAI's shapes)."""

from __future__ import annotations

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
from server.api.json_body import load_json
from server.api.prompt_limits import PromptLimits, check_text_bytes, prompt_limits
from server.api.schemas import ChatCompletionRequest, CompletionRequest, _Generation
from server.config import Principal
from server.engine.request import AdapterSegment, RequestOutput, SamplingParams
from server.engine_client import EngineInput
from server.served_model import ServedModel

router = APIRouter()
MAX_CHOICES = 64  # prompts x n of one request
MAX_MESSAGES = 1024  # ChatCompletionRequest.messages' own limit
MAX_CONTENT_PARTS = 4096  # chat content parts of one request, all messages together
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
G = TypeVar("G", bound=_Generation)


@router.get("/v1/models")
async def models(request: Request, who: Caller) -> dict:
    ctx = context(request)
    base = ctx.model().facts.model_id
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
    body, ctx, model, limits, segments = await _prepare(request, who, CompletionRequest)
    prompts = await _completion_prompts(ctx, body.prompt, model.tokenizer, limits)
    limit = body.max_tokens or DEFAULT_COMPLETION_TOKENS
    return await _generate(ctx, request, body, who, segments, prompts, limit, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, who: Caller) -> Response:
    body, ctx, model, limits, segments = await _prepare(request, who, ChatCompletionRequest)
    prompt = await _chat_prompt(ctx, body, model.tokenizer, limits)
    limit = body.token_limit
    if limit is None:  # as much as the context leaves
        used = sum(s.length for s in segments) + len(prompt)
        limit = max(1, limits.context - used)
    return await _generate(ctx, request, body, who, segments, [prompt], limit, chat=True)


async def _prepare(
    request: Request, who: Principal, model: type[G]
) -> tuple[G, AppContext, ServedModel, PromptLimits, list[AdapterSegment]]:
    """The parts both generation routes start with, in order: the body parsed (after auth),
    the loaded model (or 503), the body validated against the model's limits, a cheap 429
    before any costly work, the caller's adapters."""
    data = load_json(await _raw_body(request))
    ctx = context(request)
    served = ctx.model()
    limits = await _prompt_limits(ctx, served)
    body = _validate(model, data, limits)
    ctx.engine.check_admission(body.n, who.tenant)
    base_id = served.facts.model_id
    segments = await ctx.resolver.segments(who.tenant, body.model, base_id, body.adapters)
    return body, ctx, served, limits, segments


async def _raw_body(request: Request) -> bytes:
    """The body's bytes, read once the caller is authenticated (as a FastAPI body parameter
    it was parsed first: a malformed body without a key answered 400, not 401)."""
    media = request.headers.get("content-type") or "application/json"
    media = media.split(";")[0].strip().lower()
    if not (
        media == "application/json" or media.startswith("application/") and media.endswith("+json")
    ):
        raise APIError(
            400, f"the body must be application/json, not {media!r}", code="invalid_request"
        )
    return await request.body()


def _validate(model: type[G], data: Any, limits: PromptLimits) -> G:
    """``data`` as ``model``, after refusing the lists whose validation alone would hold the
    event loop for a second (pydantic spends microseconds on each item of a token-id list or
    each content part, and 8 MiB holds millions): none of them could be served anyway."""
    if isinstance(data, dict):
        if model is CompletionRequest:
            _check_prompt_lists(data.get("prompt"), limits)
        elif model is ChatCompletionRequest:
            _check_content_parts(data.get("messages"))
    try:
        return model.model_validate(data)
    except ValidationError as exc:  # answered like FastAPI's own validation errors
        raise RequestValidationError(exc.errors()) from None


def _check_prompt_lists(prompt: Any, limits: PromptLimits) -> None:
    if not isinstance(prompt, list) or not prompt:
        return
    if isinstance(prompt[0], int):
        if len(prompt) > limits.context:
            raise APIError(
                400,
                f"the prompt is {len(prompt)} token ids; at most {limits.context} fit the context",
                code="invalid_request",
                param="prompt",
            )
        return
    if len(prompt) > MAX_CHOICES:
        raise APIError(
            400,
            f"the request has {len(prompt)} prompts; at most {MAX_CHOICES}",
            code="invalid_request",
            param="prompt",
        )
    for i, ids in enumerate(prompt):
        if isinstance(ids, list) and len(ids) > limits.context:
            raise APIError(
                400,
                f"prompt {i} is {len(ids)} token ids; at most {limits.context} fit the context",
                code="invalid_request",
                param="prompt",
            )


def _check_content_parts(messages: Any) -> None:
    if not isinstance(messages, list):
        return
    parts = sum(
        len(m["content"])
        for m in messages[:MAX_MESSAGES]
        if isinstance(m, dict) and isinstance(m.get("content"), list)
    )
    if parts > MAX_CONTENT_PARTS:
        raise APIError(
            400,
            f"the messages have {parts} content parts; at most {MAX_CONTENT_PARTS}",
            code="invalid_request",
            param="messages",
        )


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


# Prompt limits ------------------------------------------------------------------------------
async def _prompt_limits(ctx: AppContext, model: ServedModel) -> PromptLimits:
    """The loaded model's limits, computed once, in the worker pool, at its first request."""
    if ctx.prompt_limits is None:
        ctx.prompt_limits = await ctx.run_cpu(prompt_limits, model)
    return ctx.prompt_limits


# Tokens ---------------------------------------------------------------------------------------
async def _completion_prompts(
    ctx: AppContext, prompt: Any, tokenizer: Any, limits: PromptLimits
) -> list[list[int]]:
    """Token ids of each prompt; text is tokenized in the worker pool, and only once its
    size shows it may fit the context."""
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        prompt = [prompt]
    texts = [p for p in prompt if isinstance(p, str)]
    check_text_bytes(texts, limits, "prompt")
    encoded = iter(await ctx.run_cpu(_encode, tokenizer, texts) if texts else ())
    out = []
    for p in prompt:
        ids = next(encoded) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "the prompt is empty", code="invalid_request", param="prompt")
        out.append(ids)
    return out


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Runs in the worker pool: plain lists of ints (no tensors: no torch in this thread)."""
    return [tokenizer.encode(text, add_special_tokens=True) for text in texts]


async def _chat_prompt(
    ctx: AppContext, body: ChatCompletionRequest, tokenizer: Any, limits: PromptLimits
) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    check_text_bytes([m["content"] for m in messages], limits, "messages")
    return await ctx.run_cpu(_apply_template, tokenizer, messages)


def _apply_template(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Runs in the worker pool: jinja, then the tokenizer; ``return_dict`` without
    ``return_tensors`` gives lists, never tensors."""
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
