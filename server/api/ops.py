"""Operations routes (no auth): ``/health``, ``/ready``, ``/metrics``; the HTTP request
counters and the body-size limit, as ASGI middleware."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.context import AppContext, context
from server.api.degraded import stale_header
from server.api.errors import ERROR_TYPES, APIError
from server.request_log import RequestLog, log_request, request_id_from

if TYPE_CHECKING:
    from adapters_store.store import AdapterStore

router = APIRouter()
OPS_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json"})  # no key, no log line


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    alive = context(request).engine.alive
    return JSONResponse({"status": "ok" if alive else "dead"}, status_code=200 if alive else 503)


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    ctx = context(request)
    problem = None
    if ctx.draining:
        problem = "draining"
    elif ctx.engine.load_error is not None:
        problem = f"the model failed to load: {ctx.engine.load_error}"
    elif not ctx.engine.ready:
        problem = "loading the model"
    else:
        problem = await _registry_problem(ctx.store)
        if problem is None:
            ctx.registry_seen = True
        elif ctx.registry_seen:  # degraded: serving what it holds (server/api/degraded.py)
            return JSONResponse({"status": "ready", "degraded": problem})
    if problem:
        return JSONResponse(
            {"status": "not ready", "reason": problem},
            status_code=503,
            headers={"Retry-After": "5"},
        )
    return JSONResponse({"status": "ready"})


async def _registry_problem(store: AdapterStore) -> str | None:
    """None when the registry answers within 2 s.

    A registry that stops answering after it once did leaves the replica ready (200, with
    the problem under ``degraded``): it still serves the base model and the adapters it holds,
    and the registry is shared, so failing readiness would take every replica out of its load
    balancer at once and turn a registry outage into a full one. A registry never reached
    since start keeps the replica not ready (a wrong ``--redis-url`` halts a rollout)."""
    try:
        ok = await asyncio.wait_for(asyncio.to_thread(store.ping), 2.0)
    except Exception as exc:  # unreachable, timed out, misconfigured
        return f"the adapter registry does not answer: {type(exc).__name__}"
    return None if ok else "the adapter registry does not answer"


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = context(request).metrics.render()
    return Response(body, media_type=content_type)


class HTTPLayer:
    """Outermost middleware: the body-size limit (413 from ``Content-Length`` before anything
    is read, or as soon as a chunked body passes it), the in-flight count used by the drain,
    the request counter and the log line.

    When the exchange is over, the request's engine work is closed (``Job.close``: what is
    unfinished is aborted and counted) before the line is written, however the answer ended:
    a stream whose client left may not have been finalized yet."""

    def __init__(self, app: ASGIApp, get_ctx: Callable[[], AppContext]) -> None:
        self.app = app
        self.get_ctx = get_ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = self.get_ctx()
        upload = scope["path"] == "/v1/adapters" and scope["method"] == "POST"
        limit = ctx.config.max_upload_bytes if upload else ctx.config.max_request_bytes
        status: list[int] = [0]
        rid = request_id_from(scope.get("headers", ()))
        started = time.monotonic()

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                extra = [(b"x-request-id", rid.encode())]
                stale = stale_header(scope.get("state", {}))
                if stale is not None:
                    extra.append(stale)
                message["headers"] = [*message["headers"], *extra]
            await send(message)

        ops = scope["path"] in OPS_PATHS
        ctx.inflight += 0 if ops else 1
        early = None
        try:
            early = _declared_too_large(scope, limit)
            if early is not None:
                ctx.metrics.count_error(early.body()["error"]["type"])
                await early.response()(scope, receive, counted_send)
            else:
                await self.app(scope, _limited(receive, limit), counted_send)
        finally:
            ctx.inflight -= 0 if ops else 1
            job = scope.get("state", {}).get("job")
            if job is not None:
                job.close()
            # An answer given before routing is filed under the route it was sent to.
            template = _route_template(scope, routed=early is None)
            code = status[0] or 500
            ctx.metrics.count_http_request(template, code)
            if not ops:
                log_request(_log_record(scope, rid, template, code, time.monotonic() - started))


def _route_template(scope: Scope, routed: bool) -> str:
    """The template of the route that handled the request; for one answered before routing,
    the template of the app's documented route (its OpenAPI paths: every route is described)
    that the path matches, whatever the method. "unmatched" when none: templates only, never
    a raw path, so the labels stay bounded."""
    route = scope.get("route")
    if route is not None:
        return getattr(route, "path", "unmatched")
    app = scope.get("app")
    if not routed and app is not None:
        template: str  # the keys of the OpenAPI document's paths
        for template in app.openapi().get("paths", {}):
            if compile_path(template)[0].match(scope["path"]):
                return template
    return "unmatched"


def _log_record(scope: Scope, rid: str, route: str, status: int, e2e: float) -> RequestLog:
    """The request's log line: tenant and generation details from what the handlers left in
    the request state (content-hash ids of the adapters, never their names). Every engine
    request of the job is in ``job.finished`` by now, aborted ones with the tokens they had."""
    state = scope.get("state", {})
    job = state.get("job")
    finished = getattr(job, "finished", [])
    outs = [out for out, _ in finished]
    ttfts = [ttft for _, ttft in finished if ttft is not None]
    queues = [out.queue_s for out in outs if out.queue_s is not None]
    return RequestLog(
        request_id=rid,
        tenant=str(state.get("tenant", "-")),
        method=scope["method"],
        route=route,
        status=status,
        adapter_ids=tuple(state.get("adapter_ids", ())),
        prompt_tokens=sum(o.num_prompt_tokens for o in outs),
        cached_tokens=sum(o.num_cached_tokens for o in outs),
        generation_tokens=sum(len(o.token_ids) for o in outs),
        finish_reason=outs[-1].finish_reason if outs else None,
        error_type=_error_type(status, getattr(job, "error_type", None)),
        stream=bool(state.get("stream", False)),
        queue_s=max(queues) if queues else None,
        ttft_s=min(ttfts) if ttfts else None,
        e2e_s=e2e,
    )


def _error_type(status: int, stream_error: str | None) -> str | None:
    """The OpenAI error ``type`` the answer carried: every error body is made by
    ``APIError.body``, whose type follows the status; a stream's error event (status 200)
    is reported by its job. None for a 499: the client left, nothing was answered."""
    if stream_error is not None:
        return stream_error
    if status < 400 or status == 499:
        return None
    return ERROR_TYPES.get(status, "invalid_request_error")


def _declared_too_large(scope: Scope, limit: int) -> APIError | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                size = int(value)
            except ValueError:
                return APIError(400, "invalid Content-Length header", code="invalid_request")
            if size > limit:
                return _too_large(size, limit)
    return None


def _too_large(size: int | str, limit: int) -> APIError:
    return APIError(
        413, f"the request body is {size} bytes; the limit is {limit}", code="body_too_large"
    )


def _limited(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def wrapped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise StarletteHTTPException(413, _too_large(f"over {limit}", limit).message)
        return message

    return wrapped
