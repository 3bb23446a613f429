"""The app factory: one FastAPI app around an engine, a store and a configuration."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import FastAPI

from server.api import adapters, admin, generation, ops
from server.api.context import AppContext
from server.api.errors import install_error_handlers
from server.api.openapi import build_openapi
from server.api.resolver import AdapterResolver
from server.api.upload_budget import UploadBudget
from server.config import ApiKeys, ServeConfig
from server.engine_client import EngineClient
from server.metrics import Metrics
from server.served_model import ServedModel

if TYPE_CHECKING:
    from adapters_store.store import AdapterStore

log = logging.getLogger(__name__)


def create_app(
    engine: EngineClient,
    store: AdapterStore,
    config: ServeConfig,
    keys: ApiKeys | None = None,
) -> FastAPI:
    """An app serving ``engine`` (started with the app, in its own thread, and stopped with it)
    and ``store`` (owned by the caller). ``keys`` defaults to ``config.api_keys``'s file; no
    keys means open single-tenant mode (tenant ``default``)."""
    if keys is None:
        keys = ApiKeys.load(config.api_keys) if config.api_keys else ApiKeys()
    resolver = AdapterResolver(store, lambda: _loaded(engine).tokenizer)
    metrics = Metrics(engine.snapshot, store, admissions=engine.admission_counts)
    uploads = UploadBudget(config.max_upload_memory)
    ctx = AppContext(engine, store, config, keys, resolver, metrics, uploads)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start(asyncio.get_running_loop())
        store.subscribe(resolver.on_store_event)
        try:
            yield
        finally:
            engine.stop()
            await ctx.close()

    app = FastAPI(
        title="prefix-serve",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",  # no auth, like /health
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    app.include_router(ops.router)
    app.include_router(generation.router)
    app.include_router(adapters.router)
    app.include_router(admin.router)
    document = build_openapi(app, auth=keys.enabled)  # checks that every route is described
    app.openapi = lambda: document  # type: ignore[method-assign]
    app.add_middleware(ops.HTTPLayer, get_ctx=lambda: ctx)
    return app


def _loaded(engine: EngineClient) -> ServedModel:
    """The served model; only asked for once a handler has seen it loaded."""
    assert engine.served is not None, "the model is not loaded"
    return engine.served
