"""The engine on CUDA: float32 gives the hand reference's greedy tokens (computed on the CPU)
up to its first near tie; bfloat16 agrees with it within a stated margin; a decode step
replayed from a CUDA graph gives the same bits as the same step run eagerly.

The model is the default one (SmolLM2-135M-Instruct) where its converted copy is in the data
directory, else the same architecture with seeded random weights (the device that runs these
has no network and the model file is too large to send to it)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from bench.reference import Segment, greedy
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.request import AdapterSegment, SamplingParams
from server.model_loader import DEFAULT_MODEL_ID

pytestmark = pytest.mark.gpu

NEW_TOKENS = 16
# SmolLM2-135M's shape: 30 layers, hidden 576, 9 query and 3 key-value heads of 64.
SMOLLM2 = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)


class IdsTokenizer:
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def cpu_model():
    data_dir = Path(os.environ.get("PREFIX_SERVE_TEST_DATA_DIR", "data"))
    converted = data_dir / "models" / DEFAULT_MODEL_ID
    if (converted / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32).eval()
    torch.manual_seed(0)
    return LlamaForCausalLM(copy.deepcopy(SMOLLM2)).eval()


@pytest.fixture(scope="module")
def workload(cpu_model):
    """Six prompts: four share a 40-token system prompt, two have a prefix-tuning adapter."""
    gen = torch.Generator().manual_seed(1)
    vocab = cpu_model.config.vocab_size
    system = torch.randint(10, vocab, (40,), generator=gen).tolist()
    prompts = [
        system + torch.randint(10, vocab, (n,), generator=gen).tolist() for n in (5, 9, 17, 2)
    ]
    prompts += [torch.randint(10, vocab, (n,), generator=gen).tolist() for n in (7, 30)]
    cfg = cpu_model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    kv = torch.randn(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 8, d, generator=gen)
    adapter = AdapterSegment(key="g" * 64, kind="prefix_tuning", length=8, kv=kv)
    adapters = [[], [], [], [adapter], [], [adapter]]
    return prompts, adapters


def _reference(cpu_model, workload):
    prompts, adapters = workload
    return [
        greedy(cpu_model, p, NEW_TOKENS, [Segment("prefix_tuning", kv=s.kv) for s in a])
        for p, a in zip(prompts, adapters, strict=True)
    ]


@pytest.fixture(scope="module")
def reference(cpu_model, workload):
    return _reference(cpu_model, workload)


def _run(model, workload, dtype, graphs=True, logprobs=None, window=8, windows=None, params=None):
    model = copy.deepcopy(model).to("cuda", dtype)
    config = EngineConfig(
        max_num_seqs=8, kv_cache_memory=1 << 28, cuda_graphs=graphs, decode_window=window
    )
    engine = LLMEngine(model, IdsTokenizer(), config)
    cuda = engine.runner.cuda_decoder
    assert engine.runner.kv_cache.is_cuda and cuda is not None
    if windows is not None:  # each window's per-row step counts
        launch = cuda.launch

        def counted(plan, limits, tables, keep_tokens=False):
            windows.append(list(limits))
            return launch(plan, limits, tables, keep_tokens)

        cuda.launch = counted
    prompts, adapters = workload
    plain = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=logprobs)
    for i, (p, a) in enumerate(zip(prompts, adapters, strict=True)):
        engine.add_request(f"r{i}", p, (params or {}).get(i, plain), a)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    outs = [done[f"r{i}"] for i in range(len(prompts))]
    return outs, engine


def test_float32_on_cuda_gives_the_references_greedy_tokens(cpu_model, workload, reference):
    outs, engine = _run(cpu_model, workload, torch.float32)
    assert engine.runner.cuda_decoder._graphs, "decode steps went through a captured graph"
    compared = 0
    for out, want in zip(outs, reference, strict=True):
        same = want.comparable()
        assert out.token_ids[: len(same)] == same
        compared += len(same)
    assert compared >= len(reference) * 4  # the comparison is not empty


def test_bfloat16_on_cuda_agrees_with_the_float32_reference(cpu_model, workload, reference):
    """Tokens agree wherever the float32 reference's top two logits are further apart than
    0.1 (bfloat16's rounding moves this model's logits by a few hundredths), before the first
    closer pair."""
    outs, _ = _run(cpu_model, workload, torch.bfloat16)
    compared = 0
    for out, want in zip(outs, reference, strict=True):
        same = want.comparable(threshold=0.1)
        assert out.token_ids[: len(same)] == same, (out.token_ids, want.tokens, want.margins)
        compared += len(same)
    assert compared >= 2 * NEW_TOKENS


def test_graph_replay_gives_the_bits_of_the_eager_step(cpu_model, workload):
    graphed, _ = _run(cpu_model, workload, torch.float32, graphs=True, logprobs=2)
    eager, _ = _run(cpu_model, workload, torch.float32, graphs=False, logprobs=2)
    for g, e in zip(graphed, eager, strict=True):
        assert g.token_ids == e.token_ids
        assert g.logprobs == e.logprobs  # every value, to the last bit


def test_windows_of_replayed_steps_give_the_tokens_of_single_steps(cpu_model, workload):
    """Eight decode steps replayed back to back, each fed the ids the one before left on the
    device: the tokens of the same steps one at a time (bfloat16, graphs both ways)."""
    windows: list[list[int]] = []
    windowed, engine = _run(cpu_model, workload, torch.bfloat16, window=8, windows=windows)
    single, _ = _run(cpu_model, workload, torch.bfloat16, window=1)
    assert windows and max(max(w) for w in windows) == 8
    assert engine.runner.cuda_decoder is not None  # the GPU path never gave way
    for w, s in zip(windowed, single, strict=True):
        assert w.token_ids == s.token_ids


def test_stops_inside_windows_on_the_device_give_the_single_steps_outputs(cpu_model, workload):
    """Stop tokens that fall inside windows (the next window already launched behind the
    one that holds the stop), a max_tokens that ends inside one: the outputs of single steps,
    and every block not cached by the tree free again at the end."""
    single, _ = _run(cpu_model, workload, torch.bfloat16, window=1)
    params = {}
    for i in (0, 2, 4):  # a token's first appearance, past the first window's start
        ids = single[i].token_ids
        at = next((j for j in range(3 + i, NEW_TOKENS) if ids[j] not in ids[:j]), None)
        if at is not None:
            stop = (ids[at],)
            params[i] = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, stop_token_ids=stop)
    params[1] = SamplingParams(max_tokens=NEW_TOKENS - 3, temperature=0, ignore_eos=True)
    want, _ = _run(cpu_model, workload, torch.bfloat16, window=1, params=params)
    windows: list[list[int]] = []
    got, engine = _run(
        cpu_model, workload, torch.bfloat16, window=8, windows=windows, params=params
    )
    assert len(windows) >= 2
    for g, w in zip(got, want, strict=True):
        assert (g.token_ids, g.finish_reason) == (w.token_ids, w.finish_reason)
    assert want[1].finish_reason == "length"
    assert sum(o.finish_reason == "stop" for o in want) >= 1, "no stop fell inside a window"
    pool, tree = engine.pool, engine.tree
    assert pool.num_free == engine.runner.num_blocks - tree.num_cached_blocks
