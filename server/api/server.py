"""Running the app under uvicorn, with a drain on SIGTERM/SIGINT.

On the first signal: ``/ready`` answers 503 at once and every new request 503 (with
``Retry-After``), while requests already running (streams included) finish, for up to
``--drain-timeout`` seconds; then the server stops (what is left is aborted) and the process
exits 0. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Coroutine
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from server.api.app import create_app
from server.api.context import AppContext
from server.async_engine import AsyncEngine
from server.config import ApiKeys, ServeConfig
from server.engine_client import EngineUnavailable

if TYPE_CHECKING:
    from server.served_model import ServedModel

log = logging.getLogger(__name__)
# Idle keep-alive connections are closed after this long. uvicorn's default (5 s) equals the
# idle expiry of httpx's pool (the openai client's too): a client then reuses a connection at
# the moment the server closes it and its request fails with no response. Longer than client
# pools and load balancers (60 s) keep, so the client side always closes first.
KEEP_ALIVE_S = 75


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ctx: AppContext, drain_timeout: float) -> None:
        super().__init__(config)
        self.ctx = ctx
        self.drain_timeout = drain_timeout
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._spawn(self._watch_load())
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not uvicorn's: it would re-raise the signal after shutdown (exit status 143).
        if self.ctx.draining or self._loop is None:
            self.should_exit = self.force_exit = True
            return
        self._loop.call_soon_threadsafe(self.begin_drain)

    def begin_drain(self) -> None:
        if not self.ctx.draining:
            log.info("draining: up to %.0f s for running requests", self.drain_timeout)
            self.ctx.draining = True
            self._spawn(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout
        while self.ctx.inflight > 0 or self.ctx.engine.outstanding > 0:
            if loop.time() >= deadline:
                log.warning("drain timeout: aborting %d requests", self.ctx.engine.outstanding)
                self.ctx.engine.fail_all(EngineUnavailable("the server is shutting down"))
                break
            await asyncio.sleep(0.05)
        # Let the aborted requests' handlers answer (streams end with an error event).
        deadline = loop.time() + 2.0
        while self.ctx.inflight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.02)
        self.should_exit = True

    async def _watch_load(self) -> None:
        await self.ctx.engine.wait_loaded()
        if self.ctx.engine.load_error is not None:
            log.error("the model failed to load: %s", self.ctx.engine.load_error)
            self.exit_code = 1
            self.should_exit = True

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def torch_threads(config: ServeConfig) -> int:
    """``--torch-threads``, or the CPUs this process may really use."""
    if config.torch_threads is not None:
        return config.torch_threads
    from server.cpus import affinity_cpus, cgroup_cpu_quota, usable_cpus

    threads = usable_cpus()
    log.info(
        "torch threads: %d (affinity mask %d CPUs, cgroup quota %s)",
        threads,
        affinity_cpus(),
        cgroup_cpu_quota() or "none",
    )
    return threads


def tenant_limit(config: ServeConfig, keys: ApiKeys) -> int | None:
    """The most outstanding requests one tenant may hold: a ``--max-tenant-share`` of the
    capacity once the keys name several tenants (a single tenant may use everything)."""
    if len(keys.tenants) < 2 or config.max_tenant_share >= 1:
        return None
    capacity = config.max_num_seqs + config.max_queued_requests
    return max(1, int(capacity * config.max_tenant_share))


def build_engine(config: ServeConfig, keys: ApiKeys) -> AsyncEngine:
    """The engine, whose model loads in the engine thread once the app starts."""
    threads = torch_threads(config)

    def build() -> ServedModel:
        import torch

        from server.engine.engine import EngineConfig
        from server.served_model import load_served_model

        # In the thread that runs every torch operator: OpenMP's team size is per thread.
        torch.set_num_threads(threads)

        engine_config = EngineConfig(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            kv_cache_memory=config.kv_cache_memory,
        )
        return load_served_model(
            config.model,
            data_dir=config.data_dir,
            device=config.device,
            dtype=config.dtype,
            engine_config=engine_config,
        )

    capacity = config.max_num_seqs + config.max_queued_requests
    return AsyncEngine(build, capacity=capacity, tenant_limit=tenant_limit(config, keys))


def serve(config: ServeConfig) -> int:
    """Run until signalled; the process exit status."""
    from adapters_store.store import open_store

    keys = ApiKeys.load(config.api_keys) if config.api_keys else ApiKeys()
    store = open_store(config.data_dir, redis_url=config.redis_url, blob_url=config.blob_url)
    try:
        app = create_app(build_engine(config, keys), store, config, keys)
        uv_config = uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            timeout_graceful_shutdown=5,
            timeout_keep_alive=KEEP_ALIVE_S,
            lifespan="on",
        )
        server = DrainingServer(uv_config, app.state.ctx, config.drain_timeout)
        server.run()
        return server.exit_code
    finally:
        store.close()
