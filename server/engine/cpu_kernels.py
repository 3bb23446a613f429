"""The LM head on the CPU through oneDNN.

``torch.nn.Linear`` on the CPU goes to MKL's GEMM for float32. At the engine's decode shapes (a
few rows per step against a whole weight matrix) that path is slow on CPUs where MKL does not
use its widest instructions: measured on a 2-core AMD EPYC with AVX-512, the 49,152-row LM head
at 16 rows took 21 ms through MKL and 9.8 ms through oneDNN (bfloat16 already goes to oneDNN).
``route_linears`` sends the model's LM head to oneDNN's matmul
(``torch.ops.mkldnn._linear_pointwise``, the kernel torch's own CPU compiler emits for linear
layers). The result is the same product; only the order of the float additions differs.

Only the LM head: routing the layers' projections too gained another 10-20% on them, but
their different rounding, carried through 30 layers, moved prompt log probabilities by up to
1.3e-4 from the hand reference, past the 1e-4 that evaluation through the server promises
(docs/evaluation.md); with the LM head alone the difference stays at the level MKL gives
(about 1.5e-5).

Float32 projections at decode sizes go through MKL's packed GEMM. ``nn.Linear`` calls MKL's
``sgemm``, which re-packs the whole weight matrix into its blocked layout on every call; at a
few rows per step that copy costs more than the product. ``route_linears`` packs each float32
weight once (``torch.ops.mkl._mkl_reorder_linear_weight``, the same packing torch's CPU compiler
uses) and multiplies against the packed copy when a call has at most ``PACKED_MAX_ROWS`` rows:
measured on a 2-core Xeon, 16 rows against the 1536x576 MLP weight took 0.18 ms packed and 0.43
ms through ``nn.Linear``. Above that size ``nn.Linear`` is as fast or faster and is used. The
packed product runs the same kernel as ``sgemm`` from about eight rows up (equal to the last
bit in the measurements); below that ``sgemm`` takes a matrix-vector path and the two differ by
float32 rounding. The packed copy costs the weights' size again in memory (float32 only).
"""

from __future__ import annotations

import types
from typing import Any

import torch

LINEAR_BACKENDS = ("auto", "onednn", "torch")
PACKED_MAX_ROWS = 64


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear kernel and it can run here."""
    available = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    return bool(available) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def mkl_packing_available() -> bool:
    """Whether this torch build has MKL's packed GEMM for float32 linear layers."""
    mkl = torch.ops.mkl
    return (
        bool(torch.backends.mkl.is_available())  # type: ignore[no-untyped-call]
        and hasattr(mkl, "_mkl_linear")
        and hasattr(mkl, "_mkl_reorder_linear_weight")
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``[out, in]`` in MKL's packed layout, checked against ``torch.nn.functional
    .linear`` at several row counts (the layout must not depend on the rows it was packed for:
    every call passes its own). Raises ``RuntimeError`` if this MKL disagrees."""
    packed: torch.Tensor = torch.ops.mkl._mkl_reorder_linear_weight(weight, PACKED_MAX_ROWS)
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 5, 16, PACKED_MAX_ROWS):
        x = torch.randn(rows, weight.shape[1], generator=gen)
        got = torch.ops.mkl._mkl_linear(x, packed, weight, None, rows)
        want = torch.nn.functional.linear(x.double(), weight.double())
        tol = 1e-5 * float(x.abs().sum(1).max()) * float(weight.abs().max()) + 1e-6
        if not float((got.double() - want).abs().max()) <= tol:
            raise RuntimeError(f"MKL's packed GEMM disagrees with linear at {rows} rows")
    return packed


def _route_packed(module: torch.nn.Linear, packed: torch.Tensor) -> None:
    """Calls of up to ``PACKED_MAX_ROWS`` rows multiply against ``packed``; larger ones take
    the module's forward as it was (plain ``nn.Linear``, or the LM head's oneDNN route)."""
    fallback = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        features = x.shape[-1]
        rows = x.numel() // features if features else 0
        if not 0 < rows <= PACKED_MAX_ROWS:
            return fallback(x)
        out: torch.Tensor = torch.ops.mkl._mkl_linear(
            x.reshape(rows, features), packed, module.weight, module.bias, rows
        )
        return out.view(*x.shape[:-1], out.shape[-1])

    setattr(module, "_ps_packed", packed)  # noqa: B010 (a plain attribute, not a buffer)
    setattr(module, "forward", forward)  # noqa: B010 (mypy: no method assignment)


def _onednn_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
        x.reshape(-1, shape[-1]), self.weight, self.bias, "none", [], ""
    )
    return out.view(*shape[:-1], out.shape[-1])


def route_linears(model: torch.nn.Module, backend: str = "auto") -> int:
    """Send the model's LM head to oneDNN when ``backend`` asks for it (``auto``: on the CPU,
    in float32 or bfloat16, when oneDNN is available), and, in float32 with MKL, every linear
    layer's calls of up to ``PACKED_MAX_ROWS`` rows to MKL's packed GEMM (the LM head's larger
    calls stay on oneDNN). Returns how many layers were routed."""
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"linear backend {backend!r}: expected one of {LINEAR_BACKENDS}")
    if backend == "torch":
        return 0
    param = next(model.parameters())
    usable = (
        param.device.type == "cpu"
        and param.dtype in (torch.float32, torch.bfloat16)
        and onednn_available()
    )
    if not usable:
        if backend == "onednn":
            raise ValueError(
                "linear backend 'onednn' needs a CPU model in float32 or bfloat16 and a torch "
                "built with oneDNN"
            )
        return 0
    packing = param.dtype == torch.float32 and mkl_packing_available()
    routed = 0
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear:
            continue
        if name.endswith("lm_head"):
            forward: Any = types.MethodType(_onednn_forward, module)
            setattr(module, "forward", forward)  # noqa: B010 (mypy: no method assignment)
        if packing:
            try:
                packed = pack_weight(module.weight.detach())
            except RuntimeError:
                packing = False  # this MKL's layout is not what we rely on: use none of it
            else:
                _route_packed(module, packed)
        routed += 1 if packing or name.endswith("lm_head") else 0
    return routed
