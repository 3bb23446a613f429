"""W3 of docs/benchmarks.md: the engine on a GPU, a Llama-3.2-1B-shaped model with random bfloat16
weights (speed does not depend on the values), built from its configuration (no download).

    prefix-serve bench w3 [--requests 64] [--prefix 1024] [--question 128] [--new-tokens 128]

Every request has a 32-token prefix-tuning adapter, a system prompt of ``--prefix`` tokens and
a question of ``--question`` tokens, and generates ``--new-tokens`` greedily, EOS ignored.
Variants, each on a cold prefix cache:

- ``shared``: every request has the same adapter and system prompt (one tenant);
- ``distinct``: every request its own adapter and system prompt (``--requests`` tenants);
- ``shared-long``: as ``shared`` with a system prompt four times as long (4,096 tokens).

For each: tokens/s over the whole run, the decode steps' ms/step, the GPU time of one decode
graph replay (CUDA events), and the floor: the bytes a decode step must read (every weight
once, the LM head included; every sequence's own keys and values; each distinct prefix's once)
over the device's bandwidth measured here (a device-to-device copy). The same ``shared``
workload runs through PEFT's ``generate`` (one batch, the same adapter) and, without the
adapter, through transformers' continuous batching (``generate_batch``), in the same run.
Adapter cold load: a safetensors blob to the device tier, per adapter (p50/p99).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from server.engine.engine import EngineConfig, LLMEngine
from server.engine.model_runner import head_dim_of, kv_bytes_per_token
from server.engine.request import AdapterSegment, SamplingParams

VIRTUAL_TOKENS = 32
_START = time.perf_counter()


def progress(message: str) -> None:
    print(f"[w3 {time.perf_counter() - _START:6.0f} s] {message}", file=sys.stderr, flush=True)


def llama_1b_config():
    """Llama-3.2-1B's shape (16 layers, hidden 2048, 32 query / 8 key-value heads of 64, a
    128,256-token vocabulary, tied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    )


def random_model(config, device: str, dtype: torch.dtype, seed: int = 0):
    """Random weights of ``config``'s shape (a copy of it: the engine sets its model's
    attention implementation on the config, the peers need their own)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(copy.deepcopy(config))
    return model.to(dtype).eval()


class IdsTokenizer:
    """The random model has no vocabulary: a token's text is its id."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(map(str, ids))


@dataclass
class Request:
    tenant: int
    prompt_ids: list[int]  # system prompt + question


@dataclass
class Variant:
    name: str
    requests: list[Request]
    prefix: int  # system prompt tokens


def build_variants(
    requests: int, prefix: int, question: int, vocab: int, seed: int = 0
) -> list[Variant]:
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(10, vocab - 10, (n,), generator=gen).tolist()

    variants = []
    for name, tenants, length in (
        ("shared", 1, prefix),
        ("distinct", requests, prefix),
        ("shared-long", 1, 4 * prefix),
    ):
        systems = [ids(length) for _ in range(tenants)]
        reqs = [Request(i % tenants, systems[i % tenants] + ids(question)) for i in range(requests)]
        variants.append(Variant(name, reqs, length))
    return variants


def adapters(config, tenants: int, dtype: torch.dtype, seed: int = 1) -> list[AdapterSegment]:
    """``tenants`` random prefix-tuning adapters: post-RoPE keys and values ``[L, 2, Hkv, 32,
    D]`` of a typical scale, on the CPU (the engine's device tier copies each one over once)."""
    gen = torch.Generator().manual_seed(seed)
    d = head_dim_of(config)
    shape = (config.num_hidden_layers, 2, config.num_key_value_heads, VIRTUAL_TOKENS, d)
    return [
        AdapterSegment(
            key=f"w3-adapter-{seed}-{i}".ljust(64, "0"),
            kind="prefix_tuning",
            length=VIRTUAL_TOKENS,
            kv=torch.randn(shape, generator=gen).to(dtype),
        )
        for i in range(tenants)
    ]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth(device: str, gib: float = 2.0) -> float:
    """Bytes per second read plus written by a copy of ``gib`` GiB on ``device`` (best of 10
    after 3 warm-ups)."""
    n = int(gib * 2**30) // 4
    a = torch.ones(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    best = float("inf")
    for _ in range(10):
        sync(device)
        began = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - began)
    del a, b
    return 2 * n * 4 / best


@dataclass
class EngineRun:
    variant: str
    requests: int
    new_tokens: int
    seconds: float
    tok_per_s: float
    decode_steps: int
    decode_ms_per_step: float  # wall time of a decode step at the full batch, median
    # Steps that were not full-batch decode steps (prompts, mixed with decode, the tail as
    # requests finish): how many and their wall time together.
    other_steps: int
    other_seconds: float
    replay_ms: float  # GPU time of one decode graph replay at the full batch
    floor_ms_per_step: float  # shared-prefix floor of the same steps
    floor_no_sharing_ms_per_step: float
    floor_share: float  # floor / decode step time
    replay_floor_share: float  # floor / replay time
    # A full-batch decode step's wall time by part (medians, ms; a window's parts shared
    # among its steps): the scheduler's plan; the runner (buffer fill, graph launches, and
    # the wait for the device until the ids come back); the sampler (when steps go one at a
    # time: the ids' read-back); the rest (tokens into the requests, stop checks,
    # detokenization, outputs).
    step_parts_ms: dict[str, float]


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")


class _StepClocks:
    """Times the scheduler, the runner and the sampler of an engine's steps by wrapping them
    on this engine's instances (and the engine module's sampler) while in use."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.seconds = {"schedule": 0.0, "forward": 0.0, "sample": 0.0}

    def reset(self) -> None:
        for name in self.seconds:
            self.seconds[name] = 0.0

    def _timed(self, name: str, fn):
        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - began

        return timed

    def __enter__(self) -> _StepClocks:
        from server.engine import engine as engine_module

        self._sample = engine_module.sample
        engine_module.sample = self._timed("sample", engine_module.sample)
        self.engine.scheduler.schedule = self._timed("schedule", self.engine.scheduler.schedule)
        self.engine.runner.run = self._timed("forward", self.engine.runner.run)
        runner = self.engine.runner
        runner.launch_window = self._timed("forward", runner.launch_window)
        runner.window_result = self._timed("forward", runner.window_result)
        return self

    def __exit__(self, *exc) -> None:
        from server.engine import engine as engine_module

        engine_module.sample = self._sample
        del self.engine.scheduler.schedule  # the class's methods again
        del self.engine.runner.run
        del self.engine.runner.launch_window
        del self.engine.runner.window_result


def weight_bytes(model) -> int:
    """Every parameter once (a tied LM head is the embedding table, read once by the head)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def run_engine(
    engine: LLMEngine,
    variant: Variant,
    segs: list[AdapterSegment],
    new_tokens: int,
    bandwidth: float,
    weights: int,
) -> EngineRun:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    decode_times: list[float] = []
    other_steps, other_seconds = 0, 0.0
    parts: dict[str, list[float]] = {"schedule": [], "forward": [], "sample": [], "rest": []}
    clocks = _StepClocks(engine)
    device = engine.runner.device.type
    sync(device)
    start = time.perf_counter()
    for i, r in enumerate(variant.requests):
        engine.add_request(f"{variant.name}-{i}", r.prompt_ids, params, [segs[r.tenant]])
    done, errors = 0, []
    batch = len(variant.requests)
    with clocks:
        while engine.has_unfinished():
            running = len(engine.scheduler.running)
            computed, steps = engine.stats.computed_tokens, engine.stats.steps
            clocks.reset()
            began = time.perf_counter()
            outs = engine.step()
            took = time.perf_counter() - began
            # Decode steps of the whole batch (one, or a window of several): one new position
            # for each request per step.
            n = engine.stats.steps - steps
            if n and running == batch and engine.stats.computed_tokens - computed == batch * n:
                decode_times += [took / n] * n
                for name in ("schedule", "forward", "sample"):
                    parts[name] += [clocks.seconds[name] / n] * n
                parts["rest"] += [(took - sum(clocks.seconds.values())) / n] * n
            else:
                other_steps += max(n, 1)
                other_seconds += took
            done += sum(o.finished for o in outs)
            errors += [o.error.message for o in outs if o.error is not None]
    sync(device)
    seconds = time.perf_counter() - start
    assert done == batch, f"{done} of {batch} requests finished"
    assert not errors, f"{len(errors)} requests failed, the first: {errors[0]}"
    decode_times.sort()
    step = decode_times[len(decode_times) // 2] if decode_times else float("nan")
    replay = replay_ms(engine, batch)
    # The floor of a decode step, averaged over the run's steps: every weight, each
    # sequence's own keys (question + tokens so far), each distinct prefix's keys once.
    kv = kv_bytes_per_token(engine.runner.model.config, engine.runner.dtype)
    prefix = VIRTUAL_TOKENS + variant.prefix
    question = len(variant.requests[0].prompt_ids) - variant.prefix
    own = batch * (question + new_tokens / 2) * kv
    tenants = len({r.tenant for r in variant.requests})
    floor = (weights + own + tenants * prefix * kv) / bandwidth
    no_share = (weights + own + batch * prefix * kv) / bandwidth
    return EngineRun(
        variant=variant.name,
        requests=batch,
        new_tokens=new_tokens,
        seconds=seconds,
        tok_per_s=batch * new_tokens / seconds,
        decode_steps=len(decode_times),
        decode_ms_per_step=step * 1000,
        other_steps=other_steps,
        other_seconds=other_seconds,
        replay_ms=replay,
        floor_ms_per_step=floor * 1000,
        floor_no_sharing_ms_per_step=no_share * 1000,
        floor_share=floor / step if decode_times else float("nan"),
        replay_floor_share=floor * 1000 / replay if replay == replay else float("nan"),
        step_parts_ms={k: _median(v) * 1000 for k, v in parts.items()},
    )


def replay_ms(engine: LLMEngine, batch: int, repeats: int = 20) -> float:
    """GPU time of one replay of the decode graph of ``batch`` rows (on whatever its buffers
    hold: timing only)."""
    cuda = engine.runner.cuda_decoder
    if cuda is None or not cuda.use_graphs:
        return float("nan")
    graph = cuda._graphs.get(cuda.bucket(batch))
    if graph is None:
        return float("nan")
    graph.graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def kernel_times(engine: LLMEngine, batch: int, repeats: int = 3) -> dict[str, float]:
    """GPU time per decode step by kind of kernel (microseconds), from torch's profiler over
    ``repeats`` eager runs of the step the buffers hold (the graph runs the same kernels)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.runner.cuda_decoder
    if cuda is None:
        return {}
    size = cuda.bucket(batch)
    with torch.inference_mode():
        cuda._forward(size)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                cuda._forward(size)
            torch.cuda.synchronize()
    kinds = {
        "attention (own keys)": ("own_partial",),
        "attention (segments)": ("segment_partial",),
        "attention (merge)": ("merge",),
        "rmsnorm+residual": ("add_rms_norm",),
        "rotary+cache write": ("rope_write",),
        "silu*up": ("silu_mul",),
        "greedy id + next step": ("greedy_advance", "bump_step"),
        "products (cuBLAS)": ("gemm", "gemv", "nvjet", "cutlass", "sm90", "xmma", "splitk"),
    }
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None)
        if us is None:
            us = getattr(event, "cuda_time_total", 0.0)
        if not us or event.key.startswith("cuda") or event.key.startswith("aten::"):
            continue
        name = event.key.lower()
        kind = next((k for k, keys in kinds.items() if any(x in name for x in keys)), "other")
        totals[kind] = totals.get(kind, 0.0) + us / repeats
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def cold_loads(engine: LLMEngine, segs: list[AdapterSegment]) -> dict[str, float]:
    """Each adapter from a safetensors blob (as the store keeps it) to the device tier."""
    from safetensors.torch import load, save

    times = []
    for seg in segs:
        assert seg.kv is not None
        blob = save({"kv": seg.kv.contiguous()})
        engine.runner.drop_adapter(seg.key)
        sync(engine.runner.device.type)
        began = time.perf_counter()
        kv = load(blob)["kv"]
        fresh = AdapterSegment(seg.key, seg.kind, seg.length, kv=kv)
        engine.runner.adapter_tensor(fresh)
        sync(engine.runner.device.type)
        times.append(time.perf_counter() - began)
    times.sort()
    return {
        "p50_ms": times[len(times) // 2] * 1000,
        "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))] * 1000,
        "adapters": len(times),
    }


def peft_generate(model, variant: Variant, seg: AdapterSegment, new_tokens: int) -> dict:
    """PEFT's ``generate`` with one prefix-tuning adapter holding ``seg``'s keys and values,
    one batch of every request (all prompts the same length: no padding)."""
    from peft import PrefixTuningConfig, get_peft_model

    config = model.config
    peft_config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=VIRTUAL_TOKENS,
        num_layers=config.num_hidden_layers,
        num_attention_heads=config.num_key_value_heads,
        token_dim=config.num_key_value_heads * head_dim_of(config),
    )
    peft_model = get_peft_model(model, peft_config)
    assert seg.kv is not None
    # [L, 2, Hkv, P, D] -> the table PEFT reads: [P, L * 2 * Hkv * D]
    table = seg.kv.permute(3, 0, 1, 2, 4).reshape(VIRTUAL_TOKENS, -1)
    encoder = peft_model.prompt_encoder["default"]
    with torch.no_grad():
        encoder.embedding.weight.copy_(table.to(encoder.embedding.weight.device))
    peft_model.eval()
    ids = torch.tensor([r.prompt_ids for r in variant.requests], device=model.device)
    mask = torch.ones_like(ids)
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )
    warm = {**kwargs, "max_new_tokens": 2, "min_new_tokens": 2}
    with torch.inference_mode():
        peft_model.generate(input_ids=ids[:1], attention_mask=mask[:1], **warm)
        sync(model.device.type)
        start = time.perf_counter()
        out = peft_model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        sync(model.device.type)
    seconds = time.perf_counter() - start
    generated = int((out.shape[1] - ids.shape[1]) * ids.shape[0])
    return {"seconds": seconds, "tok_per_s": generated / seconds, "generated": generated}


def continuous_batching(model, variant: Variant, new_tokens: int) -> dict:
    """transformers' ``generate_batch`` on the text-only equivalent (no adapter)."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    prompts = [r.prompt_ids for r in variant.requests]
    model.generate_batch(inputs=prompts[:2], generation_config=config, progress_bar=False)
    sync(model.device.type)
    start = time.perf_counter()
    out = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False)
    sync(model.device.type)
    seconds = time.perf_counter() - start
    generated = sum(len(o.generated_tokens) for o in out.values())
    return {"seconds": seconds, "tok_per_s": generated / seconds, "generated": generated}


def run(
    requests: int = 64,
    prefix: int = 1024,
    question: int = 128,
    new_tokens: int = 128,
    variants: tuple[str, ...] = ("shared", "distinct", "shared-long"),
    baselines: bool = True,
    json_path: str | None = "bench/results/w3.json",
    cuda_graphs: bool = True,
    device: str = "cuda",
    config=None,
    dtype: torch.dtype = torch.bfloat16,
    window: int = 8,
    blas: str | None = None,
) -> dict:
    """The whole benchmark (``device`` "cpu" and a small ``config``: a dry run of its logic,
    which the tests make)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("prefix-serve bench w3: needs a CUDA device (none is visible)")
    if blas:  # cuBLAS or cuBLASLt for the products (torch's choice by default)
        torch.backends.cuda.preferred_blas_library(blas)
    config = config or llama_1b_config()
    model = random_model(config, device, dtype)
    progress(f"model built: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")
    bandwidth = measure_bandwidth(device, 2.0 if device == "cuda" else 1 / 32)
    weights = weight_bytes(model)
    progress(f"bandwidth {bandwidth / 1e12:.2f} TB/s; weights {weights / 1e9:.2f} GB")
    all_variants = build_variants(requests, prefix, question, config.vocab_size)
    chosen = [v for v in all_variants if v.name in variants]
    segs = adapters(config, requests, dtype)
    longest = max(len(r.prompt_ids) for v in chosen for r in v.requests) + VIRTUAL_TOKENS
    kv = kv_bytes_per_token(config, dtype)
    pool = int(1.5 * requests * (longest + new_tokens) * kv) + (1 << 30)
    engine = LLMEngine(
        model,
        IdsTokenizer(),
        EngineConfig(
            max_num_seqs=requests,
            max_num_batched_tokens=8192,
            kv_cache_memory=pool,
            adapter_cache_bytes=None,
            cuda_graphs=cuda_graphs,
            decode_window=window,
            decode_context=longest + new_tokens,
        ),
    )
    cuda = engine.runner.cuda_decoder
    captured = cuda.capture_seconds if cuda is not None else 0.0
    progress(f"engine ready (decode graphs of every batch size captured in {captured:.1f} s)")
    # Warm-up, untimed: a short run of the same shape compiles every kernel the run takes.
    warm = build_variants(requests, 64, 16, config.vocab_size, seed=99)[0]
    run_engine(engine, warm, adapters(config, 1, dtype, seed=9), 4, bandwidth, weights)
    result: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "decode_window": window,
        "blas": blas or "default",
        "capture_seconds": captured,
        "bandwidth_bytes_per_s": bandwidth,
        "weight_bytes": weights,
        "kv_bytes_per_token": kv,
        "engine": [],
    }
    for variant in chosen:
        r = run_engine(engine, variant, segs, new_tokens, bandwidth, weights)
        result["engine"].append(asdict(r))
        if device == "cuda":  # the last decode step's buffers: the full batch, at its end
            try:
                times = kernel_times(engine, requests)
                result["engine"][-1]["kernel_us_per_step"] = times
                rounded = {k: round(v) for k, v in times.items()}
                progress(f"{variant.name}: GPU us per decode step by kernel: {rounded}")
            except Exception as exc:  # the profiler is a diagnosis, not the benchmark
                progress(f"kernel profile failed: {exc!r}")
        progress(
            f"engine {variant.name}: {r.tok_per_s:,.0f} tok/s, decode {r.decode_ms_per_step:.2f} "
            f"ms/step (replay {r.replay_ms:.2f} ms), floor {r.floor_ms_per_step:.2f} ms: "
            f"{100 * r.floor_share:.0f}% of it ({100 * r.replay_floor_share:.0f}% on the GPU); "
            f"step parts (ms): { {k: round(v, 3) for k, v in r.step_parts_ms.items()} }; "
            f"{r.other_steps} other steps took {r.other_seconds:.2f} s"
        )
    # Beyond the start's: graphs captured again mid-run (tables widened), which stalls a run.
    result["capture_seconds_total"] = cuda.capture_seconds if cuda is not None else 0.0
    result["cold_load"] = cold_loads(engine, segs)
    progress(f"adapter cold load {result['cold_load']}")
    shared = next((v for v in chosen if v.name == "shared"), None)
    del engine
    if device == "cuda":
        torch.cuda.empty_cache()
    if baselines and shared is not None:
        model.set_attn_implementation("sdpa")  # the engine had routed it to its own
        for name, fn in (
            ("peft_generate", lambda: peft_generate(model, shared, segs[0], new_tokens)),
            (
                "transformers_generate_batch",
                lambda: continuous_batching(
                    random_model(config, device, dtype), shared, new_tokens
                ),
            ),
        ):
            try:
                result[name] = fn()
                progress(f"{name}: {result[name]['tok_per_s']:,.0f} tok/s")
            except Exception as exc:  # a peer's failure is reported, not fatal
                result[name] = {"error": repr(exc)}
                progress(f"{name} failed: {exc!r}")
            if device == "cuda":
                torch.cuda.empty_cache()
    print(format_result(result))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def format_result(result: dict) -> str:
    lines = [
        f"W3 on {result['device']} (torch {result['torch']}), bandwidth "
        f"{result['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, weights "
        f"{result['weight_bytes'] / 1e9:.2f} GB",
        f"{'variant':10s} {'tok/s':>8s} {'ms/step':>8s} {'replay':>7s} {'floor':>6s} "
        f"{'% floor':>7s} {'no-share floor':>14s}",
    ]
    for r in result["engine"]:
        lines.append(
            f"{r['variant']:10s} {r['tok_per_s']:8.0f} {r['decode_ms_per_step']:8.2f} "
            f"{r['replay_ms']:7.2f} {r['floor_ms_per_step']:6.2f} {100 * r['floor_share']:6.0f}% "
            f"{r['floor_no_sharing_ms_per_step']:14.2f}"
        )
    for name in ("peft_generate", "transformers_generate_batch"):
        if name in result:
            peer = result[name]
            text = f"{peer['tok_per_s']:.0f} tok/s" if "tok_per_s" in peer else peer["error"]
            lines.append(f"{name}: {text}")
    return "\n".join(lines)
