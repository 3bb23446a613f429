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
bit for most shapes and row counts measured); below that ``sgemm`` takes a matrix-vector path
and the two differ by float32 rounding. The packed copies cost memory: measured on
SmolLM2-135M, resident memory grew by 1.0 GB (the float32 weights are 0.54 GB) and packing took
0.9 s at load.

Bfloat16 projections at decode sizes go through oneDNN's packed weights the same way
(``torch.ops.mkldnn._reorder_linear_weight`` once at load, then ``_linear_pointwise`` against
the packed copy): ``nn.Linear`` in bfloat16 reorders the weight into oneDNN's blocked layout on
every call. Measured on a 2-core Xeon with AMX, the packed product equals ``nn.Linear``'s to the
last bit at every row count up to ``PACKED_MAX_ROWS`` for every SmolLM2 shape (it can differ by a
bfloat16 rounding at prefill sizes, which is why those stay on ``nn.Linear``). Resident memory
grew by 0.30 GB on SmolLM2-135M in bfloat16 (its weights are 0.27 GB).
``linear_backend="torch"`` turns every route off.
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


def bf16_packing_available() -> bool:
    """Whether this torch build can pack bfloat16 weights for oneDNN's linear kernel."""
    return onednn_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (``[out, in]``) packed once for the decode-sized products of its dtype."""
    if weight.dtype == torch.float32:
        packed: torch.Tensor = torch.ops.mkl._mkl_reorder_linear_weight(weight, PACKED_MAX_ROWS)
    else:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_MAX_ROWS)
    return packed


def _packed_linear(
    x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ weight.T + bias`` for a 2-D ``x`` against ``packed`` (made by ``_pack``)."""
    if weight.dtype == torch.float32:
        out: torch.Tensor = torch.ops.mkl._mkl_linear(x, packed, weight, bias, x.shape[0])
    else:
        out = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out


def packing_agrees(shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> bool:
    """Whether the packed product of a random ``shape`` (``[out, in]``) weight in ``dtype``
    equals ``torch.nn.functional.linear`` up to that dtype's rounding at several row counts.
    Every call passes its own row count against one packing, so the packed layout must not
    depend on the rows it was packed for; this checks that on this machine's libraries, once
    per shape and dtype."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen).to(dtype)
    bias = torch.randn(shape[0], generator=gen).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    packed = _pack(weight)
    for rows in (1, 5, 16, PACKED_MAX_ROWS):
        x = torch.randn(rows, shape[1], generator=gen).to(dtype)
        got = _packed_linear(x, packed, weight, bias).float()
        want = torch.nn.functional.linear(x, weight, bias).float()
        if got.shape != want.shape or not torch.allclose(
            got, want, rtol=tol, atol=tol * float(want.abs().max())
        ):
            return False
    return True


def _route_packed(module: torch.nn.Linear, packed: torch.Tensor) -> None:
    """Calls of up to ``PACKED_MAX_ROWS`` rows multiply against ``packed``; larger ones take
    the module's forward as it was (plain ``nn.Linear``, or the LM head's oneDNN route)."""
    fallback = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        features = x.shape[-1]
        rows = x.numel() // features if features else 0
        if not 0 < rows <= PACKED_MAX_ROWS:
            return fallback(x)
        out = _packed_linear(x.reshape(rows, features), packed, module.weight, module.bias)
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
    in float32 or bfloat16, when oneDNN is available), and every linear layer's calls of up to
    ``PACKED_MAX_ROWS`` rows to a weight packed once at load: MKL's packed GEMM in float32,
    oneDNN's packed weights in bfloat16 (the LM head's larger calls stay on oneDNN).
    Returns how many layers were routed."""
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
    linears = [
        (name, module) for name, module in model.named_modules() if type(module) is torch.nn.Linear
    ]
    can_pack = mkl_packing_available() if param.dtype == torch.float32 else bf16_packing_available()
    shapes = {(m.out_features, m.in_features) for _, m in linears}
    packing = can_pack and all(packing_agrees(shape, param.dtype) for shape in shapes)
    routed = 0
    for name, module in linears:
        if name.endswith("lm_head"):
            forward: Any = types.MethodType(_onednn_forward, module)
            setattr(module, "forward", forward)  # noqa: B010 (mypy: no method assignment)
        if packing:
            _route_packed(module, _pack(module.weight.detach()))
        if packing or name.endswith("lm_head"):
            routed += 1
    return routed
