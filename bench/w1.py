"""W1 of docs/benchmarks.md: multi-tenant prefix-tuning workload on the CPU, the engine against
PEFT baselines A (one request at a time) and B (one batch per adapter), and peers on the
text-only equivalent, in one process, on the same inputs. Prints a table, writes JSON.

    prefix-serve bench w1 [--tenants 4] [--requests 4] [--new-tokens 32] [--dtypes ...]

The engine runs at each of ``--dtypes`` (float32 is W1's own; bfloat16 where the CPU has a
fast path for it); the PEFT baselines in float32. Every system's tokens are checked against
the hand reference (``bench.reference``) at its dtype: a system that does not reproduce what
the adapters mean (as PEFT's ``generate`` did not with transformers 5.24, which dropped the
prefix) is not doing the work, and its figure is flagged. The floor (``bench.floor``) is the
least time this machine allows at each dtype.

Peers run the text-only equivalent (the same chat prompts, no adapter, 32 fewer positions per
request): transformers' continuous batching (``generate_batch``) always, llama.cpp's
``llama-server`` when it is on the PATH (``--llama-gguf`` names the model file it loads).
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol, TypeVar

import torch
from transformers import AutoModelForCausalLM

from bench.baselines import baseline_a, baseline_b
from bench.floor import measure_rates, w1_floor
from bench.peers import llama_server, transformers_batch
from bench.reference import GreedyResult, adapter_segment, greedy
from bench.workloads import Workload, build_w1
from server.engine.engine import EngineConfig
from server.engine.request import SamplingParams
from server.llm import LLM

# The engine's configuration in W1 (and on both sides of W2's comparison with it).
W1_ENGINE = EngineConfig(max_num_seqs=256, max_num_batched_tokens=2048)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Row:
    name: str
    tokens: int
    seconds: float
    tok_per_s: float
    dtype: str = "float32"
    matches_reference: float | None = None  # share of requests equal to the hand reference
    floor_s: float | None = None  # the floor at this row's dtype (engine rows)


def progress(message: str) -> None:
    """One line on stderr per finished phase, with the time since the run began: a full W1
    (two engine dtypes, the hand reference at each, both baselines, the peers) takes minutes."""
    print(f"[w1 {time.perf_counter() - _START:6.0f} s] {message}", file=sys.stderr, flush=True)


_START = time.perf_counter()


def reference_results(
    base, workload: Workload, text_only: bool = False, keep_logits: bool = False
) -> list[GreedyResult]:
    """The hand reference's greedy tokens for every request, in the workload's order (with no
    adapter for ``text_only``, the peers' workload)."""
    segments = [adapter_segment(base, path) for path in workload.adapter_dirs]
    return [
        greedy(
            base,
            r.prompt_ids,
            workload.new_tokens,
            [] if text_only else [segments[r.tenant]],
            keep_logits=keep_logits,
        )
        for r in workload.requests
    ]


def matches(tokens: list[list[int]], refs: list[GreedyResult]) -> float:
    """Share of requests whose tokens equal the reference's up to its first near-tie."""
    pairs = zip(tokens, refs, strict=True)
    return sum(t[: len(r.comparable())] == r.comparable() for t, r in pairs) / len(refs)


def agreement(
    tokens: list[list[int]], logprobs: list[list[float]], refs: list[GreedyResult]
) -> dict:
    """How closely an engine run follows the hand reference at the same dtype: over every
    request's steps before the reference's first near-tie, the share of tokens equal (counted
    up to the first difference), and the largest difference between the engine's log
    probability of its token and the reference's log-softmax for the same token, over the steps
    where both chose it (the logits' difference, less the change of their normalizer)."""
    compared = equal = 0
    worst = 0.0
    for toks, lps, ref in zip(tokens, logprobs, refs, strict=True):
        want = ref.comparable()
        compared += len(want)
        pairs = enumerate(zip(toks, want, strict=False))  # toks may be longer than want
        same = next((i for i, (a, b) in pairs if a != b), len(want))
        equal += same
        assert ref.logits is not None
        ref_lp = torch.log_softmax(ref.logits[:same], dim=-1)
        for step in range(same):
            worst = max(worst, abs(lps[step] - float(ref_lp[step, want[step]])))
    return {"token_share": equal / max(compared, 1), "steps": compared, "max_logprob_diff": worst}


def run_engine(llm: LLM, workload: Workload, rounds: int = 1) -> tuple[list[list[int]], float]:
    """The workload's tokens and the fastest of ``rounds`` timed runs, each from a cold prefix
    cache. Every round must give the same tokens."""
    _check_rounds(rounds)
    params = SamplingParams(max_tokens=workload.new_tokens, temperature=0, ignore_eos=True)
    names = [[f"tenant-{r.tenant}"] for r in workload.requests]
    prompts = [r.prompt_ids for r in workload.requests]
    llm.generate(
        prompts[:1], SamplingParams(max_tokens=2, temperature=0), [["tenant-0"]], use_tqdm=False
    )
    tokens: list[list[int]] | None = None
    best = float("inf")
    for _ in range(rounds):
        llm.engine.tree.clear_namespace(("default",))  # nothing cached from before the clock
        start = time.perf_counter()
        outs = llm.generate(prompts, params, adapters=names, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
        got = [o.token_ids for o in outs]
        if tokens is not None and got != tokens:
            raise RuntimeError("the engine gave different tokens in two rounds of one workload")
        tokens = got
    assert tokens is not None
    return tokens, best


def _check_rounds(rounds: int) -> None:
    """The one check of a round count: every timed system runs at least once."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")


class _Timed(Protocol):
    seconds: float


T = TypeVar("T", bound=_Timed)


def fastest(runs: Callable[[], T], rounds: int) -> T:
    """The result of ``runs()`` with the fewest ``seconds`` over ``rounds`` calls."""
    _check_rounds(rounds)
    results = [runs() for _ in range(rounds)]
    return min(results, key=lambda r: r.seconds)


def engine_row(
    model_dir: Path,
    data_dir: str,
    wl: Workload,
    dtype: str,
    rounds: int = 1,
    attention: str = "auto",
) -> tuple[Row, dict, list[GreedyResult]]:
    """The engine at ``dtype`` with the ``attention`` backend, checked against the reference
    at ``dtype`` (returned too), with its floor."""
    config = replace(W1_ENGINE, attention_backend=attention)
    llm = LLM(str(model_dir), data_dir=data_dir, device="cpu", dtype=dtype, engine_config=config)
    for t, path in enumerate(wl.adapter_dirs):
        llm.add_adapter(f"tenant-{t}", path)
    cached_before = llm.engine.scheduler.cached_prompt_tokens
    tokens, seconds = run_engine(llm, wl, rounds)
    # Per round: every round starts from an empty prefix cache and does the same work.
    cached = (llm.engine.scheduler.cached_prompt_tokens - cached_before) // rounds
    attention = llm.engine.runner.attention_backend
    name = "prefix-serve" + ("" if dtype == "float32" else f" {dtype}")
    generated = sum(map(len, tokens))
    progress(
        f"{name}: {generated / seconds:.1f} tok/s ({seconds:.1f} s, {attention} attention); "
        "checking it"
    )
    # Untimed: the same requests again with the chosen tokens' log probabilities.
    scored = llm.generate(
        [r.prompt_ids for r in wl.requests],
        SamplingParams(max_tokens=wl.new_tokens, temperature=0, ignore_eos=True, logprobs=0),
        adapters=[[f"tenant-{r.tenant}"] for r in wl.requests],
        use_tqdm=False,
    )
    del llm
    logprobs = [[e.logprob for e in (o.logprobs or [])] for o in scored]
    ref_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES[dtype]).eval()
    refs = reference_results(ref_model, wl, keep_logits=True)
    agree = matches(tokens, refs)
    close = agreement(tokens, logprobs, refs)
    rates = measure_rates(ref_model.config.hidden_size, DTYPES[dtype])
    floor = w1_floor(ref_model.config, wl, DTYPES[dtype], rates)
    progress(
        f"{name}: equals the hand reference on {agree:.0%} of requests, "
        f"{close['token_share']:.1%} of tokens; floor {floor.seconds:.1f} s"
    )
    row = Row(name, generated, seconds, 0.0, dtype, agree, floor.seconds)
    extra = {
        "dtype": dtype,
        "attention": attention,
        "cached_prompt_tokens": cached,
        "agreement": close,
        **asdict(rates),
        **asdict(floor),
    }
    refs = [replace(ref, logits=None) for ref in refs]  # MBs per request: not kept past here
    return row, extra, refs


def run(
    tenants: int = 4,
    requests: int = 4,
    new_tokens: int = 32,
    baselines: str = "AB",
    model: str = "default",
    data_dir: str = "./data",
    json_path: str | None = None,
    threads: int | None = None,
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    peers: bool = True,
    llama_gguf: str | None = None,
    rounds: int = 1,
    attention: str = "auto",
) -> dict:
    """W1 once; with ``rounds`` > 1 every timed system (engine, baselines, peers) runs that
    many times and keeps its fastest, so a slow moment of a shared host hits no one system."""
    _check_rounds(rounds)
    if threads:
        torch.set_num_threads(threads)
    model_dir = _model_path(model, data_dir)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    rows: list[Row] = []
    floors: list[dict] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        wl = build_w1(base, tokenizer, tmp, tenants, requests, new_tokens)
        progress(f"workload built: {len(wl.requests)} requests")
        refs_at: dict[str, list[GreedyResult]] = {}
        for dtype in dtypes:
            row, floor, refs_at[dtype] = engine_row(
                model_dir, data_dir, wl, dtype, rounds, attention
            )
            rows.append(row)
            floors.append(floor)
        refs = refs_at.get("float32") or reference_results(base, wl)
        for name in baselines:
            baseline = baseline_a if name == "A" else baseline_b
            res = fastest(lambda baseline=baseline: baseline(base, wl), rounds)
            agree = matches(res.tokens, refs)
            rows.append(Row(name, res.generated, res.seconds, 0.0, "float32", agree))
            progress(f"baseline {name}: {res.generated / res.seconds:.1f} tok/s")
        if peers:
            text_refs = reference_results(base, wl, text_only=True)
            peer = fastest(lambda: transformers_batch(base, wl), rounds)
            progress(f"{peer.name}: {peer.generated / peer.seconds:.1f} tok/s")
            rows.append(
                Row(
                    peer.name,
                    peer.generated,
                    peer.seconds,
                    0.0,
                    "float32",
                    matches(peer.tokens, text_refs),
                )
            )
            found = llama_server(wl, llama_gguf)
            if isinstance(found, str):
                notes.append(found)
            else:
                rows.append(Row(found.name, found.generated, found.seconds, 0.0, found.dtype, None))
    for r in rows:
        r.tok_per_s = r.tokens / r.seconds
    result = {
        "workload": {
            "name": "W1",
            "tenants": tenants,
            "requests_per_tenant": requests,
            "new_tokens": new_tokens,
            "prompt_tokens": [len(r.prompt_ids) for r in wl.requests],
        },
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
        "rounds": rounds,
        "rows": [asdict(r) for r in rows],
        "floors": floors,
        "notes": notes,
    }
    by = {r.name: r for r in rows}
    engine = rows[0]
    for name in baselines:
        result[f"speedup_vs_{name}"] = engine.tok_per_s / by[name].tok_per_s
    result["engine_share_of_floor"] = {r.dtype: r.floor_s / r.seconds for r in rows if r.floor_s}
    if len(dtypes) > 1:
        result["bf16_over_fp32"] = rows[1].tok_per_s / engine.tok_per_s
    result["all_match_reference"] = all(
        r.matches_reference == 1.0
        for r in rows
        if r.matches_reference is not None and r.dtype == "float32"
    )
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
        f"{w['new_tokens']} new tokens each, {result['machine']['cpu_threads']} threads"
        + (f", fastest of {result['rounds']} rounds each" if result.get("rounds", 1) > 1 else ""),
        f"{'system':<30}{'dtype':>9}{'tokens':>7}{'seconds':>9}{'tok/s':>8}{'vs A':>7}"
        f"{'vs B':>7}{'= ref':>7}",
    ]
    by = {r["name"]: r for r in result["rows"]}
    for r in result["rows"]:
        vs = [
            f"{r['tok_per_s'] / by[b]['tok_per_s']:>6.2f}x" if b in by else f"{'-':>7}"
            for b in ("A", "B")
        ]
        agree = "-" if r["matches_reference"] is None else f"{r['matches_reference']:.0%}"
        lines.append(
            f"{r['name']:<30}{r['dtype']:>9}{r['tokens']:>7}{r['seconds']:>9.2f}"
            f"{r['tok_per_s']:>8.1f}" + "".join(vs) + f"{agree:>7}"
        )
    for f in result["floors"]:
        share = result["engine_share_of_floor"][f["dtype"]]
        lines.append(
            f"floor at {f['dtype']}: {f['seconds']:.2f} s = prefill {f['prefill_flops'] / 1e9:.0f} "
            f"GFLOP at {f['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s + {f['decode_steps']} decode "
            f"steps ({f['memory_bound_steps']} memory-bound; {f['decode_bytes'] / 1e9:.1f} GB at "
            f"{f['read_bytes_per_s'] / 1e9:.1f} GB/s); engine at {share:.0%} of the floor; "
            f"{f['cached_prompt_tokens']} prompt tokens from the prefix cache"
        )
    for f in result["floors"]:
        a = f["agreement"]
        lines.append(
            f"engine at {f['dtype']} vs the hand reference at {f['dtype']}: "
            f"{a['token_share']:.1%} of {a['steps']} greedy tokens equal before the first "
            f"near-tie; largest log-probability difference {a['max_logprob_diff']:.2e}"
        )
    if "bf16_over_fp32" in result:
        lines.append(f"bfloat16 engine: {result['bf16_over_fp32']:.2f}x the float32 engine")
    lines.extend(result["notes"])
    lines.append(
        "= ref: requests equal to the hand reference at the row's dtype, up to its first "
        "near-tie (peers: the text-only reference)"
    )
    if not result["all_match_reference"]:
        lines.append(
            "WARNING: a float32 system above does not compute what the adapters mean; its figure "
            "is not comparable (for a PEFT baseline: PeftModel.generate changed under these "
            "versions)"
        )
    return "\n".join(lines)
