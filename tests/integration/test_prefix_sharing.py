"""A system prompt shared by a tenant's requests is computed once, even when the requests
arrive together; another tenant's identical prompt is not shared (namespaces)."""

from __future__ import annotations

import pytest

from bench.reference import greedy
from server import LLM, SamplingParams
from server.engine.engine import EngineConfig

BS = 16
SYSTEM = (
    "You are the help desk of a small public library. Opening hours are nine to five on "
    "weekdays and ten to two on Saturdays. Members may borrow six books for three weeks. "
)
QUESTIONS = ["Can I borrow ten books?", "When do you open on Saturday?", "Do you sell coffee?"]


@pytest.fixture(scope="module")
def llm(model_dir, data_dir):
    return LLM(
        str(model_dir),
        data_dir=data_dir,
        device="cpu",
        dtype="float32",
        engine_config=EngineConfig(block_size=BS, max_num_batched_tokens=512),
    )


def test_shared_system_prompt_computed_once(llm, tokenizer, ref_model):
    system = tokenizer.encode(SYSTEM)
    prompts = [system + tokenizer.encode(q) for q in QUESTIONS]
    shared = (len(system) // BS) * BS
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    stats, sched = llm.engine.stats, llm.engine.scheduler
    computed0, cached0, prompt0 = (
        stats.computed_tokens,
        sched.cached_prompt_tokens,
        sched.prompt_tokens,
    )
    outs = llm.generate(prompts, params, use_tqdm=False)

    assert [o.num_cached_tokens for o in outs] == [0, shared, shared]
    assert sched.cached_prompt_tokens - cached0 == 2 * shared
    assert sched.prompt_tokens - prompt0 == sum(map(len, prompts))
    # Every prompt position once, minus the shared blocks of requests 2 and 3; then 5 decode
    # positions each (the 6th token is sampled, never fed back).
    expected = sum(map(len, prompts)) - 2 * shared + 3 * 5
    assert stats.computed_tokens - computed0 == expected
    for out, prompt in zip(outs, prompts, strict=True):
        ref = greedy(ref_model, prompt, 6)
        want = ref.comparable()
        assert out.token_ids[: len(want)] == want


def test_other_tenant_does_not_hit_the_cache(llm, tokenizer):
    prompt = tokenizer.encode(SYSTEM + "Where is the reading room?")
    params = SamplingParams(max_tokens=2, temperature=0)
    engine = llm.engine
    first = _run(engine, "r-acme-1", prompt, params, "acme")
    other = _run(engine, "r-globex-1", prompt, params, "globex")
    again = _run(engine, "r-acme-2", prompt, params, "acme")
    assert first.num_cached_tokens == 0
    assert other.num_cached_tokens == 0
    assert again.num_cached_tokens == ((len(prompt) - 1) // BS) * BS
    assert first.token_ids == other.token_ids == again.token_ids


def _run(engine, rid, prompt, params, tenant):
    engine.add_request(rid, prompt, params, tenant=tenant)
    while True:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return out
