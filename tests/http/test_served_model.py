"""The served-model bundle (server/served_model.py): the facts published when the model loads,
the offline ``LLM`` built on the same loading code, the HTTP server built on the bundle (not
on ``LLM``), and the API reading the context from the facts, never from the engine."""

from __future__ import annotations

import asyncio
import time
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import pytest
import torch
from http_helpers import TINY_ID, error_of

from adapters_store.formats import ModelShape
from server.api.server import build_engine
from server.config import ApiKeys, ServeConfig
from server.llm import LLM
from server.model_loader import model_value_scales
from server.served_model import ModelFacts, ServedModel

TINY_SHAPE = ModelShape(num_layers=2, num_kv_heads=2, head_dim=16, hidden_size=64, vocab_size=49152)
# 64 MiB of KV (make_llm) / (2 layers x (k, v) x 2 kv heads x 16 dims x 4 bytes x 16 positions)
TINY_BLOCKS = (64 << 20) // (2 * 2 * 2 * 16 * 4 * 16)


def test_facts_are_published_once_the_model_loads(tiny_llm: LLM, tiny_ref) -> None:
    facts = tiny_llm.served.facts
    kv_abs, embedding_abs = model_value_scales(tiny_ref)  # the same weights, measured again
    assert facts == ModelFacts(
        model_id=TINY_ID,
        max_model_len=4096,  # the position limit: the pool holds 131,072 positions
        vocab_size=49152,
        eos_token_ids=(2,),
        shape=replace(TINY_SHAPE, model_kv_abs=kv_abs, model_embedding_abs=embedding_abs),
        block_size=16,
        num_kv_blocks=TINY_BLOCKS,
        max_num_seqs=64,
        device="cpu",
        dtype="float32",
    )
    with pytest.raises(FrozenInstanceError):
        facts.max_model_len = 1  # type: ignore[misc]
    # What the facts say is what the engine enforces.
    engine = tiny_llm.served.engine
    assert (engine.max_model_len, engine.eos_ids, engine.pool.num_blocks) == (
        facts.max_model_len,
        facts.eos_token_ids,
        facts.num_kv_blocks,
    )


def test_the_offline_llm_is_a_view_of_its_bundle(tiny_llm: LLM) -> None:
    served = tiny_llm.served
    assert isinstance(served, ServedModel)
    assert tiny_llm.engine is served.engine
    assert tiny_llm.tokenizer is served.tokenizer
    assert tiny_llm.shape is served.facts.shape
    assert tiny_llm.model_id == served.facts.model_id == TINY_ID


def test_the_server_builds_the_bundle_not_the_offline_api(tiny_model_dir: Path, tmp_path) -> None:
    """``build_engine``'s build, in the engine thread, with the server's flags."""
    config = ServeConfig(
        model=str(tiny_model_dir),
        data_dir=str(tmp_path),
        device="cpu",
        dtype="float32",
        max_num_seqs=3,
        kv_cache_memory=16 * 512 * 16,  # 16 blocks: 256 positions
        torch_threads=torch.get_num_threads(),
    )
    engine = build_engine(config, ApiKeys())
    loop = asyncio.new_event_loop()  # never run: nothing is delivered
    engine.start(loop)
    try:
        deadline = time.monotonic() + 60
        while not engine.ready:
            assert engine.load_error is None, engine.load_error
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.02)
        served = engine.served
        assert type(served) is ServedModel
        facts = served.facts
        assert (facts.model_id, facts.max_model_len, facts.num_kv_blocks) == (TINY_ID, 256, 16)
        assert (facts.max_num_seqs, facts.block_size, facts.dtype) == (3, 16, "float32")
        assert engine.snapshot().free_blocks == 16  # the engine as loaded, published
    finally:
        engine.stop()
        loop.close()


def test_the_api_reads_the_context_from_the_published_facts(make_server, tiny_llm: LLM) -> None:
    """A bundle whose facts say 64 positions (its engine allows 4096): the API bounds prompts
    and fills a chat's default ``max_tokens`` by the facts."""
    served = tiny_llm.served
    small = replace(served, facts=replace(served.facts, max_model_len=64))
    server = make_server(tiny_llm, build=lambda: small)
    with server.http() as http:
        body = {"model": TINY_ID, "prompt": list(range(5, 70)), "max_tokens": 1}
        r = http.post("/v1/completions", json=body)
    assert r.status_code == 400
    assert error_of(r)["message"] == "the prompt is 65 token ids; at most 64 fit the context"
    out = server.openai().chat.completions.create(
        model=TINY_ID,
        messages=[{"role": "user", "content": "hi"}],
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens + out.usage.completion_tokens == 64
