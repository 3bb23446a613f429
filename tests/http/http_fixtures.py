"""Fixtures (imported by the ``conftest`` of tests/http and tests/reliability): real uvicorn
servers on free loopback ports, driven by the official ``openai`` client and
httpx. Models: a tiny random Llama with the default model's tokenizer (fast: routes, errors,
lifecycle) and the real default model (greedy output equals PEFT's)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from http_helpers import DATA_DIR, KEYS, TINY_ID, LiveServer, make_llm
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from adapters_store.store import DEFAULT_HOST_CACHE_BYTES, open_store
from adapters_store.types import Quota, TenantQuotas
from server.api import create_app
from server.api.server import tenant_limit
from server.async_engine import AsyncEngine
from server.config import ApiKeys, ServeConfig
from server.llm import LLM
from server.model_loader import resolve_model_dir
from server.served_model import ServedModel


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


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir: Path) -> LLM:
    return make_llm(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_ref(tiny_model_dir: Path):
    """A second copy of the tiny model (PEFT adapters are made on it; the engine's copy routes
    attention through prefix-serve's function)."""
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


ServerFactory = Callable[..., LiveServer]


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """``make_server(llm, keys=KEYS, build=None, quota=None, host_cache_bytes=1 GiB,
    **ServeConfig fields)``: a server of ``llm``'s model bundle (``llm.served``, or what
    ``build`` returns); ``host_cache_bytes``: the store's host tier. Every server started is
    stopped (and its store closed) at the end of the test."""
    started: list[tuple[LiveServer, object]] = []

    def make(
        llm: LLM,
        keys: dict[str, str] | None = KEYS,
        build: Callable[[], ServedModel] | None = None,
        quota: Quota | None = None,
        wait_ready: bool = True,
        host_cache_bytes: int = DEFAULT_HOST_CACHE_BYTES,
        **fields,
    ) -> LiveServer:
        config = replace(ServeConfig(data_dir=str(tmp_path / "data")), **fields)
        quotas = TenantQuotas(default=quota) if quota else None
        store = open_store(
            config.data_dir, quotas=quotas, gc_interval_s=None, host_cache_bytes=host_cache_bytes
        )
        seats = llm.served.facts.max_num_seqs
        capacity = seats + config.max_queued_requests
        api_keys = ApiKeys.from_entries([(k, t, False) for t, k in (keys or {}).items()])
        limit = tenant_limit(replace(config, max_num_seqs=seats), api_keys)
        engine = AsyncEngine(build or (lambda: llm.served), capacity=capacity, tenant_limit=limit)
        server = LiveServer(create_app(engine, store, config, api_keys))
        started.append((server, store))
        return server.start(wait_ready)

    yield make
    for server, store in started:
        server.stop()
        store.close()
