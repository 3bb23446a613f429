"""Adapters through the tiers: the engine's device tier evicts and reloads without changing
outputs, and a re-uploaded adapter is never served with its old weights."""

from __future__ import annotations

import pytest

from adapters_store.formats import ModelShape, parse_adapter, read_peft_dir
from adapters_store.store import open_store
from bench.peft_adapters import make_prefix_tuning
from bench.reference import adapter_segment, greedy
from server import LLM, SamplingParams
from server.engine.engine import EngineConfig
from server.llm import to_segment

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
P = 12
KV_BYTES = 30 * 2 * 3 * P * 64 * 4  # layers x (K, V) x kv heads x P x head dim x float32


@pytest.fixture(scope="module")
def two_prefixes(ref_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiers")
    return [
        make_prefix_tuning(ref_model, root / f"v{i}", num_virtual_tokens=P, seed=20 + i)
        for i in (1, 2)
    ]


def test_device_tier_evicts_and_reloads_without_changing_outputs(
    model_dir, data_dir, tokenizer, two_prefixes
):
    llm = LLM(
        str(model_dir),
        data_dir=data_dir,
        device="cpu",
        dtype="float32",
        engine_config=EngineConfig(adapter_cache_bytes=KV_BYTES),  # room for one adapter
    )
    llm.add_adapter("a", two_prefixes[0])
    llm.add_adapter("b", two_prefixes[1])
    prompt = tokenizer.encode("The lighthouse keeper wrote")
    runs = [llm.generate([prompt], GREEDY, [[name]], use_tqdm=False)[0] for name in "aba"]
    stats = llm.engine.runner.adapter_tier.stats()
    assert (stats.loads, stats.evictions, stats.resident_entries) == (3, 2, 1)
    assert stats.resident_bytes == KV_BYTES
    assert runs[0].token_ids == runs[2].token_ids
    assert runs[0].token_ids != runs[1].token_ids


def test_reupload_serves_the_new_weights(
    model_dir, data_dir, tokenizer, ref_model, two_prefixes, tmp_path
):
    llm = LLM(str(model_dir), data_dir=data_dir, device="cpu", dtype="float32")
    store = open_store(tmp_path / "store")
    shape = ModelShape.from_config(ref_model.config)
    prompt = tokenizer.encode("Tell me about the harbour")
    outputs = []
    try:
        for version, path in enumerate(two_prefixes, start=1):
            record = store.put("acme", "persona", parse_adapter(*read_peft_dir(path), shape))
            assert record.version == version
            seg = to_segment(store.load(store.get("acme", "persona")), llm.tokenizer)
            llm.engine.add_request(f"v{version}", prompt, GREEDY, [seg], tenant="acme")
            while llm.engine.has_unfinished():
                outputs += [o for o in llm.engine.step() if o.finished]
    finally:
        store.close()
    v1, v2 = outputs
    assert v1.token_ids != v2.token_ids
    for out, path in zip((v1, v2), two_prefixes, strict=True):
        want = greedy(ref_model, prompt, 6, [adapter_segment(ref_model, path)]).comparable()
        assert len(want) >= 3 and out.token_ids[: len(want)] == want
    # The new version's virtual tokens are a new key: nothing of v1 was reused for v2.
    assert v2.num_cached_tokens == 0
