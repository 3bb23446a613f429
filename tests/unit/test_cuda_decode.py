"""The GPU decode path (``engine/cuda_decode.py``) run uncaptured on the CPU, its attention
under Triton's interpreter: the same greedy tokens as the CPU engine, batches padded to their
bucket, shared prefixes, an adapter's virtual tokens, the block tables' width growing mid-run.
Graph capture itself needs CUDA (``tests/gpu``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.w3 import IdsTokenizer
from server.engine.batch import build_plan
from server.engine.cuda_decode import CudaDecoder, is_decode_step
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.request import AdapterSegment, RequestOutput, SamplingParams

pytestmark = pytest.mark.triton_interpreter

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
    engine = LLMEngine(model, IdsTokenizer(), config)
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


def _finish(engine: LLMEngine) -> dict[str, RequestOutput]:
    """Step ``engine`` until every request is done: each one's final output by id."""
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def _generate(engine: LLMEngine, adapter: AdapterSegment) -> dict[str, list[int]]:
    rng = np.random.default_rng(0)
    system = rng.integers(3, 96, 23).tolist()  # shared by four requests: a group
    prompts = [system + rng.integers(3, 96, n).tolist() for n in (3, 9, 1, 14)]
    prompts += [rng.integers(3, 96, 5).tolist()]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    engine.add_request("adapted", prompts[4], params, [adapter])
    return {rid: out.token_ids for rid, out in _finish(engine).items()}


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


def test_a_decode_row_that_is_not_finite_fails_its_request_alone(model):
    """A sequence whose cached values overflow the next decode step (its attention output is
    beyond float32): the step's kernel writes its new keys and values as zeros and flags the
    row, the engine fails that request ("non_finite"), and every other request of the same
    steps gets the tokens it gets without it."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16], [17, 18, 19, 20, 21, 22]]

    def run(poison: bool) -> dict[str, object]:
        calls: list[int] = []
        engine = _engine(model, decoder=True, calls=calls)
        seqs = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(prompts)]
        engine.step()  # the three prompts
        if poison:  # every value row of request 1's own blocks, in every layer
            bs = engine.config.block_size
            slots = [b * bs + o for b in seqs[1].block_table for o in range(bs)]
            engine.runner.kv_cache[:, 1, :, slots] = 3e38
        done = _finish(engine)
        assert calls, "the decode steps went through the GPU path"
        return done

    clean, poisoned = run(False), run(True)
    assert poisoned["r1"].finish_reason == "error"
    assert poisoned["r1"].error.kind == "non_finite"
    for rid in ("r0", "r2"):
        assert poisoned[rid].token_ids == clean[rid].token_ids
        assert poisoned[rid].finish_reason == "length"


def test_groups_beyond_the_captured_slots_read_their_whole_context(model, monkeypatch):
    """Two shared prefixes in one step with a single group slot: the larger group reads its
    segment once, the other group's rows read their whole context as their own keys; both
    give the CPU engine's tokens."""
    from server.engine import cuda_decode

    monkeypatch.setattr(cuda_decode, "MAX_GROUPS", 1)
    rng = np.random.default_rng(4)
    first, second = rng.integers(3, 96, 26).tolist(), rng.integers(3, 96, 13).tolist()
    prompts = [first + [7], first + [8, 9], first + [10], second + [11], second + [12, 13]]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)

    def run(decoder: bool) -> dict[str, list[int]]:
        calls: list[int] = []
        engine = _engine(model, decoder=decoder, calls=calls)
        if decoder:
            cuda = engine.runner.cuda_decoder
            assert cuda._parts(cuda._dev, 6)["seg_lens"].numel() == 1
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
        return {rid: out.token_ids for rid, out in _finish(engine).items()}

    assert run(True) == run(False)


def test_a_failing_gpu_decode_path_gives_way_to_the_general_path(model, caplog):
    """If the GPU path itself fails (say a kernel this device cannot compile), the step and
    every later one run on the general path: no request fails, the tokens are the CPU
    engine's."""
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]

    def run(engine):
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
        return _finish(engine)

    want = run(_engine(model, decoder=False))
    engine = _engine(model, decoder=True, calls=[])

    def broken(plan):
        raise RuntimeError("no kernel for this device")

    engine.runner.cuda_decoder.run = broken
    got = run(engine)
    assert {k: o.token_ids for k, o in got.items()} == {k: o.token_ids for k, o in want.items()}
    assert all(o.error is None for o in got.values())
    assert engine.runner.cuda_decoder is None
    assert "decoding on the general path now" in caplog.text


def test_projection_biases_are_stacked_with_their_weights():
    """Llama with attention and MLP biases (``attention_bias``, ``mlp_bias``): the stacked
    products carry the biases; tokens and their log-probabilities are the CPU engine's."""
    config = LlamaConfig(**{**CONFIG.to_dict(), "attention_bias": True, "mlp_bias": True})
    torch.manual_seed(8)
    biased = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in biased.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=3)

    def run(decoder: bool) -> dict[str, list]:
        engine = _engine(biased, decoder=decoder, calls=[])
        for i, p in enumerate([[5, 6, 7, 8, 9, 10], [11, 12, 13]]):
            engine.add_request(f"r{i}", p, params)
        return _finish(engine)

    want, got = run(False), run(True)
    for rid, out in want.items():
        assert got[rid].token_ids == out.token_ids
        for mine, theirs in zip(got[rid].logprobs, out.logprobs, strict=True):
            assert mine.token == theirs.token
            assert abs(mine.logprob - theirs.logprob) < 1e-4
            for (a, x), (b, y) in zip(mine.top, theirs.top, strict=True):
                assert a == b and abs(x - y) < 1e-4
