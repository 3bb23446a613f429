"""Real uvicorn servers on free loopback ports, driven by the official ``openai`` client and
httpx. Models: a tiny random Llama with the default model's tokenizer (fast: routes, errors,
lifecycle) and the real default model (greedy output equals PEFT's)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from adapters_store.store import open_store
from adapters_store.types import Quota, TenantQuotas
from server.api import create_app
from server.async_engine import AsyncEngine
from server.config import ApiKeys, ServeConfig
from server.engine.engine import EngineConfig
from server.llm import LLM
from server.model_loader import resolve_model_dir

DATA_DIR = Path(os.environ.get("PREFIX_SERVE_TEST_DATA_DIR", "data"))
TINY_ID = "tiny-llama"
KEYS = {"acme": "key-acme", "globex": "key-globex"}


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    return resolve_model_dir("default", DATA_DIR)[0]


@pytest.fixture(scope="session")
def tiny_model_dir(default_model_dir: Path, tmp_path_factory) -> Path:
    """2 layers, hidden 64, GQA 4/2, the default model's tokenizer and chat template."""
    out = tmp_path_factory.mktemp("tiny-model")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (default_model_dir / name).is_file():
            shutil.copy(default_model_dir / name, out / name)
    (out / "prefix_serve_model_id").write_text(TINY_ID)
    return out


def make_llm(model_dir: Path, **engine) -> LLM:
    engine.setdefault("kv_cache_memory", 64 << 20)
    return LLM(
        str(model_dir),
        data_dir=DATA_DIR,
        device="cpu",
        dtype="float32",
        engine_config=EngineConfig(**engine),
    )


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir: Path) -> LLM:
    return make_llm(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_ref(tiny_model_dir: Path):
    """A second copy of the tiny model (PEFT adapters are made on it; the engine's copy routes
    attention through prefix-serve's function)."""
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


class LiveServer:
    """A uvicorn server in a thread, on a free loopback port, around ``create_app``."""

    def __init__(self, app) -> None:
        self.app = app
        self.ctx = app.state.ctx
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    @property
    def engine(self) -> AsyncEngine:
        return self.ctx.engine

    def start(self, wait_ready: bool = True) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        while wait_ready and not self.engine.ready:
            assert time.monotonic() < deadline, "model did not load"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def openai(self, tenant: str | None = "acme", **kw) -> openai.OpenAI:
        key = KEYS.get(tenant, "none") if tenant else "none"
        kw.setdefault("http_client", httpx.Client(trust_env=False, timeout=60))
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def http(self, tenant: str | None = "acme", **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
        kw.setdefault("timeout", 60)
        return httpx.Client(base_url=self.url, headers=headers, trust_env=False, **kw)

    def engine_state(self) -> dict:
        """Read in the engine thread, between steps."""

        def read(llm) -> dict:
            e = llm.engine
            return {
                "seqs": len(e.seqs),
                "free": e.pool.num_free,
                "cached": e.tree.num_cached_blocks,
                "blocks": e.pool.num_blocks,
                "running": len(e.scheduler.running),
                "waiting": e.scheduler.num_waiting(),
                "generated": e.stats.generated_tokens,
            }

        return self.engine.call_blocking(read)

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """Until no request holds a KV block: every used block is the prefix tree's."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.engine_state()
            if state["seqs"] == 0 and state["free"] + state["cached"] == state["blocks"]:
                return state
            assert time.monotonic() < deadline, f"engine still busy: {state}"
            time.sleep(0.02)


ServerFactory = Callable[..., LiveServer]


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """``make_server(llm, keys=KEYS, build=None, quota=None, **ServeConfig fields)``; every
    server started is stopped (and its store closed) at the end of the test."""
    started: list[tuple[LiveServer, object]] = []

    def make(
        llm: LLM,
        keys: dict[str, str] | None = KEYS,
        build: Callable[[], LLM] | None = None,
        quota: Quota | None = None,
        wait_ready: bool = True,
        **fields,
    ) -> LiveServer:
        config = replace(ServeConfig(data_dir=str(tmp_path / "data")), **fields)
        quotas = TenantQuotas(default=quota) if quota else None
        store = open_store(config.data_dir, quotas=quotas, gc_interval_s=None)
        capacity = llm.engine.config.max_num_seqs + config.max_queued_requests
        engine = AsyncEngine(build or (lambda: llm), capacity=capacity)
        api_keys = ApiKeys.from_entries([(k, t, False) for t, k in (keys or {}).items()])
        server = LiveServer(create_app(engine, store, config, api_keys))
        started.append((server, store))
        return server.start(wait_ready)

    yield make
    for server, store in started:
        server.stop()
        store.close()


def error_of(response: httpx.Response) -> dict:
    """The OpenAI error object, after checking the shape exactly."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]
