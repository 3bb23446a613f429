"""The correctness contract: greedy output through the engine equals the hand reference's
(``bench.reference``: PEFT's adapter math on the bare HF model), token for token, for every
adapter kind, alone and composed, in mixed batches. Compared up to the first step where the
reference's top-2 logits are closer than 1e-3 (where summation order may pick either)."""

from __future__ import annotations

import pytest

from bench.reference import GreedyResult, greedy, text_segment
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


def test_every_kind_in_one_mixed_batch(llm, ref_model, ref_segments, tokenizer):
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
    segments = {**ref_segments, "shipping": text_segment(system_ids)}
    compared = 0
    for (names, prompt), out in zip(cases, outs, strict=True):
        label = "+".join(names) or "bare"
        ref = greedy(ref_model, prompt, N_NEW, [segments[n] for n in names])
        compared += assert_same(out.token_ids, ref, label)
    assert compared >= 0.8 * N_NEW * len(cases)
    # The two "shipping" requests share the text prefix: the second found it cached.
    ship = [o for (names, _), o in zip(cases, outs, strict=True) if names == ["shipping"]]
    assert sorted(o.num_cached_tokens for o in ship) == [0, (len(system_ids) // 16) * 16]


def test_single_kinds_match_the_reference_alone_and_in_batch(
    llm, ref_model, ref_segments, tokenizer
):
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
    ref = greedy(ref_model, prompt, 8, [ref_segments["prompt"]])
    assert_same(alone.token_ids, ref, "prompt")
