"""The reference itself, pinned down: ``bench.reference`` (PEFT's adapter math + the bare HF
model + dense attention) against transformers alone, against PEFT's own ``generate`` (a second
witness at the locked versions), and the adapters of ``bench.peft_adapters``.

Conventions pinned here (they are what PEFT trains with):
- prefix tuning: the P virtual tokens are KV only (no RoPE applied to them); the real tokens
  sit at positions P, P+1, ...: a prefix whose KV is what the model computes for a text at
  positions 0..P-1 means exactly that text.
- prompt tuning / P-tuning: the soft prompt is the input embeddings at positions 0..P-1, the
  real tokens follow at P, P+1, ...
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import peft
import pytest
import torch
import transformers
from peft import PrefixTuningConfig, PromptEncoderConfig, TaskType, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from bench.peft_adapters import make_p_tuning, make_prefix_tuning, make_prompt_tuning
from bench.peft_reference import peft_greedy
from bench.reference import (
    Segment,
    adapter_segment,
    greedy,
    hf_greedy,
    peft_segment,
    prefix_kv,
    text_segment,
)
from bench.workloads import build_w1

PROMPTS = [[5, 17, 33, 99, 120, 7, 64], [9, 8, 7]]
STEPS = 6
MAKERS = {
    "prefix": make_prefix_tuning,
    "prompt": make_prompt_tuning,
    "ptuning": make_p_tuning,
}


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    """A random 2-layer GQA Llama (4 query heads, 2 kv heads): fast, and its weights are large
    enough (initializer_range 0.1) that top-2 logits are rarely near a tie."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


@torch.no_grad()
def _hf_greedy_embeds(model, embeds: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    """transformers alone over input embeddings (default positions 0..n-1), whole sequence
    every step."""
    embed = model.get_input_embeddings()
    tokens, rows = [], []
    for _ in range(steps):
        x = torch.cat([embeds, embed(torch.tensor(tokens, dtype=torch.long))])[None]
        logits = model(inputs_embeds=x, use_cache=False).logits[0, -1]
        tokens.append(int(logits.argmax()))
        rows.append(logits)
    return tokens, torch.stack(rows)


# --- against transformers alone ------------------------------------------------------------


def test_bare_model_equals_transformers_alone(tiny):
    for prompt in PROMPTS:
        ref = greedy(tiny, prompt, STEPS, keep_logits=True)
        hf = hf_greedy(tiny, prompt, STEPS, keep_logits=True)
        assert ref.first_tie() is None, ref.margins
        assert ref.tokens == hf.tokens
        torch.testing.assert_close(ref.logits, hf.logits, atol=1e-5, rtol=0)
    assert tiny.config._attn_implementation != "prefix_serve_reference"  # restored


def test_prefix_kv_of_a_text_means_the_text(tiny):
    """Real tokens after a prefix of P virtual tokens sit at positions P.. and see the prefix
    KV as given: a prefix holding the model's own KV of a text equals the text itself."""
    text = [40, 41, 42, 43, 44]
    kv = prefix_kv(tiny, text)
    assert kv.shape == (2, 2, 2, 5, 16)
    for prompt in PROMPTS:
        as_prefix = greedy(tiny, prompt, STEPS, [Segment("prefix_tuning", kv=kv)], keep_logits=True)
        as_text = hf_greedy(tiny, text + prompt, STEPS, keep_logits=True)
        assert as_prefix.tokens == as_text.tokens
        torch.testing.assert_close(as_prefix.logits, as_text.logits, atol=1e-5, rtol=0)
        as_text_segment = greedy(tiny, prompt, STEPS, [text_segment(text)], keep_logits=True)
        torch.testing.assert_close(as_text_segment.logits, as_text.logits, atol=1e-5, rtol=0)


def test_soft_prompt_occupies_positions_0_to_p(tiny):
    soft = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    embed = tiny.get_input_embeddings()
    for prompt in PROMPTS:
        ref = greedy(tiny, prompt, STEPS, [Segment("prompt_tuning", embeddings=soft)], True, True)
        with torch.no_grad():
            joined = torch.cat([soft, embed(torch.tensor(prompt))])
        tokens, logits = _hf_greedy_embeds(tiny, joined, STEPS)
        assert ref.tokens == tokens
        torch.testing.assert_close(ref.logits, logits, atol=1e-5, rtol=0)


def test_composed_segments_run_in_order(tiny):
    """A text, a soft prompt and a prefix one after another: the same as transformers over
    the text and soft prompt's embeddings with the prefix's KV in between."""
    text, soft = [50, 51, 52], torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    kv = prefix_kv(tiny, [60, 61, 62, 63])
    prompt = PROMPTS[0]
    parts = [Segment("prefix_tuning", kv=kv), text_segment(text)]
    first = greedy(tiny, prompt, STEPS, parts, keep_logits=True)
    want = hf_greedy(tiny, [60, 61, 62, 63] + text + prompt, STEPS, keep_logits=True)
    torch.testing.assert_close(first.logits, want.logits, atol=1e-5, rtol=0)
    soft_first = greedy(tiny, prompt, STEPS, [Segment("p_tuning", embeddings=soft), *parts])
    assert soft_first.tokens != first.tokens


# --- PEFT's adapter math and its generate, as a witness ------------------------------------


def test_segment_of_a_trainable_model_equals_its_saved_file(tiny, tmp_path):
    """PEFT saves an encoder's *output* (projection MLP, P-tuning encoder): the segment of the
    live, trainable model equals the segment read back from what it saved."""
    configs = {
        "proj": PrefixTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4, prefix_projection=True
        ),
        "ptuning": PromptEncoderConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4, encoder_hidden_size=64
        ),
    }
    for name, config in configs.items():
        torch.manual_seed(11)
        live = get_peft_model(tiny, config)
        assert not live.peft_config["default"].inference_mode
        want = peft_segment(live)
        live.save_pretrained(str(tmp_path / name))
        tiny.requires_grad_(True)  # get_peft_model froze the base model
        got = adapter_segment(tiny, tmp_path / name)
        for a, b in ((want.kv, got.kv), (want.embeddings, got.embeddings)):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert all(p.requires_grad for p in tiny.parameters())


def _witness_message(kind: str) -> str:
    return (
        f"PeftModel.generate changed (transformers {transformers.__version__}, peft "
        f"{peft.__version__}): for a {kind} adapter it no longer gives the adapter's meaning "
        "(the hand reference). The engine is compared against the hand reference, not PEFT; "
        "PEFT baselines A/B of `bench w1` are not valid on these versions."
    )


@pytest.mark.parametrize("kind", ["prefix", "prefix_proj", "prompt", "ptuning"])
def test_peft_generate_is_a_witness_at_the_locked_versions(tiny, tmp_path, kind):
    make = MAKERS[kind.removesuffix("_proj")]
    extra = {"prefix_projection": True} if kind == "prefix_proj" else {}
    adapter = make(tiny, tmp_path / kind, num_virtual_tokens=5, seed=0, **extra)
    seg = adapter_segment(tiny, adapter)
    for prompt in PROMPTS:
        ref = greedy(tiny, prompt, STEPS, [seg], keep_logits=True)
        assert ref.first_tie() is None, ref.margins
        witness = peft_greedy(tiny, adapter, [prompt], STEPS, keep_logits=True)[0]
        assert witness.tokens == ref.tokens, _witness_message(kind)
        assert (witness.logits - ref.logits).abs().max() < 1e-4, _witness_message(kind)


def test_peft_generate_is_a_witness_on_the_real_model(
    ref_model, ref_segments, adapter_dirs, tokenizer
):
    prompt = tokenizer.encode("The harbour master said")
    for kind, path in adapter_dirs.items():
        ref = greedy(ref_model, prompt, 4, [ref_segments[kind]], keep_logits=True)
        witness = peft_greedy(ref_model, path, [prompt], 4, keep_logits=True)[0]
        assert witness.tokens[: len(ref.comparable())] == ref.comparable(), _witness_message(kind)
        assert (witness.logits - ref.logits).abs().max() < 1e-3, _witness_message(kind)


# --- the adapter makers and the workload ---------------------------------------------------


def test_adapters_are_deterministic_and_leave_the_base_model_alone(tiny, tmp_path):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    assert all(p.requires_grad for p in tiny.parameters())
    for make in (make_prefix_tuning, make_prompt_tuning, make_p_tuning):
        a = make(tiny, tmp_path / f"{make.__name__}-a", num_virtual_tokens=4, seed=7)
        b = make(tiny, tmp_path / f"{make.__name__}-b", num_virtual_tokens=4, seed=7)
        c = make(tiny, tmp_path / f"{make.__name__}-c", num_virtual_tokens=4, seed=8)
        assert _digest(a) == _digest(b) != _digest(c)
        greedy(tiny, PROMPTS[0], 2, [adapter_segment(tiny, a)])
    projected = make_prefix_tuning(tiny, tmp_path / "proj", 4, seed=7, prefix_projection=True)
    assert load_file(str(projected / "adapter_model.safetensors"))["prompt_embeddings"].shape == (
        4,
        2 * 2 * 2 * 16,
    )
    after = tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in tiny.parameters())


def test_ignore_eos_continues_past_eos(tiny):
    free = greedy(tiny, PROMPTS[0], 20)
    assert len(free.tokens) == 20
    # Make the 6th generated token the EOS, so that both variants meet it.
    eos, saved = free.tokens[5], tiny.generation_config.eos_token_id
    first = free.tokens.index(eos)
    tiny.generation_config.eos_token_id = eos
    try:
        ignoring = greedy(tiny, PROMPTS[0], 20)
        stopping = greedy(tiny, PROMPTS[0], 20, ignore_eos=False)
    finally:
        tiny.generation_config.eos_token_id = saved
    assert ignoring.tokens == free.tokens
    assert stopping.tokens == free.tokens[: first + 1]
    assert stopping.margins == free.margins[: first + 1]


@pytest.fixture(scope="module")
def chat_prompt(tokenizer) -> list[int]:
    messages = [{"role": "user", "content": "Tell me a short story about a dragon."}]
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )


def test_adapters_change_the_real_models_output(ref_model, ref_segments, chat_prompt):
    base = greedy(ref_model, chat_prompt, 24).tokens
    assert base == hf_greedy(ref_model, chat_prompt, 24).tokens[: len(base)]
    for kind, seg in ref_segments.items():
        assert greedy(ref_model, chat_prompt, 24, [seg]).tokens != base, kind


def test_w1_workload_shape(ref_model, tokenizer, tmp_path):
    w = build_w1(ref_model, tokenizer, tmp_path, tenants=2, requests_per_tenant=3, new_tokens=8)
    assert [r.tenant for r in w.requests] == [0, 0, 0, 1, 1, 1]
    assert w.adapter_dirs == [tmp_path / "tenant-000", tmp_path / "tenant-001"]
    assert len({tuple(r.prompt_ids) for r in w.requests}) == 6
    assert len({r.system_prompt for r in w.requests}) == 2
    for r in w.requests:
        system = len(tokenizer.encode(r.system_prompt, add_special_tokens=False))
        question = len(tokenizer.encode(r.question, add_special_tokens=False))
        assert 230 <= system <= 270 and 30 <= question <= 50, (system, question)
    for t in range(2):
        assert w.shared_prefix_len(t) > 250
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert all(r.prompt_ids[-len(header) :] == header for r in w.requests)
    again = build_w1(ref_model, tokenizer, tmp_path / "again", 2, 3, 8)
    assert [r.prompt_ids for r in again.requests] == [r.prompt_ids for r in w.requests]
    assert _digest(again.adapter_dirs[1]) == _digest(w.adapter_dirs[1])
