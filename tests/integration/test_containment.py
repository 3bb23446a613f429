"""Containment in the engine (real default model): a request whose computation is not finite,
whose adapter cannot be served, or whose part of the forward raises is stopped alone, with
``finish_reason`` "error" and a typed ``RequestError``; every other request of the same steps
gets exactly the tokens it gets alone, and nothing of the failed one stays in the cache.
"""

from __future__ import annotations

import pytest
import torch

from server import LLM, SamplingParams
from server.engine.request import AdapterSegment

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True)
PROMPTS = ["Once upon a time, there was a little", "The capital of France is", "def add(a, b):"]


@pytest.fixture(scope="module")
def llm(model_dir, data_dir, adapter_dirs):
    engine = LLM(str(model_dir), data_dir=data_dir, device="cpu", dtype="float32")
    engine.add_adapter("prefix", adapter_dirs["prefix"])
    engine.add_adapter("prompt", adapter_dirs["prompt"])
    return engine


def poisoned(llm, kind: str, value: float, key: str) -> AdapterSegment:
    """A segment the upload checks would refuse, put straight into the engine (as if stored
    by an older server): prefix KV or soft-prompt embeddings all equal to ``value``."""
    shape = llm.shape
    if kind == "prefix_tuning":
        kv = torch.full((shape.num_layers, 2, shape.num_kv_heads, 4, shape.head_dim), value)
        return AdapterSegment(key, kind, 4, kv=kv)
    return AdapterSegment(key, kind, 4, embeddings=torch.full((4, shape.hidden_size), value))


def run(llm, requests: list[tuple[str, list[AdapterSegment], SamplingParams]]) -> list:
    """Every request added before the first step (one batch); final outputs in order."""
    engine = llm.engine
    ids = [f"c{i}" for i in range(len(requests))]
    for rid, (prompt, segments, params) in zip(ids, requests, strict=True):
        engine.add_request(rid, llm.tokenizer.encode(prompt), params, segments)
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return [finals[rid] for rid in ids]


@pytest.mark.parametrize(
    ("kind", "value", "error_kind"),
    [
        # Finite, but the scores overflow: NaN in its own rows (runtime detection). A soft
        # prompt this large does not: RMSNorm turns an overflowing row into zeros.
        ("prefix_tuning", 3.3e38, "non_finite"),
        # Not finite at the served dtype: refused by the device tier, never in the cache.
        ("prefix_tuning", float("nan"), "non_finite"),
        ("prefix_tuning", float("inf"), "non_finite"),
        ("prompt_tuning", float("inf"), "non_finite"),
    ],
)
def test_a_non_finite_request_fails_alone(llm, kind, value, error_kind):
    segs = {name: [llm.adapters[name]] for name in ("prefix", "prompt")}
    victims = [
        (PROMPTS[0], segs["prefix"], GREEDY),
        (PROMPTS[1], [], SAMPLED),
        (PROMPTS[2], segs["prompt"], GREEDY),
    ]
    alone = [run(llm, [v])[0].token_ids for v in victims]
    bomb = poisoned(llm, kind, value, key=f"bomb-{kind}-{value}")
    mixed = run(
        llm,
        [(PROMPTS[0], [bomb], GREEDY), *victims, (PROMPTS[1], [bomb], SAMPLED)],
    )
    assert [o.token_ids for o in mixed[1:4]] == alone
    assert [o.finish_reason for o in mixed[1:4]] == ["length"] * 3
    for failed in (mixed[0], mixed[4]):
        assert failed.finish_reason == "error" and failed.finished
        assert failed.error.kind == error_kind, failed.error
    engine = llm.engine
    assert engine.seqs == {} and not engine.scheduler.running
    assert engine.pool.num_free + engine.tree.num_cached_blocks == engine.pool.num_blocks
    # Nothing of the failed requests was cached: the victims still get their solo tokens.
    assert [run(llm, [v])[0].token_ids for v in victims] == alone


def test_a_forward_that_raises_is_split_until_the_request_that_raises(llm):
    """A segment whose KV has the wrong shape makes the forward raise: the step is re-run in
    halves, the request with it fails alone ("engine"), the others get their solo tokens."""
    wrong = AdapterSegment("bad-shape", "prefix_tuning", 4, kv=torch.zeros(2, 2, 1, 4, 8))
    victims = [(p, [], GREEDY) for p in PROMPTS]
    alone = [run(llm, [v])[0].token_ids for v in victims]
    before = llm.engine.stats.split_forwards
    mixed = run(llm, [victims[0], victims[1], (PROMPTS[2], [wrong], GREEDY), victims[2]])
    assert [mixed[i].token_ids for i in (0, 1, 3)] == alone
    assert mixed[2].finish_reason == "error" and mixed[2].error.kind == "engine"
    assert llm.engine.stats.split_forwards > before


def test_stop_strings_are_found_across_steps_without_rescanning(llm):
    """The stop-string search looks only at new text (plus the overlap a stop string may
    straddle): a stop string split over two tokens still stops the request, cut exactly."""
    base = run(llm, [(PROMPTS[0], [], SamplingParams(max_tokens=12, temperature=0))])[0]
    text = base.text
    stop = text[5:11]  # spans a token boundary somewhere after the first token
    out = run(llm, [(PROMPTS[0], [], SamplingParams(max_tokens=12, temperature=0, stop=[stop]))])
    assert out[0].finish_reason == "stop" and out[0].text == text[:5]
