"""What every handler needs, built once per app (no module-level state) and the auth check."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from fastapi import Depends, Request

from server.api.errors import APIError
from server.api.json_body import JsonLane
from server.api.prompt_limits import PromptLimits
from server.api.resolver import AdapterResolver
from server.api.upload_budget import UploadBudget
from server.config import ApiKeys, Principal, ServeConfig
from server.engine_client import EngineClient, EngineUnavailable
from server.metrics import Metrics
from server.served_model import ServedModel

if TYPE_CHECKING:
    from adapters_store.store import AdapterStore

OPEN_MODE = Principal("default", admin=True)
CPU_WORKERS = 2  # threads of the pool that tokenizes and templates prompts
T = TypeVar("T")


def _cpu_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(CPU_WORKERS, thread_name_prefix="prefix-serve-cpu")


@dataclass
class AppContext:
    """The app's collaborators. ``draining`` flips once, on SIGTERM. ``close()`` when the app
    stops."""

    engine: EngineClient
    store: AdapterStore
    config: ServeConfig
    keys: ApiKeys
    resolver: AdapterResolver
    metrics: Metrics
    uploads: UploadBudget  # bytes of uploads processed at once (--max-upload-memory)
    started: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    inflight: int = 0  # HTTP requests being handled (ops routes excluded)
    registry_seen: bool = False  # /ready found the registry answering once (ops.ready)
    cpu: ThreadPoolExecutor = field(default_factory=_cpu_pool)
    json_lane: JsonLane = field(default_factory=JsonLane)  # bodies of many values parse there
    prompt_limits: PromptLimits | None = None  # set at the first generation request

    async def run_store(self, fn: Callable[..., T], *args: Any) -> T:
        """Store calls block (SQLite, Redis, blob I/O): run them in a worker thread."""
        return await asyncio.to_thread(fn, *args)

    async def run_cpu(self, fn: Callable[..., T], *args: Any) -> T:
        """CPU work of a handler (tokenizing, chat templates) in the app's small pool, so that
        the event loop keeps answering every other request meanwhile; at most ``CPU_WORKERS``
        such jobs run at once, the rest wait their turn.

        Never torch work: a thread that runs a torch operator starts an OpenMP team of its own,
        and the engine's steps slow down for as long as it lives (``AsyncEngine.call``). The
        tokenizers' Rust code and jinja are not torch, and return plain lists here."""
        return await asyncio.get_running_loop().run_in_executor(self.cpu, fn, *args)

    async def close(self) -> None:
        """Stop the pool and the JSON parser process; jobs not started are dropped (their
        requests are gone)."""
        self.cpu.shutdown(wait=False, cancel_futures=True)
        await self.json_lane.close()

    def model(self) -> ServedModel:
        """The loaded model, or 503 while it is loading. Handlers read its ``facts`` and its
        ``tokenizer`` only: its engine is the engine thread's."""
        served = self.engine.served
        if self.engine.load_error is not None:
            raise EngineUnavailable(f"the model failed to load: {self.engine.load_error}")
        if not self.engine.ready or served is None:
            raise EngineUnavailable("the model is still loading")
        return served


def context(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx  # set by create_app; Starlette's state is untyped
    return ctx


async def principal(request: Request) -> Principal:
    """Authenticate (``Authorization: Bearer KEY``) and refuse new work while draining.

    The tenant returned here is the only source of a request's namespace: nothing in the body
    can name another one. ``async`` only so that FastAPI calls it inline, not in a thread."""
    ctx = context(request)
    if ctx.draining:
        raise APIError(503, "the server is shutting down", code="draining", retry_after=5)
    if not ctx.keys.enabled:
        request.state.tenant = OPEN_MODE.tenant
        return OPEN_MODE
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(
            401, "missing API key: send 'Authorization: Bearer KEY'", code="missing_api_key"
        )
    found = ctx.keys.lookup(key.strip())
    if found is None:
        raise APIError(401, "invalid API key", code="invalid_api_key")
    request.state.tenant = found.tenant
    return found


Caller = Annotated[Principal, Depends(principal)]
