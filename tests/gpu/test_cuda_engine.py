"""The engine on CUDA (float32) gives the same greedy tokens as the hand reference on the CPU,
up to the reference's first top-2 tie (summation order differs between devices)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bench.reference import greedy
from server import LLM, SamplingParams
from server.model_loader import resolve_model_dir

pytestmark = pytest.mark.gpu


def test_cuda_greedy_matches_the_reference():
    data_dir = Path(os.environ.get("PREFIX_SERVE_TEST_DATA_DIR", "data"))
    model_dir = resolve_model_dir("default", data_dir)[0]
    llm = LLM(str(model_dir), data_dir=data_dir, device="cuda", dtype="float32")
    assert llm.engine.runner.kv_cache.is_cuda
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    prompts = [llm.tokenizer.encode(t) for t in ("The capital of France is", "def add(a, b):")]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, prompt in zip(outs, prompts, strict=True):
        want = greedy(ref, prompt, 10)
        assert len(want.comparable()) >= 3
        assert out.token_ids[: len(want.comparable())] == want.comparable()
