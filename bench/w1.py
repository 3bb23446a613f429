"""W1 of docs/benchmarks.md: multi-tenant prefix-tuning workload on the CPU, the engine against
PEFT baselines A (one request at a time) and B (one batch per adapter), in one process, on the
same inputs. Prints a table, writes JSON.

Every system's tokens are checked against the hand reference (``bench.reference``): a baseline
that does not reproduce what the adapters mean (as PEFT's ``generate`` did not with
transformers 5.24, which dropped the prefix) is not doing the work, and its figure is flagged.

    prefix-serve bench w1 [--tenants 4] [--requests 4] [--new-tokens 32] [--json FILE]
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from bench.baselines import baseline_a, baseline_b
from bench.reference import GreedyResult, adapter_segment, greedy
from bench.workloads import Workload, build_w1
from server.engine.engine import EngineConfig
from server.engine.request import SamplingParams
from server.llm import LLM

# The engine's configuration in W1 (and on both sides of W2's comparison with it).
W1_ENGINE = EngineConfig(max_num_seqs=256, max_num_batched_tokens=2048)


@dataclass
class Row:
    name: str
    tokens: int
    seconds: float
    tok_per_s: float
    matches_reference: float | None = None  # share of requests equal to the hand reference


def measured_matmul_flops(seconds: float = 1.0) -> float:
    """FLOP/s of float32 matrix products shaped like the model's (2 threads as configured)."""
    a = torch.randn(256, 576)
    b = torch.randn(576, 1536)
    torch.matmul(a, b)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        n += 1
    return n * 2 * 256 * 576 * 1536 / (time.perf_counter() - start)


def workload_flops(config, workload: Workload) -> float:
    """FLOPs of W1 with each tenant's shared prompt prefix computed once: per computed
    position 2 x layer weights plus attention over its context; the LM head for generated
    tokens only. Prefix-tuning virtual tokens cost nothing (their KV is given)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_width = config.num_attention_heads * head_dim
    kv_width = config.num_key_value_heads * head_dim
    per_layer = hidden * (2 * q_width + 2 * kv_width) + 3 * hidden * config.intermediate_size
    dense = 2 * layers * per_layer
    attn_per_ctx = 2 * 2 * layers * q_width  # QK^T and PV, per context position
    head = 2 * hidden * config.vocab_size
    p = 32  # virtual tokens
    total = 0.0
    for tenant in range(workload.tenants):
        shared = workload.shared_prefix_len(tenant)
        for i, req in enumerate(r for r in workload.requests if r.tenant == tenant):
            first = 0 if i == 0 else shared
            for pos in range(first, len(req.prompt_ids) + workload.new_tokens - 1):
                total += dense + attn_per_ctx * (p + pos + 1)
            total += head * workload.new_tokens
    return total


def reference_results(base, workload: Workload) -> list[GreedyResult]:
    """The hand reference's greedy tokens for every request, in the workload's order."""
    segments = [adapter_segment(base, path) for path in workload.adapter_dirs]
    return [
        greedy(base, r.prompt_ids, workload.new_tokens, [segments[r.tenant]])
        for r in workload.requests
    ]


def matches(tokens: list[list[int]], refs: list[GreedyResult]) -> float:
    """Share of requests whose tokens equal the reference's up to its first near-tie."""
    pairs = zip(tokens, refs, strict=True)
    return sum(t[: len(r.comparable())] == r.comparable() for t, r in pairs) / len(refs)


def run_engine(llm: LLM, workload: Workload) -> tuple[list[list[int]], float]:
    params = SamplingParams(max_tokens=workload.new_tokens, temperature=0, ignore_eos=True)
    names = [[f"tenant-{r.tenant}"] for r in workload.requests]
    prompts = [r.prompt_ids for r in workload.requests]
    llm.generate(
        prompts[:1], SamplingParams(max_tokens=2, temperature=0), [["tenant-0"]], use_tqdm=False
    )
    llm.engine.tree.clear_namespace(("default",))  # the warm-up must not pre-cache anything
    start = time.perf_counter()
    outs = llm.generate(prompts, params, adapters=names, use_tqdm=False)
    return [o.token_ids for o in outs], time.perf_counter() - start


def run(
    tenants: int = 4,
    requests: int = 4,
    new_tokens: int = 32,
    baselines: str = "AB",
    model: str = "default",
    data_dir: str = "./data",
    json_path: str | None = None,
    threads: int | None = None,
) -> dict:
    if threads:
        torch.set_num_threads(threads)
    llm = LLM(
        model,
        data_dir=data_dir,
        device="cpu",
        dtype="float32",
        engine_config=W1_ENGINE,
    )
    # The baselines get their own copy: the engine's copy routes attention through ours.
    base = AutoModelForCausalLM.from_pretrained(
        str(_model_path(model, data_dir)), dtype=torch.float32
    ).eval()
    with tempfile.TemporaryDirectory() as tmp:
        wl = build_w1(base, llm.tokenizer, tmp, tenants, requests, new_tokens)
        for t, path in enumerate(wl.adapter_dirs):
            llm.add_adapter(f"tenant-{t}", path)
        cached_before = llm.engine.scheduler.cached_prompt_tokens
        tokens, seconds = run_engine(llm, wl)
        cached = llm.engine.scheduler.cached_prompt_tokens - cached_before
        refs = reference_results(base, wl)
        rows = [Row("prefix-serve", sum(map(len, tokens)), seconds, 0.0, matches(tokens, refs))]
        for name in baselines:
            res = (baseline_a if name == "A" else baseline_b)(base, wl)
            rows.append(Row(name, res.generated, res.seconds, 0.0, matches(res.tokens, refs)))
        flops = workload_flops(base.config, wl)
    rate = measured_matmul_flops()
    for r in rows:
        r.tok_per_s = r.tokens / r.seconds
    floor_s = flops / rate
    result = {
        "workload": {
            "name": "W1",
            "tenants": tenants,
            "requests_per_tenant": requests,
            "new_tokens": new_tokens,
            "prompt_tokens": [len(r.prompt_ids) for r in wl.requests],
        },
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
        "rows": [asdict(r) for r in rows],
        "cached_prompt_tokens": cached,
        "floor": {"flops": flops, "matmul_flops_per_s": rate, "seconds": floor_s},
    }
    by = {r.name: r for r in rows}
    for name in baselines:
        result[f"speedup_vs_{name}"] = rows[0].tok_per_s / by[name].tok_per_s
    result["engine_over_floor"] = seconds / floor_s
    result["all_match_reference"] = all(r.matches_reference == 1.0 for r in rows)
    print(format_table(result))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def _model_path(model: str, data_dir: str) -> Path:
    from server.model_loader import resolve_model_dir

    return resolve_model_dir(model, Path(data_dir))[0]


def format_table(result: dict) -> str:
    w = result["workload"]
    lines = [
        f"W1: {w['tenants']} tenants x {w['requests_per_tenant']} requests, "
        f"{w['new_tokens']} new tokens each, float32, {result['machine']['cpu_threads']} threads",
        f"{'system':<14}{'tokens':>8}{'seconds':>10}{'tok/s':>10}{'vs A':>8}{'vs B':>8}",
    ]
    by = {r["name"]: r for r in result["rows"]}
    for r in result["rows"]:
        vs = [
            f"{r['tok_per_s'] / by[b]['tok_per_s']:>7.2f}x" if b in by else f"{'-':>8}"
            for b in ("A", "B")
        ]
        lines.append(
            f"{r['name']:<14}{r['tokens']:>8}{r['seconds']:>10.2f}{r['tok_per_s']:>10.1f}"
            + "".join(vs)
        )
    f = result["floor"]
    lines.append(
        f"CPU floor: {f['flops'] / 1e9:.0f} GFLOP at {f['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s"
        f" = {f['seconds']:.2f} s; engine at {result['engine_over_floor']:.2f}x the floor"
    )
    lines.append(f"prompt tokens served from the prefix cache: {result['cached_prompt_tokens']}")
    lines.append(
        "requests equal to the hand reference (up to its first near-tie): "
        + ", ".join(f"{r['name']} {r['matches_reference']:.0%}" for r in result["rows"])
    )
    if not result["all_match_reference"]:
        lines.append(
            "WARNING: a system above does not compute what the adapters mean; its figure is not "
            "comparable (for a PEFT baseline: PeftModel.generate changed under these versions)"
        )
    return "\n".join(lines)
