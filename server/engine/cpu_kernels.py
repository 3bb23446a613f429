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
"""

from __future__ import annotations

import types
from typing import Any

import torch

LINEAR_BACKENDS = ("auto", "onednn", "torch")


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear kernel and it can run here."""
    available = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    return bool(available) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
        x.reshape(-1, shape[-1]), self.weight, self.bias, "none", [], ""
    )
    return out.view(*shape[:-1], out.shape[-1])


def route_linears(model: torch.nn.Module, backend: str = "auto") -> int:
    """Send the model's LM head to oneDNN when ``backend`` asks for it (``auto``: on the CPU,
    in float32 or bfloat16, when oneDNN is available). Returns how many layers were routed."""
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
    routed = 0
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and name.endswith("lm_head"):
            forward: Any = types.MethodType(_onednn_forward, module)
            setattr(module, "forward", forward)  # noqa: B010 (mypy: no method assignment)
            routed += 1
    return routed
