"""Any Llama-family architecture that transformers supports works unchanged (docs/design.md,
decision 1): for tiny random Llama, Mistral and Qwen2 models, greedy output through the engine
equals the hand reference's (prefix tuning, prompt tuning, bare model; ``bench.reference``),
token for token, in one mixed batch. SmolLM/SmolLM2 are Llama checkpoints: the default model
covers them.

The models have a 256-token vocabulary: a random model's logits over 256 tokens have fewer
near-ties than over 49k, and the model stays tiny. The tokenizer is the default model's,
copied into the model directory because ``LLM`` loads one from there; only ids below 256 ever
occur (its specials and byte-level tokens), so prompts are given to ``generate`` as token ids
and the tokenizer only decodes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

from bench.peft_adapters import make_prefix_tuning, make_prompt_tuning
from bench.reference import GreedyResult, adapter_segment, greedy, hf_greedy
from server import LLM, SamplingParams
from server.engine.engine import EngineConfig
from server.engine.request import InvalidRequest

VOCAB = 256
N_NEW = 10
INIT_STD = 0.2  # transformers' default 0.02 gives near-uniform logits: ties at every step
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: 2 query heads per kv head
    max_position_embeddings=512,
    initializer_range=INIT_STD,
    bos_token_id=1,
    eos_token_id=2,
)
CONFIGS: dict[str, PretrainedConfig] = {
    # head_dim * heads (64) != hidden_size (48), tied embeddings as in SmolLM.
    "llama": LlamaConfig(**{**COMMON, "hidden_size": 48}, head_dim=16, tie_word_embeddings=True),
    # Mistral's default sliding_window (4096) is longer than any sequence here; see
    # test_sliding_window_shorter_than_the_sequence for a shorter one.
    "mistral": MistralConfig(**COMMON, head_dim=16),
    # Qwen2 has q/k/v biases; head_dim comes from hidden_size // heads (16).
    "qwen2": Qwen2Config(**COMMON),
}


def write_model(config: PretrainedConfig, out: Path, tokenizer_dir: Path) -> Path:
    """A seeded random model with the default model's tokenizer, as ``save_pretrained`` writes
    it. Biases are drawn too: transformers initialises them to zero, which would leave Qwen2's
    q/k/v biases untested."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, INIT_STD)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(out)
    return out


def load_ref(path: Path):
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model


def random_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # Above the tokenizer's specials 0..2 (unk, bos, eos).
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def compare(got: list[int], ref: GreedyResult, label: str) -> int:
    want = ref.comparable()
    assert len(want) >= 3, f"{label}: reference tie at step {len(want)}; pick another seed"
    assert got[: len(want)] == want, f"{label}: engine {got} != reference {ref.tokens}"
    return len(want)


def tiny_engine(arch: str, dtype: str, model_dir: Path, tmp_path: Path):
    """A tiny random ``arch`` model served by ``LLM`` at ``dtype`` with two adapters, "pre"
    (prefix tuning, 10 virtual tokens) and "pro" (prompt tuning, 6): ``(llm, ref, adapters)``,
    ``ref`` the float32 transformers model. Blocks of 8 and a 32-token budget: chunked prefill
    across steps, decode mixed in, and two "pre" requests share the adapter's first cached
    block (group attention)."""
    path = write_model(CONFIGS[arch], tmp_path / f"tiny-{arch}", model_dir)
    ref = load_ref(path)
    adapters = {
        "pre": make_prefix_tuning(ref, tmp_path / "pre", num_virtual_tokens=10, seed=1),
        "pro": make_prompt_tuning(ref, tmp_path / "pro", num_virtual_tokens=6, seed=2),
    }
    llm = LLM(
        str(path),
        data_dir=tmp_path / "data",
        device="cpu",
        dtype=dtype,
        engine_config=EngineConfig(block_size=8, max_num_batched_tokens=32),
    )
    for name, adapter_dir in adapters.items():
        llm.add_adapter(name, adapter_dir)
    return llm, ref, adapters


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_prefix_and_prompt_tuning_match_the_reference(arch, model_dir, tmp_path):
    config = CONFIGS[arch]
    llm, ref, adapters = tiny_engine(arch, "float32", model_dir, tmp_path)
    assert ref.config.model_type == arch
    assert llm.model_id == f"tiny-{arch}"
    p1, p2, p3 = random_prompts([13, 21, 30], seed=5)
    cases = [(["pre"], p1), (["pre"], p2), (["pro"], p1), (["pro"], p3), ([], p1), ([], p3)]
    window = getattr(config, "sliding_window", None)
    assert window is None or max(len(p) for _, p in cases) + 10 + N_NEW <= window
    params = SamplingParams(max_tokens=N_NEW, temperature=0, ignore_eos=True)
    outs = llm.generate(
        [p for _, p in cases], params, adapters=[n for n, _ in cases], use_tqdm=False
    )

    segments = {name: adapter_segment(ref, path) for name, path in adapters.items()}
    refs = [greedy(ref, prompt, N_NEW, [segments[n] for n in names]) for names, prompt in cases]
    compared = 0
    for (names, _), out, want in zip(cases, outs, refs, strict=True):
        assert out.finish_reason == "length"
        compared += compare(out.token_ids, want, f"{arch} {names or 'bare'}")
    assert compared >= 0.8 * N_NEW * len(cases)
    # The adapters really change the output: p1 continues differently under each.
    assert len({tuple(refs[i].tokens) for i in (0, 2, 4)}) == 3
    # The second "pre" request read the adapter's first block (8 of its 10 virtual tokens)
    # from the prefix cache.
    assert sorted(o.num_cached_tokens for o in outs[:2]) == [0, 8]


def test_sliding_window_shorter_than_the_sequence(model_dir, tmp_path):
    """A Mistral model whose sliding window (8) is shorter than the sequence: HF attends to the
    last 8 positions only, so the engine must do the same, or refuse the request (e.g. by
    capping the context at the window). It must never silently attend to everything."""
    config = MistralConfig(**COMMON, head_dim=16, sliding_window=8)
    path = write_model(config, tmp_path / "tiny-mistral-sw8", model_dir)
    ref = load_ref(path)
    llm = LLM(str(path), data_dir=tmp_path / "data", device="cpu", dtype="float32")
    prompt = random_prompts([16], seed=5)[0]
    want = hf_greedy(ref, prompt, 8)  # transformers' own sliding-window attention
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    try:
        out = llm.generate([prompt], params, use_tqdm=False)[0]
    except InvalidRequest as exc:
        assert exc.param == "prompt"  # 16 prompt tokens, a context of 8
        return
    compare(out.token_ids, want, "mistral sliding_window=8")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_direct_decoder_equals_transformers_forward(arch, dtype, model_dir, tmp_path):
    """The engine's own loop over the decoder layers (``server.engine.decoder``) gives the same
    bits as the model's transformers forward: every step of a run with chunked prefill, decode,
    a shared adapter block and prompt tuning is computed both ways, and the logits, the
    prompt logits and the whole KV cache are equal, not close."""
    llm, _, _ = tiny_engine(arch, dtype, model_dir, tmp_path)
    runner = llm.engine.runner
    assert runner.direct_decoder
    layer = runner.model.model.layers[0]
    if dtype == "float32":  # the direct loop takes q/k/v and gate/up in one product each
        assert hasattr(layer.self_attn, "_ps_qkv") and hasattr(layer.mlp, "_ps_gate_up")
    # and, in both dtypes, its norms and the SiLU gate from the native kernels (cpu_layers), as
    # does the model's own forward: every layer's two norms, its activation, the final norm
    assert runner.routed_layers == 3 * len(runner.model.model.layers) + 1
    assert layer.input_layernorm._ps_layer and layer.mlp.act_fn._ps_layer
    run = runner.run
    kinds = set()

    def both_ways(plan):
        runner.direct_decoder = False
        want = run(plan)
        want_cache = runner.kv_cache.clone()
        runner.direct_decoder = True
        got = run(plan)
        assert torch.equal(got.logits, want.logits)
        assert got.finite == want.finite
        assert got.prompt_logits.keys() == want.prompt_logits.keys()
        for i, logits in want.prompt_logits.items():
            assert torch.equal(got.prompt_logits[i], logits)
        assert torch.equal(runner.kv_cache, want_cache)
        rows = [b - a for a, b in zip(plan.row_starts, plan.row_starts[1:], strict=False)]
        kinds.update("decode" if n == 1 else "prefill" for n in rows)
        return got

    runner.run = both_ways
    p1, p2, p3 = random_prompts([13, 21, 30], seed=5)
    cases = [(["pre"], p1), (["pre"], p2), (["pro"], p3), ([], p1)]
    outs = llm.generate(
        [p for _, p in cases],
        SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, prompt_logprobs=1),
        adapters=[n for n, _ in cases],
        use_tqdm=False,
    )
    assert [len(o.token_ids) for o in outs] == [6] * len(cases)
    assert kinds == {"decode", "prefill"}


def test_direct_decoder_only_for_known_layers(model_dir, tmp_path):
    """Layers whose forward the engine does not know (Qwen3's q/k norms), or a known layer
    with a module added, run through transformers' forward."""
    from transformers import Qwen3Config

    from server.engine import decoder
    from server.engine.model_runner import ModelRunner

    qwen3 = AutoModelForCausalLM.from_config(Qwen3Config(**COMMON, head_dim=16))
    assert not decoder.supports(qwen3)
    llama = AutoModelForCausalLM.from_config(CONFIGS["llama"])
    assert decoder.supports(llama)
    assert ModelRunner(llama, 4, 8).direct_decoder
    assert not ModelRunner(llama, 4, 8, direct_decoder=False).direct_decoder  # asked off
    assert not ModelRunner(qwen3, 4, 8).direct_decoder
    llama.model.layers[1].self_attn.q_norm = torch.nn.Identity()
    assert not decoder.supports(llama)
