"""The CPU floor of a workload: the least time any engine could take on this machine.

A step cannot be faster than the bytes it must read over the memory bandwidth, nor than its
FLOPs over the matrix-product rate, both measured here at the run's dtype. Prefill is counted
as FLOPs (every distinct prompt position once: a tenant's shared system prompt once), decode
step by step as the larger of the two: each step reads every weight once (the LM head
included) and each sequence's KV once, a shared prefix once per tenant (prefix-tuning virtual
tokens cost no compute, only their KV reads). What the floor leaves out (Python, attention's
gathers, elementwise layers, the sampler) is what an engine adds on top.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bench.workloads import VIRTUAL_TOKENS, Workload
from server.engine.cpu_kernels import route_linears
from server.engine.model_runner import head_dim_of, kv_bytes_per_token


@dataclass(frozen=True)
class MachineRates:
    """Measured on this machine at one dtype: the matrix-product rate (FLOP/s) at a
    compute-bound shape, and the memory read bandwidth (bytes/s)."""

    dtype: str
    matmul_flops_per_s: float  # [512 x hidden] @ [hidden x 3 hidden]
    read_bytes_per_s: float


@dataclass(frozen=True)
class Floor:
    prefill_flops: float
    decode_steps: int
    decode_flops: float
    decode_bytes: float
    seconds: float
    memory_bound_steps: int  # decode steps where reading takes longer than computing


def _rate(fn, work: float, seconds: float, windows: int = 5) -> float:
    """The best of ``windows`` rates, each timed over ``seconds / windows``: the floor must be
    what this machine can do, and on a shared host a slow moment in one long window would
    lower it (one-window rates of the same product moved between 97 and 183 GFLOP/s across
    runs on a 2-core cloud Xeon)."""
    fn()
    best = 0.0
    for _ in range(windows):
        n, start = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - start < seconds / windows:
            fn()
            n += 1
        best = max(best, n * work / (time.perf_counter() - start))
    return best


def measure_rates(hidden: int, dtype: torch.dtype, seconds: float = 2.0) -> MachineRates:
    """Matmul rates at the model's width and the read bandwidth of a 512 MiB tensor (a sum:
    one pass, little arithmetic), with the threads torch is set to use; each the best of five
    short windows. The matmul rate is the fastest of torch's product, the same product widened
    to float32 (for narrower dtypes) and, where the engine routes this dtype to it here, the
    engine's own native product: the floor must not be slower than a product this machine is
    known to run."""
    big = torch.randn(512, hidden).to(dtype)
    w = torch.randn(hidden, 3 * hidden).to(dtype)
    work = 2 * 512 * hidden * 3 * hidden
    matmul = _rate(lambda: big @ w, work, seconds)
    if dtype != torch.float32:
        # Widening to float32 and multiplying there is a product every CPU runs: where this
        # dtype has no fast kernel (bfloat16 on an AVX2-only CPU, where torch's product
        # measured 2 GFLOP/s against float32's 140), that is the floor's rate.
        matmul = max(matmul, _rate(lambda: big.float() @ w.float(), work, seconds))
    layer = torch.nn.Linear(hidden, 3 * hidden, bias=False).to(dtype)
    holder = torch.nn.Module()
    holder.layer = layer
    # Routed as the engine routes it. In bfloat16 where oneDNN has a product, the engine's
    # route takes decode-sized calls only, so 512 rows measure torch's product again; where
    # oneDNN has none (AVX2), every call takes the native product, which widens 512 rows to
    # float32 once and runs the float32 tiles (on a 2-core AVX2 EPYC: 176-184 GFLOP/s on W1's
    # shapes, against 165 for torch's product widened to float32).
    routed = route_linears(holder, "auto")
    if routed and hasattr(layer, "_ps_native"):
        with torch.no_grad():
            matmul = max(matmul, _rate(lambda: layer(big), work, seconds))
    buffer = torch.ones(512 << 20 >> 2, dtype=torch.float32)
    return MachineRates(
        dtype=str(dtype).removeprefix("torch."),
        matmul_flops_per_s=matmul,
        read_bytes_per_s=_rate(buffer.sum, buffer.numel() * 4, seconds),
    )


def model_sizes(config, dtype: torch.dtype) -> tuple[float, float, float, float]:
    """(dense FLOPs per position, attention FLOPs per context position, LM-head FLOPs,
    weight bytes read per decode step) of a Llama-family config."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = head_dim_of(config)
    q_width = config.num_attention_heads * head_dim
    kv_width = config.num_key_value_heads * head_dim
    per_layer = hidden * (2 * q_width + 2 * kv_width) + 3 * hidden * config.intermediate_size
    head = hidden * config.vocab_size
    elem = torch.empty((), dtype=dtype).element_size()
    return (
        2 * layers * per_layer,
        2 * 2 * layers * q_width,
        2 * head,
        (layers * per_layer + head) * elem,
    )


def w1_floor(config, workload: Workload, dtype: torch.dtype, rates: MachineRates) -> Floor:
    dense, attn, head, weight_bytes = model_sizes(config, dtype)
    kv = kv_bytes_per_token(config, dtype)  # what the engine's cache holds per position
    p = VIRTUAL_TOKENS
    prefill = 0.0
    for tenant, requests in enumerate(workload.by_tenant()):
        shared = workload.shared_prefix_len(tenant)
        for i, req in enumerate(requests):
            for pos in range(0 if i == 0 else shared, len(req.prompt_ids)):
                prefill += dense + attn * (p + pos + 1)
            prefill += head  # the first token's logits
    steps = workload.new_tokens - 1
    seconds = prefill / rates.matmul_flops_per_s
    total_flops = total_bytes = 0.0
    memory_bound = 0
    for step in range(1, steps + 1):
        flops = step_bytes = 0.0
        step_bytes = weight_bytes
        for tenant, requests in enumerate(workload.by_tenant()):
            shared = p + workload.shared_prefix_len(tenant)
            step_bytes += shared * kv
            for req in requests:
                context = p + len(req.prompt_ids) + step
                flops += dense + attn * context + head
                step_bytes += (context - shared) * kv
        compute_s = flops / rates.matmul_flops_per_s
        read_s = step_bytes / rates.read_bytes_per_s
        memory_bound += read_s > compute_s
        seconds += max(compute_s, read_s)
        total_flops += flops
        total_bytes += step_bytes
    return Floor(prefill, steps, total_flops, total_bytes, seconds, memory_bound)
