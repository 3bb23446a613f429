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


def greedy_advance(
    logits: torch.Tensor,
    nonfinite: torch.Tensor,
    ids: torch.Tensor,
    flags: torch.Tensor,
    step: torch.Tensor,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    limits: torch.Tensor,
    tables: torch.Tensor,
    block_size: int,
    scratch_slot: int,
) -> None:
    """The end of a decode step on the device, as two kernels (one program per row, then one
    that moves the step index on), for windows of steps that no host looks at in between:

    - each row's greedy token, the first index of its largest logit (``torch.argmax``'s
      choice), or -1 where any of its logits is not finite, into row ``step`` of ``ids``
      (``[window, >= T]`` int32), and its ``nonfinite`` flag into the same row of ``flags``
      (the last row once ``step`` reaches the window's end);
    - the next step's inputs, in place: the token (0 for -1: that row's later steps are never
      read), and for a row still within its ``limits`` the next position, its slot looked up
      in its row of ``tables`` and one key more; a row past them gets ``scratch_slot`` and
      stays where it is.

    ``logits [T, vocab]`` in any float dtype; the rest int32 ``[T]`` (``step [1]``), bool
    flags."""
    rows, vocab = logits.shape
    window = ids.shape[0]
    kernels = _kernels()
    kernels.greedy_advance[(rows,)](
        logits,
        vocab,
        logits.stride(0),
        nonfinite.view(torch.uint8),
        ids,
        flags.view(torch.uint8),
        ids.stride(0),
        step,
        window,
        tokens,
        positions,
        slots,
        lens,
        limits,
        tables,
        tables.stride(0),
        tables.shape[1],
        block_size,
        scratch_slot,
        BLOCK=min(2048, _pow2(vocab)),
    )
    kernels.bump_step[(1,)](step, window)
