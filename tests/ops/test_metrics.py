"""server/metrics.py: the exposition's names, types and label sets; values read from the
snapshots a real LLMEngine (a tiny random Llama) publishes and a real AdapterStore; the
snapshots themselves (built incrementally, published by ``AsyncEngine``'s thread); the API-side
observations; the label rule (bounded values only, nothing a client sent)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import time
from collections.abc import Callable

import pytest
import torch
from ops_helpers import ROOT, exposition_samples
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save as st_save
from transformers import LlamaConfig, LlamaForCausalLM

from adapters_store.formats import CanonicalAdapter, ModelShape, parse_adapter
from adapters_store.store import open_store
from adapters_store.tiers import LOAD_BUCKETS_S
from server.async_engine import AsyncEngine
from server.engine.engine import EngineConfig, LLMEngine
from server.engine.request import AdapterSegment, SamplingParams
from server.engine.snapshot import EngineSnapshot, SnapshotBuilder
from server.engine_client import EngineInput
from server.metrics import (
    ADMISSIONS,
    ERROR_TYPES,
    FINISH_REASONS,
    ITL_BUCKETS_S,
    REQUEST_BUCKETS_S,
    ROUTES,
    SPECS,
    TIERS,
    TOKEN_BUCKETS,
    TTFT_BUCKETS_S,
    Metrics,
)
from server.served_model import ModelFacts, ServedModel, to_segment

# family -> (type, label names of its samples other than `le`): the contract.
EXPECTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "prefix_serve_requests_running": ("gauge", ()),
    "prefix_serve_requests_waiting": ("gauge", ()),
    "prefix_serve_kv_cache_usage_ratio": ("gauge", ()),
    "prefix_serve_kv_cache_occupied_ratio": ("gauge", ()),
    "prefix_serve_prompt_tokens": ("counter", ()),
    "prefix_serve_generation_tokens": ("counter", ()),
    "prefix_serve_prefix_cache_queries": ("counter", ()),
    "prefix_serve_prefix_cache_hits": ("counter", ()),
    "prefix_serve_preemptions": ("counter", ()),
    "prefix_serve_share_preemptions": ("counter", ()),
    "prefix_serve_engine_steps": ("counter", ()),
    "prefix_serve_adapters_running": ("gauge", ()),
    "prefix_serve_adapters_waiting": ("gauge", ()),
    "prefix_serve_adapter_tier_hits": ("counter", ("tier",)),
    "prefix_serve_adapter_tier_misses": ("counter", ("tier",)),
    "prefix_serve_adapter_tier_loads": ("counter", ("tier",)),
    "prefix_serve_adapter_tier_load_failures": ("counter", ("tier",)),
    "prefix_serve_adapter_tier_evictions": ("counter", ("tier",)),
    "prefix_serve_adapter_tier_resident_adapters": ("gauge", ("tier",)),
    "prefix_serve_adapter_tier_resident_bytes": ("gauge", ("tier",)),
    "prefix_serve_adapter_tier_load_seconds": ("histogram", ("tier",)),
    "prefix_serve_time_to_first_token_seconds": ("histogram", ()),
    "prefix_serve_inter_token_latency_seconds": ("histogram", ()),
    "prefix_serve_e2e_request_latency_seconds": ("histogram", ()),
    "prefix_serve_request_queue_time_seconds": ("histogram", ()),
    "prefix_serve_request_prompt_tokens": ("histogram", ()),
    "prefix_serve_request_generation_tokens": ("histogram", ()),
    "prefix_serve_requests_finished": ("counter", ("finish_reason",)),
    "prefix_serve_request_errors": ("counter", ("error_type",)),
    "prefix_serve_http_requests": ("counter", ("route", "status")),
    "prefix_serve_admissions": ("counter", ("outcome",)),
}

# Label name -> the values it may take. `le` takes histogram bounds (a fixed set per family).
LE_VALUES = {
    "+Inf" if math.isinf(b) else repr(float(b))
    for buckets in (TTFT_BUCKETS_S, ITL_BUCKETS_S, REQUEST_BUCKETS_S, TOKEN_BUCKETS, LOAD_BUCKETS_S)
    for b in (*buckets, math.inf)
}
ALLOWED_LABELS = {
    "tier": set(TIERS),
    "finish_reason": set(FINISH_REASONS),
    "error_type": set(ERROR_TYPES),
    "route": set(ROUTES),
    "status": {str(code) for code in range(100, 600)} | {"other"},
    "outcome": set(ADMISSIONS),
}

VOCAB, BLOCK, NUM_BLOCKS = 64, 4, 32
CONFIG = LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
)
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 8 * 4  # layers * (k, v) * kv heads * head_dim * float32


class DigitsTokenizer:
    """All the engine asks of a tokenizer: an eos id and decode()."""

    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).eval()


@pytest.fixture
def engine(tiny_model) -> LLMEngine:
    config = EngineConfig(
        block_size=BLOCK,
        max_num_seqs=2,
        max_num_batched_tokens=64,
        kv_cache_memory=NUM_BLOCKS * BLOCK * KV_BYTES_PER_TOKEN,
    )
    engine = LLMEngine(tiny_model, DigitsTokenizer(), config)
    assert engine.pool.num_blocks == NUM_BLOCKS
    return engine


def prefix_adapter(seed: int) -> CanonicalAdapter:
    """A 4-token prefix-tuning adapter for the tiny model."""
    shape = ModelShape.from_config(CONFIG)
    weights = torch.randn(4, shape.prefix_width, generator=torch.Generator().manual_seed(seed))
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": 4,
        "num_layers": 2,
        "num_attention_heads": 2,
        "token_dim": 16,
    }
    return parse_adapter(
        json.dumps(config).encode(), st_save({"prompt_embeddings": weights}), shape
    )


@pytest.fixture
def store(tmp_path):
    """A real store holding one 4-token prefix-tuning adapter for the tiny model."""
    store = open_store(tmp_path, gc_interval_s=None)
    store.put("acme", "pirate", prefix_adapter(1))
    yield store
    store.close()


def snapshots_of(engine: LLMEngine) -> Callable[[], EngineSnapshot]:
    """A snapshot built at each scrape, in this (the engine's only) thread: what the
    ``AsyncEngine`` loop publishes after a step. This test drives the engine itself, so the
    adapter census is recounted first (the loop follows it by events instead)."""
    builder = SnapshotBuilder(engine)

    def build() -> EngineSnapshot:
        builder.resync()
        return builder.build()

    return build


def values(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    body, _ = metrics.render()
    return {(s.name, frozenset(s.labels.items())): s.value for s in exposition_samples(body)}


def value(vals: dict, name: str, **labels: str) -> float:
    return vals[(name, frozenset(labels.items()))]


def test_families_names_types_and_label_sets_exactly() -> None:
    metrics = Metrics()
    metrics.count_http_request("/v1/models", 200)  # http counter has series only once used
    body, content_type = metrics.render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert {n: f.type for n, f in families.items()} == {n: t for n, (t, _) in EXPECTED.items()}
    for name, (_, labels) in EXPECTED.items():
        seen = {tuple(sorted(set(s.labels) - {"le"})) for s in families[name].samples}
        assert seen == {tuple(sorted(labels))}, name
    assert set(SPECS) == set(EXPECTED)
    assert all(spec.help for spec in SPECS.values())


def test_readme_table_lists_every_metric_with_its_vllm_counterpart() -> None:
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("| `prefix_serve_"):
            name, kind, labels, _meaning, vllm = (c.strip() for c in line.strip("|").split("|"))
            rows[name.strip("`").removesuffix("_total")] = (kind, labels, vllm)
    assert rows == {
        spec.name: (
            spec.kind,
            ", ".join(f"`{label}`" for label in spec.labels) or "–",
            f"`{spec.vllm}`" if spec.vllm else "none",
        )
        for spec in SPECS.values()
    }


def test_values_mirror_a_real_engine_and_store(engine: LLMEngine, store) -> None:
    metrics = Metrics(snapshots_of(engine), store)
    tokenizer = DigitsTokenizer()
    # The API resolves the adapter once per request: host tier miss + load, then a hit.
    segs = [to_segment(store.load(store.get("acme", "pirate")), tokenizer) for _ in range(2)]
    greedy = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (3, 2, 4)]
    prompt = list(range(3, 11))  # 8 tokens; with the adapter's 4 virtual tokens: 12 positions
    engine.add_request("r1", prompt, greedy[0], [segs[0]], tenant="acme")
    engine.add_request("r2", prompt, greedy[1], [segs[1]], tenant="acme")
    engine.add_request("r3", list(range(20, 26)), greedy[2], tenant="acme")

    v = values(metrics)
    assert value(v, "prefix_serve_requests_waiting") == 3
    assert value(v, "prefix_serve_requests_running") == 0
    assert value(v, "prefix_serve_adapters_waiting") == 1  # one adapter, two requests
    assert value(v, "prefix_serve_adapters_running") == 0
    assert value(v, "prefix_serve_kv_cache_usage_ratio") == 0
    host = {"tier": "host"}
    assert value(v, "prefix_serve_adapter_tier_misses_total", **host) == 1
    assert value(v, "prefix_serve_adapter_tier_loads_total", **host) == 1
    assert value(v, "prefix_serve_adapter_tier_hits_total", **host) == 1
    assert value(v, "prefix_serve_adapter_tier_resident_adapters", **host) == 1
    assert value(v, "prefix_serve_adapter_tier_resident_bytes", **host) == 4 * KV_BYTES_PER_TOKEN
    assert value(v, "prefix_serve_adapter_tier_load_seconds_count", **host) == 1
    assert value(v, "prefix_serve_adapter_tier_load_seconds_bucket", le="+Inf", **host) == 1

    # Step 1 (seats for 2): r1 (12 positions) and r3 (6); r2 waits for the adapter block r1
    # is computing.
    engine.step()
    v = values(metrics)
    assert value(v, "prefix_serve_requests_running") == 2
    assert value(v, "prefix_serve_requests_waiting") == 1
    assert value(v, "prefix_serve_adapters_running") == 1
    assert value(v, "prefix_serve_adapters_waiting") == 1
    assert value(v, "prefix_serve_kv_cache_usage_ratio") == 5 / NUM_BLOCKS  # 3 + 2 blocks
    assert value(v, "prefix_serve_prompt_tokens_total") == 18
    assert value(v, "prefix_serve_generation_tokens_total") == 2
    device = {"tier": "device"}
    assert value(v, "prefix_serve_adapter_tier_misses_total", **device) == 1
    assert value(v, "prefix_serve_adapter_tier_loads_total", **device) == 1
    assert value(v, "prefix_serve_adapter_tier_resident_adapters", **device) == 1
    assert value(v, "prefix_serve_adapter_tier_resident_bytes", **device) == 4 * KV_BYTES_PER_TOKEN

    while engine.has_unfinished():
        engine.step()
    v = values(metrics)
    assert value(v, "prefix_serve_requests_running") == 0
    assert value(v, "prefix_serve_requests_waiting") == 0
    assert value(v, "prefix_serve_adapters_running") == 0
    assert value(v, "prefix_serve_prompt_tokens_total") == 12 + 12 + 6
    assert value(v, "prefix_serve_prefix_cache_queries_total") == 30
    # r2 found r1's first two blocks (4 virtual + 4 prompt tokens); its last block is
    # recomputed because the last prompt position's logits pick its first token.
    assert value(v, "prefix_serve_prefix_cache_hits_total") == 8
    assert value(v, "prefix_serve_generation_tokens_total") == 3 + 2 + 4
    assert value(v, "prefix_serve_engine_steps_total") == 5
    assert value(v, "prefix_serve_preemptions_total") == 0
    assert value(v, "prefix_serve_share_preemptions_total") == 0
    # Nothing runs; the finished requests' full blocks stay cached (evictable).
    assert value(v, "prefix_serve_kv_cache_usage_ratio") == 0
    assert value(v, "prefix_serve_kv_cache_occupied_ratio") == engine.pool.usage() > 0
    stats = engine.runner.adapter_tier.stats()
    assert value(v, "prefix_serve_adapter_tier_hits_total", **device) == stats.hits
    assert value(v, "prefix_serve_adapter_tier_evictions_total", **device) == 0


def served_of(engine: LLMEngine) -> ServedModel:
    facts = ModelFacts(
        model_id="tiny",
        max_model_len=engine.max_model_len,
        vocab_size=VOCAB,
        eos_token_ids=engine.eos_ids,
        shape=ModelShape.from_config(CONFIG),
        block_size=BLOCK,
        num_kv_blocks=NUM_BLOCKS,
        max_num_seqs=2,
        device="cpu",
        dtype="float32",
    )
    return ServedModel(facts, DigitsTokenizer(), engine)


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_async_engine_publishes_snapshots_after_steps_and_commands(engine: LLMEngine) -> None:
    """Zero until the model has loaded; then what the engine thread published: the engine as
    loaded, its state after a request's steps, and after a command that changed it with no
    step to follow. The scrape reads only the published snapshot."""
    gate = threading.Event()

    def build() -> ServedModel:
        assert gate.wait(10)
        return served_of(engine)

    async_engine = AsyncEngine(build, capacity=4)
    metrics = Metrics(async_engine.snapshot)
    loop = asyncio.new_event_loop()  # never run: requests added by a call deliver nothing
    async_engine.start(loop)
    try:
        assert async_engine.snapshot() == EngineSnapshot()
        assert value(values(metrics), "prefix_serve_requests_waiting") == 0
        assert value(values(metrics), "prefix_serve_adapter_tier_misses_total", tier="device") == 0
        gate.set()
        wait_until(lambda: async_engine.ready)
        tier = engine.runner.adapter_tier.stats()
        assert async_engine.snapshot() == EngineSnapshot(free_blocks=NUM_BLOCKS, device_tier=tier)

        params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        async_engine.call_blocking(lambda m: m.engine.add_request("r", [5, 6, 7], params))
        wait_until(lambda: async_engine.snapshot().generation_tokens == 2)
        # Step 1 computes the 3 prompt positions, step 2 the first token's; the second token
        # fills block 0 (4 positions), which stays cached when the request finishes.
        assert async_engine.snapshot() == EngineSnapshot(
            kv_occupied=1 / NUM_BLOCKS,
            free_blocks=NUM_BLOCKS - 1,
            cached_blocks=1,
            prompt_tokens=3,
            generation_tokens=2,
            computed_tokens=4,
            steps=2,
            device_tier=tier,
        )
        v = values(metrics)
        assert value(v, "prefix_serve_engine_steps_total") == 2
        assert value(v, "prefix_serve_kv_cache_occupied_ratio") == 1 / NUM_BLOCKS

        async_engine.call_blocking(lambda m: m.engine.tree.clear_namespace(("default",)))
        wait_until(lambda: async_engine.snapshot().cached_blocks == 0)
        snapshot = async_engine.snapshot()
        assert (snapshot.free_blocks, snapshot.kv_occupied, snapshot.steps) == (NUM_BLOCKS, 0, 2)
        assert value(values(metrics), "prefix_serve_kv_cache_occupied_ratio") == 0
    finally:
        async_engine.stop()
        loop.close()


def walked(engine: LLMEngine) -> tuple[int, int, int, int, float]:
    """(running, waiting, adapters running, adapters waiting, KV usage) by walking every
    queue and block table: what the scrape read before snapshots existed."""
    running = list(engine.scheduler.running)
    waiting = [seq for queue in engine.scheduler.waiting.values() for seq in queue]

    def adapters(seqs: list) -> int:
        return len({seg.key for seq in seqs for _, _, seg in seq.virtual})

    held = {b for seq in running for b in seq.block_table}
    return (
        len(running),
        len(waiting),
        adapters(running),
        adapters(waiting),
        len(held) / engine.pool.num_blocks,
    )


def test_snapshot_counts_equal_a_walk_of_the_queues(engine: LLMEngine) -> None:
    """The adapter census followed by events (``entered`` after each add, ``left`` after each
    abort and finished output: what the engine loop reports) gives the same snapshot as one
    recounted from scratch, and its counts and KV usage equal a full walk of the queues and
    block tables, after every operation of a random run: adds (requests with 0-2 of 3
    adapters, one of them twice; request ids reused once finished), aborts and steps."""
    tokenizer = DigitsTokenizer()
    segs: list[AdapterSegment] = [to_segment(prefix_adapter(i), tokenizer) for i in (1, 2, 3)]
    builder = SnapshotBuilder(engine)
    rng = random.Random(7)
    seen = {"adds": 0, "reused": 0, "aborts": 0, "steps": 0, "adapters_waiting": 0}
    used: set[str] = set()
    for _ in range(120):
        roll = rng.random()
        free_ids = [f"r{i}" for i in range(6) if f"r{i}" not in engine.seqs]
        if roll < 0.4 and free_ids:
            rid = rng.choice(free_ids)
            seen["reused"] += rid in used
            used.add(rid)
            chosen = rng.choice([[], [segs[0]], [segs[1], segs[2]], [segs[2], segs[2]]])
            prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 12))]
            params = SamplingParams(max_tokens=rng.randrange(1, 6), temperature=0)
            seq = engine.add_request(rid, prompt, params, chosen, rng.choice(["acme", "globex"]))
            builder.entered(seq)
            seen["adds"] += 1
        elif roll < 0.55 and engine.seqs:
            rid = rng.choice(sorted(engine.seqs))
            engine.abort(rid)
            builder.left(rid)
            seen["aborts"] += 1
        elif engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    builder.left(out.request_id)
            seen["steps"] += 1
        snap = builder.build()
        assert snap == SnapshotBuilder(engine).build()  # a fresh builder recounts
        got = (snap.running, snap.waiting, snap.adapters_running, snap.adapters_waiting)
        assert (*got, snap.kv_usage) == walked(engine)
        seen["adapters_waiting"] += snap.adapters_waiting > 0
    # The run went through every kind of change the census must follow.
    assert all(count > 0 for count in seen.values()), seen


def test_async_engine_snapshots_follow_submissions_and_aborts(engine: LLMEngine) -> None:
    """Through a real ``AsyncEngine``: requests with adapters submitted while the engine is
    held, one submission aborted, one request ended by a call. A probe that runs alone between
    two steps sees the state the previous step's published snapshot describes, so that
    snapshot must equal a walk of the engine at that moment, until every request is done."""
    tokenizer = DigitsTokenizer()
    a, b, c = (to_segment(prefix_adapter(i), tokenizer) for i in (1, 2, 3))
    async_engine = AsyncEngine(lambda: served_of(engine), capacity=8)
    loop = asyncio.new_event_loop()  # never run: outputs are left in its queue
    async_engine.start(loop)
    try:
        wait_until(lambda: async_engine.ready)
        entered, gate = threading.Event(), threading.Event()
        hold = threading.Thread(
            target=async_engine.call_blocking,
            args=(lambda _m: (entered.set(), gate.wait(10)), 20),
        )
        hold.start()
        assert entered.wait(10)
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        subs = [
            async_engine.submit([EngineInput([5, 6, 7], params, segs, tenant)])
            for segs, tenant in (([a], "acme"), ([a, b], "acme"), ([c], "globex"), ([], "acme"))
        ]
        gate.set()
        hold.join(10)

        def probe() -> tuple[EngineSnapshot, tuple[int, int, int, int, float]]:
            # The first call may share its batch with commands sent before it (applied, not
            # yet published); the second then runs alone.
            async_engine.call_blocking(lambda _m: None)
            return async_engine.call_blocking(lambda m: (async_engine.snapshot(), walked(m.engine)))

        def end_request(rid: str) -> None:
            async_engine.call_blocking(lambda m: m.engine.abort(rid))

        seen: list[tuple[int, int, int, int]] = []
        while True:
            snapshot, walk = probe()
            counts = (snapshot.running, snapshot.waiting)
            assert (*counts, snapshot.adapters_running, snapshot.adapters_waiting) == walk[:4]
            assert snapshot.kv_usage == walk[4]
            seen.append(walk[:4])
            if len(seen) == 2:
                async_engine.abort(subs[0])  # its adapter a stays in use by the second
            if len(seen) == 4:
                end_request(subs[1].ids[0])  # behind the loop's back: a call
            if walk[:2] == (0, 0):
                break
        # Fair admission: acme's oldest (a), then globex's (c); a+b and the bare one wait.
        assert seen[0] == (2, 2, 2, 2)
        assert len(seen) >= 6  # the abort and the call were both followed
    finally:
        async_engine.stop()
        loop.close()


def test_request_observations_land_in_exact_buckets() -> None:
    metrics = Metrics()
    metrics.observe_request(0.03, [0.004, 0.02, 0.02], 0.09, 0.002, "stop", 12, 4)
    metrics.observe_request(None, [], 0.5, None, "abort", 7, 0)
    metrics.observe_request(0.2, [], 0.2, 0.15, "length", 3000, 1)
    metrics.count_error("overloaded_error")
    metrics.count_error("overloaded_error")
    metrics.count_http_request("/v1/completions", 429)
    v = values(metrics)

    ttft = "prefix_serve_time_to_first_token_seconds"
    assert value(v, ttft + "_count") == 2
    assert value(v, ttft + "_sum") == pytest.approx(0.23)
    assert value(v, ttft + "_bucket", le="0.02") == 0
    assert value(v, ttft + "_bucket", le="0.04") == 1
    assert value(v, ttft + "_bucket", le="0.25") == 2
    itl = "prefix_serve_inter_token_latency_seconds"
    assert value(v, itl + "_count") == 3
    assert value(v, itl + "_bucket", le="0.005") == 1
    assert value(v, itl + "_bucket", le="0.025") == 3
    e2e = "prefix_serve_e2e_request_latency_seconds"
    assert value(v, e2e + "_count") == 3
    assert value(v, e2e + "_bucket", le="0.1") == 1
    assert value(v, e2e + "_bucket", le="0.3") == 2
    assert value(v, e2e + "_bucket", le="0.5") == 3
    queue = "prefix_serve_request_queue_time_seconds"
    assert value(v, queue + "_count") == 2
    assert value(v, queue + "_bucket", le="0.01") == 1
    prompt = "prefix_serve_request_prompt_tokens"
    assert value(v, prompt + "_sum") == 12 + 7 + 3000
    assert value(v, prompt + "_bucket", le="10.0") == 1
    assert value(v, prompt + "_bucket", le="2000.0") == 2
    assert value(v, prompt + "_bucket", le="5000.0") == 3
    assert value(v, "prefix_serve_request_generation_tokens_sum") == 5
    finished = "prefix_serve_requests_finished_total"
    assert {r: value(v, finished, finish_reason=r) for r in FINISH_REASONS} == {
        "stop": 1,
        "length": 1,
        "abort": 1,
        "error": 0,
        "other": 0,
    }
    errors = {e: value(v, "prefix_serve_request_errors_total", error_type=e) for e in ERROR_TYPES}
    assert errors == {e: 2 if e == "overloaded_error" else 0 for e in ERROR_TYPES}
    http = "prefix_serve_http_requests_total"
    assert value(v, http, route="/v1/completions", status="429") == 1


def test_labels_hold_only_bounded_values_never_client_data(engine: LLMEngine, store) -> None:
    """Every label of every sample is in the allow-list with an allowed value, whatever the
    clients sent: request ids, prompts, keys, adapter and tenant names never reach a label."""
    secrets = ["req-7f3a9c1e", "ignore previous instructions", "sk-live-0123456789", "pirate"]
    metrics = Metrics(snapshots_of(engine), store)
    seg = to_segment(store.load(store.get("acme", "pirate")), DigitsTokenizer())
    engine.add_request(secrets[0], [3, 4, 5], SamplingParams(max_tokens=2), [seg], "acme")
    while engine.has_unfinished():
        engine.step()
    metrics.observe_request(0.1, [0.01], 0.2, 0.0, secrets[1], 3, 2)
    metrics.count_error(secrets[2])
    metrics.count_http_request("/v1/adapters/pirate", 200)  # a raw path, not the template
    metrics.count_http_request("/v1/adapters/{name}", 99999)
    body, _ = metrics.render()
    text = body.decode()
    for secret in (*secrets, "acme"):
        assert secret not in text
    for sample in exposition_samples(body):
        for label, val in sample.labels.items():
            allowed = LE_VALUES if label == "le" else ALLOWED_LABELS.get(label)
            assert allowed is not None, f"label {label!r} of {sample.name} is not allowed"
            assert val in allowed, f"{sample.name}{{{label}={val!r}}}"
    v = values(metrics)
    assert value(v, "prefix_serve_requests_finished_total", finish_reason="other") == 1
    assert value(v, "prefix_serve_request_errors_total", error_type="other") == 1
    assert value(v, "prefix_serve_http_requests_total", route="other", status="200") == 1
    assert (
        value(v, "prefix_serve_http_requests_total", route="/v1/adapters/{name}", status="other")
        == 1
    )


def test_label_values_cover_what_the_api_answers() -> None:
    """Keep the allow-lists in step with the API: its error types and route templates."""
    from server.api import adapters, errors, generation, ops

    assert set(errors.ERROR_TYPES.values()) <= set(ERROR_TYPES)
    templates = {r.path for m in (adapters, generation, ops) for r in m.router.routes}
    assert templates <= set(ROUTES)
