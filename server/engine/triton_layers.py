"""The decoder layer's elementwise work as three Triton kernels, for decode steps on the GPU.

Run op by op, a Llama layer's elementwise work is some thirty small kernels (RMSNorm's casts,
square, mean, rsqrt and products; rotary's products, roll and sums; the finiteness checks and
the cache writes; SiLU and its product; the residual sums). In a decode step each of them
moves a few kilobytes, so the step is bound by their number, not by bytes: measured on an
H200 with a Llama-3.2-1B shape at 64 sequences, a CUDA graph of the unfused stack replayed in
3.7 ms against 0.69 ms of bytes to read. Here each group is one kernel, one program per row:

- ``add_rms_norm``: the residual sum and the next RMSNorm (float32 statistics, the result
  rounded to the model's dtype before the weight multiplies it, as transformers does);
- ``rope_write``: rotary embedding of the row's query and key heads, and its keys and values
  written into the paged cache, zeros where any of them is not finite (the row is flagged,
  as ``attention.write_and_attend`` does);
- ``silu_mul``: SiLU of the gate times the up projection, each rounded to the dtype as torch
  rounds them.

The projections run as three products per layer instead of seven: q, k and v as one (their
weights concatenated, the modules' own weights becoming views of it, so nothing is held
twice), gate and up as one. Each kernel rounds where torch's operator sequence rounds, so
bfloat16 results follow the unfused path closely; float32 differs from it only by the order of
a mean's additions and fused multiply-adds (the GPU tests hold float32 token-exact to the CPU
reference). Runs under Triton's interpreter on the CPU, as the tests do.
"""

from __future__ import annotations

from typing import Any

import torch


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _kernels() -> Any:
    from server.engine import triton_kernels

    return triton_kernels


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(RMSNorm(x + residual), x + residual)`` for ``x [T, n]`` (the sum in x's dtype;
    without a residual, ``(RMSNorm(x), x)``)."""
    rows, n = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    _kernels().add_rms_norm[(rows,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        res_out,
        n,
        eps,
        HAS_RES=residual is not None,
        BLOCK=_pow2(n),
    )
    return out, res_out


def rope_write(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    flags: torch.Tensor,
    q_heads: int,
    kv_heads: int,
) -> torch.Tensor:
    """Rotary embedding and cache write for ``qkv [T, (Hq + 2 Hkv) * D]`` (one product's
    output); ``cos``, ``sin`` ``[T, D]``; ``k_cache``, ``v_cache`` one layer's ``[Hkv, slots,
    D]``; ``slots [T]``; ``flags [T]`` (bool) set where a row's keys or values are not
    finite. Returns the rotated queries ``[T, Hq, D]``."""
    rows = qkv.shape[0]
    d = cos.shape[-1]
    q = torch.empty(rows, q_heads, d, dtype=qkv.dtype, device=qkv.device)
    assert k_cache.stride(1) == d and qkv.stride(1) == 1 and cos.is_contiguous()
    _kernels().rope_write[(rows,)](
        qkv,
        cos,
        sin,
        q,
        k_cache,
        v_cache,
        slots,
        flags.view(torch.uint8),
        qkv.stride(0),
        k_cache.stride(0),
        Q_HEADS=q_heads,
        KV_HEADS=kv_heads,
        D=d,
        HALF=d // 2,
        HALF_PAD=_pow2(d // 2),
        Q_PAD=_pow2(q_heads),
        KV_PAD=_pow2(kv_heads),
    )
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up [T, 2 n]`` (gate first) -> ``[T, n]``."""
    rows, two_n = gate_up.shape
    n = two_n // 2
    out = torch.empty(rows, n, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, _pow2(n))
    _kernels().silu_mul[(rows, -(-n // block))](gate_up, out, n, BLOCK=block)
    return out
