"""A decoder layer's small operators on the CPU, through the native kernels (``layers.c``):
RMSNorm, the SiLU activation and gate, and the rotary embedding, and the step's keys and
values written into the paged cache, each in float32 or bfloat16.

At decode sizes torch spends more on dispatching these operator chains than on their
arithmetic. Measured on a 2-core AVX2 EPYC at 16 rows, per call from Python: RMSNorm over 576
values 24-29 us through torch, 7.7 us here; the SiLU gate over 1,536 42-47 against 27 us;
rotary over 12 heads 16.8 against 9.5 us; the cache write with its finiteness check 21 against
13.6 us.

In bfloat16 torch's chains cost more still (each operator widens and rounds): in W1's engine
profile on the same EPYC (``prefix-serve bench profile --dtype bfloat16``) the work outside the
products and attention took 0.24 s in prefill and 0.38 s in decode through torch, against
float32's 0.14 and 0.23 s through these kernels. The bfloat16 kernels round where torch's
operators round (``layers.c``).

``route_layers`` replaces the forward of every RMSNorm and SiLU module of a float32 or
bfloat16 CPU model with the native one, as ``cpu_kernels`` does for the linear layers, so
transformers' forward and the engine's own decoder loop (``decoder.py``) compute the same
values. The native RMSNorm sums a row's squares in another order than torch, and its SiLU takes
another ``exp``: each is checked against the module's own forward on random rows once at load
(a module whose forward computes something else, say a new transformers version's, keeps it),
and the engine's exactness tests compare the whole model with the hand reference as before.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

from server.engine import native

log = logging.getLogger(__name__)

# Norm classes whose forward is transformers' Llama RMSNorm: float32 statistics, the scale and
# then the weight applied as two products. Any other keeps its forward.
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
SILUS = ("SiLUActivation", "SiLU")


def _lib() -> Any:
    lib = native.load().lib
    assert lib is not None, "cpu_layers needs the native kernels (check native.load())"
    return lib


DTYPES = (torch.float32, torch.bfloat16)


def _kernel(name: str, dtype: torch.dtype) -> Any:
    """The native kernel ``name`` (``native.LAYER_KERNELS``) for ``dtype`` (one of DTYPES)."""
    return getattr(_lib(), name if dtype == torch.float32 else f"{name}_bf16")


def _rows(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as ``[rows, width]`` rows with unit stride (itself where it is 2-D with unit
    stride, the decoder loop's case; else a view or a copy), or None where it is not a
    float32 or bfloat16 CPU tensor. (Each torch call here costs about a microsecond, a
    sizeable share of a decode-sized call: hence the early return.)"""
    if not x.is_cpu or x.dtype not in DTYPES or x.dim() == 0:
        return None
    if x.dim() == 2 and x.stride(1) == 1:
        return x
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _shaped(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``out`` (``[rows, width]``) in ``like``'s shape."""
    return out if like.dim() == 2 else out.view(like.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """transformers' RMSNorm of ``x [..., width]`` (a new tensor), or None where the native
    kernel does not take ``x``. ``weight``: contiguous, ``[width]``, of ``x``'s dtype
    (float32 or bfloat16)."""
    flat = _rows(x)
    if flat is None or flat.shape[1] != weight.shape[0] or weight.dtype != x.dtype:
        return None  # (a width that is not the weight's: the module's own forward says why)
    rows, width = flat.shape
    out = torch.empty(rows, width, dtype=x.dtype)
    _kernel("rms_norm", x.dtype)(
        flat.data_ptr(),
        flat.stride(0),
        weight.data_ptr(),
        out.data_ptr(),
        rows,
        width,
        eps,
        torch.get_num_threads(),
    )
    return _shaped(out, x)


def silu_gate(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor | None:
    """SiLU of ``gate [..., width]``, times ``up`` (same shape and dtype) where given, as a new
    tensor; or None where the native kernel does not take the inputs (float32 or bfloat16).
    The SiLU values have the same bits with and without ``up``."""
    g = _rows(gate)
    u = _rows(up) if up is not None else None
    if g is None or (up is not None and (u is None or up.shape != gate.shape)):
        return None
    if up is not None and up.dtype != gate.dtype:
        return None
    rows, width = g.shape
    out = torch.empty(rows, width, dtype=gate.dtype)
    _kernel("silu_gate", gate.dtype)(
        g.data_ptr(),
        g.stride(0),
        u.data_ptr() if u is not None else None,
        u.stride(0) if u is not None else 0,
        out.data_ptr(),
        rows,
        width,
        torch.get_num_threads(),
    )
    return _shaped(out, gate)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor | None:
    """The rotary embedding of ``x [T, H, D]`` (heads contiguous within a row, any row
    stride): ``x * cos + x.roll(D / 2, -1) * signed_sin`` with ``cos`` and ``signed_sin``
    contiguous ``[T, 1, D]``, all float32 or all bfloat16, as a new contiguous tensor, with the
    bits of those torch operators (each product and the sum rounded on its own); None where
    the kernel does not take the inputs."""
    if not x.is_cpu or x.dtype not in DTYPES or x.dim() != 3 or native.load().lib is None:
        return None
    tokens, heads, d = x.shape
    if x.stride(2) != 1 or x.stride(1) != d or d % 2:
        return None
    for table in (cos, signed_sin):
        if table.dtype != x.dtype or table.shape != (tokens, 1, d):
            return None
        if not table.is_contiguous():
            return None
    out = torch.empty(tokens, heads, d, dtype=x.dtype)
    _kernel("rotate_heads", x.dtype)(
        x.data_ptr(),
        x.stride(0),
        cos.data_ptr(),
        signed_sin.data_ptr(),
        out.data_ptr(),
        tokens,
        heads,
        d,
        torch.get_num_threads(),
    )
    return out


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    nonfinite: torch.Tensor,
) -> bool:
    """Write ``key`` and ``value`` (``[Hkv, T, D]``, any head and row strides) into the caches
    (``[Hkv, num_slots, D]``) at ``slots [T]``: a token whose key or value is not finite (any
    head) is written as zeros and marked in ``nonfinite [T]`` (or-ed in). Returns False,
    writing nothing, where the native kernel does not take these tensors; raises IndexError,
    writing nothing, for a slot outside the caches (as ``index_copy_`` does)."""
    dtype = key.dtype
    fits = (
        native.load().lib is not None
        and key.device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and value.dtype == dtype == k_cache.dtype == v_cache.dtype
        and key.shape == value.shape
        and k_cache.dim() == 3
        and k_cache.shape[0] == key.shape[0]
        and k_cache.shape[2] == key.shape[2]
        and v_cache.shape == k_cache.shape
        and key.stride(2) == 1
        and value.stride(2) == 1
        and k_cache.stride()[1:] == (key.shape[2], 1)
        and v_cache.stride() == k_cache.stride()
        and slots.dtype == torch.int64
        and slots.is_contiguous()
        and slots.shape == (key.shape[1],)
    )
    if not fits:
        return False
    heads, tokens, head_dim = key.shape
    flagged = torch.empty(tokens, dtype=torch.uint8)
    strides = ctypes.c_int64 * 2
    count = _lib().write_kv(
        key.data_ptr(),
        strides(key.stride(0), key.stride(1)),
        value.data_ptr(),
        strides(value.stride(0), value.stride(1)),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.stride(0),
        k_cache.shape[1],
        slots.data_ptr(),
        flagged.data_ptr(),
        tokens,
        heads,
        head_dim,
        key.element_size(),
    )
    if count < 0:
        raise IndexError(
            f"cache slots out of range: {slots.min()}..{slots.max()} of {k_cache.shape[1]}"
        )
    if count:
        nonfinite |= flagged.bool()
    return True


# A module's native forward: its input -> the output, or None where the kernel does not take it.
_Forward = Callable[[torch.Tensor], torch.Tensor | None]


def _native_forward(module: torch.nn.Module) -> tuple[_Forward, int] | None:
    """The native forward for ``module`` and a row width to check it at, or None where the
    module is not one the kernels compute."""
    kind = type(module).__name__
    if kind in RMS_NORMS and hasattr(module, "variance_epsilon"):
        weight = module.weight
        if not (isinstance(weight, torch.Tensor) and weight.dtype in DTYPES):
            return None
        if not weight.is_contiguous() or weight.shape != (weight.numel(),):
            return None
        eps = float(getattr(module, "variance_epsilon"))  # noqa: B009 (mypy: a Module attribute)
        return functools.partial(_norm_forward, weight.detach(), eps), weight.shape[0]
    if kind in SILUS and not getattr(module, "inplace", False):
        return silu_gate, 300
    return None


def _norm_forward(weight: torch.Tensor, eps: float, x: torch.Tensor) -> torch.Tensor | None:
    return rms_norm(x, weight, eps)


def _agrees(
    forward: _Forward, own: Callable[[torch.Tensor], Any], width: int, dtype: torch.dtype
) -> bool:
    """Whether ``forward`` gives ``own``'s values on random ``dtype`` rows of ``width``, large
    and small values included: within float32 rounding of a few operations, or in bfloat16
    within two bfloat16 steps (each kernel rounds its result once or twice where torch does,
    from a float32 value that can differ from torch's in its last bits)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, width, generator=gen) * torch.logspace(-3, 2, 7).unsqueeze(1)
    x = x.to(dtype)
    with torch.no_grad():
        got, want = forward(x), own(x)
    if got is None or got.dtype != want.dtype:
        return False
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (2.0**-6, 1e-30)
    return torch.allclose(got.float(), want.float(), rtol=rtol, atol=atol)


def route_layers(model: torch.nn.Module) -> int:
    """Route the RMSNorm (``RMS_NORMS``) and SiLU modules of a float32 or bfloat16 CPU model to
    the native kernels, each kind once it has matched the module's own forward; returns how
    many modules were routed (0 where the kernels are not built, or the model is not float32
    or bfloat16 on the CPU)."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype not in DTYPES or native.load().lib is None:
        return 0
    routed = 0
    checked: dict[str, bool] = {}
    for module in model.modules():
        found = _native_forward(module)
        if found is None:
            continue
        forward, width = found
        kind = type(module).__name__
        if kind not in checked:
            checked[kind] = _agrees(forward, module.forward, width, param.dtype)
            if not checked[kind]:
                log.warning("%s: the native kernel disagrees with its forward; not routed", kind)
        if checked[kind]:
            _route(module, forward)
            routed += 1
    return routed


def _route(module: torch.nn.Module, native_forward: _Forward) -> None:
    """``module``'s calls to ``native_forward``; those it does not take to its forward as it
    was."""
    fallback = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = native_forward(x)
        out: torch.Tensor = fallback(x) if y is None else y
        return out

    setattr(module, "_ps_layer", True)  # noqa: B010 (the decoder loop reads it)
    setattr(module, "forward", forward)  # noqa: B010 (mypy: no method assignment)
