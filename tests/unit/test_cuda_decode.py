"""The GPU decode path (``engine/cuda_decode.py``) run uncaptured on the CPU, its attention
under Triton's interpreter: the same greedy tokens as the CPU engine, batches padded to their
bucket, shared prefixes, an adapter's virtual tokens, the block tables' width growing mid-run.
Graph capture itself needs CUDA (``tests/gpu``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from server.engine.batch import build_plan
from server.engine.cuda_decode import CudaDecoder, is_decode_step
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.request import AdapterSegment, SamplingParams

CONFIG = LlamaConfig(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)


class DigitsTokenizer:
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    model = LlamaForCausalLM(CONFIG).eval()
    with torch.no_grad():  # larger weights: peaked logits, no near ties between backends
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


def _engine(model, decoder: bool, calls: list[int] | None = None) -> LLMEngine:
    config = EngineConfig(
        block_size=4, max_num_seqs=6, max_num_batched_tokens=256, kv_cache_memory=1 << 20
    )
    engine = LLMEngine(model, DigitsTokenizer(), config)
    if decoder:
        runner = engine.runner
        cuda = CudaDecoder(
            model, runner.kv_cache, 4, runner.num_blocks, 6, max_blocks=4, use_graphs=False
        )
        run = cuda.run

        def counted(plan):
            calls.append(len(plan.chunks))
            return run(plan)

        cuda.run = counted
        runner.cuda_decoder = cuda
    return engine


def _generate(engine: LLMEngine, adapter: AdapterSegment) -> dict[str, list[int]]:
    rng = np.random.default_rng(0)
    system = rng.integers(3, 96, 23).tolist()  # shared by four requests: a group
    prompts = [system + rng.integers(3, 96, n).tolist() for n in (3, 9, 1, 14)]
    prompts += [rng.integers(3, 96, 5).tolist()]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    engine.add_request("adapted", prompts[4], params, [adapter])
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return done


def test_decode_steps_through_the_gpu_path_give_the_cpu_engines_tokens(model):
    gen = torch.Generator().manual_seed(5)
    kv = torch.randn(2, 2, 2, 7, 16, generator=gen)  # a 7-token prefix-tuning adapter
    adapter = AdapterSegment(key="a" * 64, kind="prefix_tuning", length=7, kv=kv)
    want = _generate(_engine(model, decoder=False), adapter)
    calls: list[int] = []
    got = _generate(_engine(model, decoder=True, calls=calls), adapter)
    assert got == want
    assert all(len(t) == 12 for t in got.values())
    # Six requests decode together (bucket 8: two padding rows), then fewer as they finish;
    # the tables outgrow their first width of 4 blocks (23 + 14 + 12 positions: 13 blocks).
    assert max(calls) == 6 and len(calls) >= 11


def test_only_plain_decode_steps_take_the_gpu_path(model):
    engine = _engine(model, decoder=False)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    seq = engine.add_request("r", [5, 6, 7], params)
    engine.step()  # the prompt: three rows
    prefill = build_plan([], 4)
    assert not is_decode_step(prefill)
    out = engine.scheduler.schedule()
    assert out.plan is not None and is_decode_step(out.plan)
    assert seq.num_computed == 3
