"""The correctness contract: greedy output through the engine equals PEFT's, token for token,
for every adapter kind, in mixed batches (DESIGN.md). Compared up to the first step where the
reference's top-2 logits are closer than 1e-3 (where summation order may pick either)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from adapters_store.formats import ModelShape, parse_adapter, read_peft_dir
from bench.peft_reference import GreedyResult, base_greedy, peft_greedy
from server import LLM, SamplingParams
from server.engine.engine import EngineConfig

N_NEW = 12
SYSTEM = (
    "You are a careful assistant for a shipping company. Answer briefly, name the port, "
    "and never invent tracking numbers. "
)


@pytest.fixture(scope="module")
def llm(model_dir, data_dir, adapter_dirs):
    # A small token budget forces chunked prefill (adapters split across steps, decode mixed in).
    engine = LLM(
        str(model_dir),
        data_dir=data_dir,
        device="cpu",
        dtype="float32",
        engine_config=EngineConfig(block_size=16, max_num_batched_tokens=48),
    )
    for name, path in adapter_dirs.items():
        engine.add_adapter(name, path)
    engine.add_text_adapter("shipping", SYSTEM)
    return engine


def assert_same(got: list[int], ref: GreedyResult, label: str) -> int:
    want = ref.comparable()
    assert len(want) >= 3, f"{label}: reference tie at step {len(want)}; pick another prompt"
    assert got[: len(want)] == want, f"{label}: engine {got} != reference {ref.tokens}"
    return len(want)


@torch.no_grad()
def composed_greedy(model, adapters, prompt_ids: list[int], n: int) -> GreedyResult:
    """Hand-rolled reference for composed adapters: segments placed one after another at
    consecutive positions (prefix-tuning KV appended to the cache as PEFT does for one
    adapter; soft prompts and text run through the model), then greedy decoding."""
    cache = DynamicCache(config=model.config)
    embed = model.get_input_embeddings()
    pending: list[torch.Tensor] = []
    length = 0

    def flush() -> torch.Tensor | None:
        nonlocal length, pending
        if not pending:
            return None
        x = torch.cat(pending).unsqueeze(0)
        pos = torch.arange(length, length + x.shape[1]).unsqueeze(0)
        mask = torch.ones(1, length + x.shape[1], dtype=torch.long)
        out = model(
            inputs_embeds=x,
            position_ids=pos,
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
        )
        length += x.shape[1]
        pending = []
        return out.logits[0, -1]

    for a in adapters:
        if a.kind == "prefix_tuning":
            flush()
            for layer in range(a.kv.shape[0]):
                cache.update(a.kv[layer, 0].unsqueeze(0), a.kv[layer, 1].unsqueeze(0), layer)
            length += a.kv.shape[3]
        else:
            pending.append(a.embeddings)
    pending.append(embed(torch.tensor(prompt_ids)))
    logits = flush()
    tokens, margins = [], []
    for _ in range(n):
        top = logits.topk(2).values
        margins.append(float(top[0] - top[1]))
        tokens.append(int(logits.argmax()))
        pending.append(embed(torch.tensor(tokens[-1:])))
        logits = flush()
    return GreedyResult(tokens, margins)


def test_every_kind_in_one_mixed_batch(llm, ref_model, tokenizer, adapter_dirs):
    def ids(text):
        return tokenizer.encode(text)

    system_ids = list(llm.adapters["shipping"].token_ids)
    cases = [
        # (adapters, prompt ids, reference)
        (["prefix"], ids("The harbour master said")),
        (["prefix"], ids("Ships arriving at dawn usually carry fruit, timber and, on")),
        (["prefix_proj"], ids("Write a short poem about the sea:")),
        (["prompt"], ids("My favourite food is")),
        (["ptuning"], ids("In 1850 the city of Hamburg")),
        ([], ids("The capital of France is")),
        (["shipping"], ids("Where is parcel 17?")),
        (["shipping"], ids("Which port handles grain?")),
        (["prefix", "prompt"], ids("Tell me about")),
        (["ptuning", "prefix_proj", "shipping"], ids("Hello")),
    ]
    params = SamplingParams(max_tokens=N_NEW, temperature=0, ignore_eos=True)
    outs = llm.generate(
        [c[1] for c in cases], params, adapters=[c[0] for c in cases], use_tqdm=False
    )
    shape = ModelShape.from_config(ref_model.config)
    compared = 0
    for (names, prompt), out in zip(cases, outs, strict=True):
        label = "+".join(names) or "bare"
        if not names:
            ref = base_greedy(ref_model, [prompt], N_NEW)[0]
        elif names == ["shipping"]:
            ref = base_greedy(ref_model, [system_ids + prompt], N_NEW)[0]
        elif len(names) == 1:
            ref = peft_greedy(ref_model, adapter_dirs[names[0]], [prompt], N_NEW)[0]
        else:
            canon = []
            for n in names:
                if n == "shipping":
                    ref_ids = torch.tensor(system_ids)
                    canon.append(_Emb(ref_model.get_input_embeddings()(ref_ids)))
                else:
                    canon.append(parse_adapter(*read_peft_dir(adapter_dirs[n]), shape))
            ref = composed_greedy(ref_model, canon, prompt, N_NEW)
        compared += assert_same(out.token_ids, ref, label)
    assert compared >= 0.8 * N_NEW * len(cases)
    # The two "shipping" requests share the text prefix: the second found it cached.
    ship = [o for (names, _), o in zip(cases, outs, strict=True) if names == ["shipping"]]
    assert sorted(o.num_cached_tokens for o in ship) == [0, (len(system_ids) // 16) * 16]


class _Emb:
    """A text segment for ``composed_greedy``: its token embeddings."""

    kind = "text"

    def __init__(self, embeddings: torch.Tensor) -> None:
        self.embeddings = embeddings


def test_single_kinds_match_peft_alone_and_in_batch(llm, ref_model, tokenizer, adapter_dirs):
    """The same request gives the same tokens alone and inside a batch of other tenants."""
    prompt = tokenizer.encode("Once upon a time, in a small village,")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    alone = llm.generate([prompt], params, adapters=[["prompt"]], use_tqdm=False)[0]
    mixed = llm.generate(
        [prompt, prompt, prompt, prompt],
        params,
        adapters=[["prefix"], ["prompt"], [], ["ptuning"]],
        use_tqdm=False,
    )
    assert mixed[1].token_ids == alone.token_ids
    ref = peft_greedy(ref_model, adapter_dirs["prompt"], [prompt], 8)[0]
    assert_same(alone.token_ids, ref, "prompt")
