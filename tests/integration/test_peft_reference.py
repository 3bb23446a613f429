"""The reference itself, pinned down: bench.peft_reference (PEFT generate) against a hand-rolled
greedy loop over the bare HF model, and the adapters of bench.peft_adapters.

PEFT position conventions verified here (peft 0.21.2, transformers 5.23):
- prefix tuning: the P virtual tokens are KV only (no RoPE applied to them); the real tokens
  sit at positions P, P+1, ... (PEFT adds P to the position ids generate derives from the
  attention mask). Positions 0, 1, ... give different logits. With left padding the positions
  still start at P for the first real token, so a padded batch equals one-at-a-time.
- prompt tuning / P-tuning: the soft prompt is the input embeddings at positions 0..P-1, the
  real tokens follow at P, P+1, ... (PEFT drops position ids and lets the model count
  positions over [soft prompt; tokens]). Restarting the real tokens at 0 gives different
  logits. (With left padding PEFT puts the pads between the soft prompt and the tokens and
  counts them, so a padded batch of prompt-tuned requests is not one-at-a-time.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from bench.peft_adapters import make_p_tuning, make_prefix_tuning, make_prompt_tuning
from bench.peft_reference import base_greedy, peft_greedy
from bench.workloads import build_w1

PROMPTS = [[5, 17, 33, 99, 120, 7, 64], [9, 8, 7]]
STEPS = 6


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


@torch.no_grad()
def greedy_after_prefix_kv(model, adapter_dir: Path, prompt: list[int], steps: int, start: int):
    """Greedy loop with the adapter's KV preloaded into a DynamicCache; real token i at
    position ``start + i``. Returns (tokens, logits [steps, vocab])."""
    table = load_file(str(adapter_dir / "adapter_model.safetensors"))["prompt_embeddings"]
    cfg = model.config
    layers, heads, dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    p = table.shape[0]
    kv = table.view(p, layers * 2, heads, dim).permute(1, 2, 0, 3)  # [L*2, heads, P, dim]
    cache = DynamicCache(config=cfg)
    for layer in range(layers):
        cache.update(kv[2 * layer][None], kv[2 * layer + 1][None], layer)
    ids = torch.tensor([prompt])
    positions = torch.arange(start, start + len(prompt))[None]
    return _decode(model, cache, steps, input_ids=ids, position_ids=positions)


@torch.no_grad()
def greedy_after_soft_prompt(
    model, adapter_dir: Path, prompt: list[int], steps: int, restart_positions: bool = False
):
    """Greedy loop over inputs_embeds = [soft prompt; token embeddings]. Positions 0..P+n-1,
    or with ``restart_positions`` 0..P-1 then 0..n-1 for the real tokens."""
    soft = load_file(str(adapter_dir / "adapter_model.safetensors"))["prompt_embeddings"]
    p, n = soft.shape[0], len(prompt)
    embeds = torch.cat([soft, model.get_input_embeddings()(torch.tensor(prompt))])[None]
    positions = (
        torch.arange(p + n)
        if not restart_positions
        else torch.cat([torch.arange(p), torch.arange(n)])
    )
    cache = DynamicCache(config=model.config)
    return _decode(model, cache, steps, inputs_embeds=embeds, position_ids=positions[None])


def _decode(model, cache, steps: int, **first_inputs):
    tokens, logits = [], []
    inputs = first_inputs
    next_position = int(first_inputs["position_ids"][0, -1]) + 1
    for _ in range(steps):
        out = model(**inputs, past_key_values=cache, use_cache=True)
        last = out.logits[0, -1].float()
        tokens.append(int(last.argmax()))
        logits.append(last)
        inputs = {
            "input_ids": torch.tensor([[tokens[-1]]]),
            "position_ids": torch.tensor([[next_position]]),
        }
        next_position += 1
    return tokens, torch.stack(logits)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


# --- tiny model: conventions ---------------------------------------------------------------


def test_prefix_tuning_real_tokens_start_at_position_p(tiny, tmp_path):
    adapter = make_prefix_tuning(tiny, tmp_path / "prefix", num_virtual_tokens=5, seed=0)
    for prompt in PROMPTS:
        ref = peft_greedy(tiny, adapter, [prompt], STEPS, keep_logits=True)[0]
        assert ref.first_tie() is None, ref.margins
        tokens, logits = greedy_after_prefix_kv(tiny, adapter, prompt, STEPS, start=5)
        assert ref.tokens == tokens
        torch.testing.assert_close(ref.logits, logits, atol=1e-4, rtol=0)
        _, zero_based = greedy_after_prefix_kv(tiny, adapter, prompt, STEPS, start=0)
        assert (zero_based[0] - ref.logits[0]).abs().max() > 1e-2


def test_prefix_tuning_left_padded_batch_equals_single(tiny, tmp_path):
    adapter = make_prefix_tuning(tiny, tmp_path / "prefix", num_virtual_tokens=5, seed=1)
    single = peft_greedy(tiny, adapter, PROMPTS, STEPS, keep_logits=True)
    batched = peft_greedy(tiny, adapter, PROMPTS, STEPS, batch_size=2, keep_logits=True)
    for one, many in zip(single, batched, strict=True):
        assert one.tokens == many.tokens
        torch.testing.assert_close(one.logits, many.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("make", [make_prompt_tuning, make_p_tuning])
def test_soft_prompt_occupies_positions_0_to_p(tiny, tmp_path, make):
    adapter = make(tiny, tmp_path / "soft", num_virtual_tokens=4, seed=0)
    for prompt in PROMPTS:
        ref = peft_greedy(tiny, adapter, [prompt], STEPS, keep_logits=True)[0]
        assert ref.first_tie() is None, ref.margins
        tokens, logits = greedy_after_soft_prompt(tiny, adapter, prompt, STEPS)
        assert ref.tokens == tokens
        torch.testing.assert_close(ref.logits, logits, atol=1e-4, rtol=0)
        _, restarted = greedy_after_soft_prompt(
            tiny, adapter, prompt, STEPS, restart_positions=True
        )
        assert (restarted[0] - ref.logits[0]).abs().max() > 1e-2


def test_prompt_tuning_left_padded_batch_is_not_single(tiny, tmp_path):
    """PEFT counts the pads as positions for soft prompts: only the longest prompt of a
    left-padded batch matches its one-at-a-time run. So references for soft prompts run
    one prompt at a time (peft_greedy's default)."""
    adapter = make_prompt_tuning(tiny, tmp_path / "soft", num_virtual_tokens=4, seed=0)
    single = peft_greedy(tiny, adapter, PROMPTS, STEPS, keep_logits=True)
    batched = peft_greedy(tiny, adapter, PROMPTS, STEPS, batch_size=2, keep_logits=True)
    torch.testing.assert_close(single[0].logits, batched[0].logits, atol=1e-4, rtol=0)
    assert (single[1].logits[0] - batched[1].logits[0]).abs().max() > 1e-2


# --- tiny model: the adapter maker -----------------------------------------------------------


def test_adapters_are_deterministic_and_leave_the_base_model_alone(tiny, tmp_path):
    before = _state(tiny)
    assert all(p.requires_grad for p in tiny.parameters())
    for make in (make_prefix_tuning, make_prompt_tuning, make_p_tuning):
        a = make(tiny, tmp_path / f"{make.__name__}-a", num_virtual_tokens=4, seed=7)
        b = make(tiny, tmp_path / f"{make.__name__}-b", num_virtual_tokens=4, seed=7)
        c = make(tiny, tmp_path / f"{make.__name__}-c", num_virtual_tokens=4, seed=8)
        assert _digest(a) == _digest(b) != _digest(c)
        peft_greedy(tiny, a, PROMPTS[:1], 2)
    projected = make_prefix_tuning(tiny, tmp_path / "proj", 4, seed=7, prefix_projection=True)
    assert load_file(str(projected / "adapter_model.safetensors"))["prompt_embeddings"].shape == (
        4,
        2 * 2 * 2 * 16,
    )
    after = _state(tiny)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in tiny.parameters())


def test_ignore_eos_continues_past_eos(tiny):
    free = base_greedy(tiny, [PROMPTS[0]], 20)[0]
    assert len(free.tokens) == 20
    # Make the 6th generated token the EOS, so that both variants meet it.
    eos, saved = free.tokens[5], tiny.generation_config.eos_token_id
    first = free.tokens.index(eos)
    tiny.generation_config.eos_token_id = eos
    try:
        ignoring = base_greedy(tiny, [PROMPTS[0]], 20)[0]
        stopping = base_greedy(tiny, [PROMPTS[0]], 20, ignore_eos=False)[0]
    finally:
        tiny.generation_config.eos_token_id = saved
    assert ignoring.tokens == free.tokens
    assert stopping.tokens == free.tokens[: first + 1]
    assert stopping.margins == free.margins[: first + 1]


# --- the real model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_prompt(tokenizer) -> list[int]:
    messages = [{"role": "user", "content": "Tell me a short story about a dragon."}]
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )


def test_adapters_change_the_real_models_output(ref_model, adapter_dirs, chat_prompt):
    base = base_greedy(ref_model, [chat_prompt], 24)[0].tokens
    for kind, path in adapter_dirs.items():
        assert peft_greedy(ref_model, path, [chat_prompt], 24)[0].tokens != base, kind


def test_real_model_matches_hand_rolled_loops(ref_model, adapter_dirs, chat_prompt):
    for kind in ("prefix", "prefix_proj"):
        path = adapter_dirs[kind]
        p = load_file(str(path / "adapter_model.safetensors"))["prompt_embeddings"].shape[0]
        ref = peft_greedy(ref_model, path, [chat_prompt], 4, keep_logits=True)[0]
        tokens, logits = greedy_after_prefix_kv(ref_model, path, chat_prompt, 4, start=p)
        assert tokens[: len(ref.comparable())] == ref.comparable(), kind
        torch.testing.assert_close(ref.logits, logits, atol=1e-3, rtol=0)
    for kind in ("prompt", "ptuning"):
        path = adapter_dirs[kind]
        ref = peft_greedy(ref_model, path, [chat_prompt], 4, keep_logits=True)[0]
        tokens, logits = greedy_after_soft_prompt(ref_model, path, chat_prompt, 4)
        assert tokens[: len(ref.comparable())] == ref.comparable(), kind
        torch.testing.assert_close(ref.logits, logits, atol=1e-3, rtol=0)


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
