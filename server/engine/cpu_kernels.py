"""The linear layers on the CPU: the native product, MKL's packed GEMM, oneDNN.

In float32, where the native kernels build (``native.py``), every linear layer, the LM head
included, goes to the native product (``linear.c``), against a copy of its weight
packed once at load in the kernel's panel layout; the routes below are then not used. On a
2-core AMD EPYC it streamed the weights of a 16-row step at 17-23 GB/s against MKL's packed
product's 6 GB/s, and ran prefill-sized products 5-25% faster than MKL. It sums each output in
blocks of 64 terms: against float64, its error on the model's shapes is about half of MKL's,
and prompt log probabilities echoed from the default model came out closer to the
reference's than through MKL (largest difference over prompts of 8 to 700 tokens: 2.5e-5,
against 3.7e-5), so the 1e-4 that evaluation promises holds with room; oneDNN's product, by
contrast, moved them 1.3-1.6e-4 (below). The packed copy costs the weights' size once
more in memory.

In bfloat16, on a CPU with AVX512-BF16 and no AMX tiles, calls of up to ``PACKED_MAX_ROWS``
rows go to the native product's bfloat16 form (pairs of bfloat16 products summed in float32,
one rounding per output); measured on the AMD EPYC at 16 rows it ran 1.7-2.1x faster than
oneDNN with the same bits. Larger calls, and bfloat16 on CPUs with AMX (whose tiles oneDNN
uses), take the oneDNN routes below.

Without the native product (no compiler, ``PREFIX_SERVE_NATIVE=0``, or
``linear_backend="onednn"``), the BLAS routes below serve.

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

``linear_backend="onednn"`` keeps the MKL and oneDNN routes without the native product;
``linear_backend="native"`` requires it (an error says why it cannot run);
``linear_backend="torch"`` turns every route off.
"""

from __future__ import annotations

import logging
import threading
import types
from collections.abc import Callable
from functools import cache
from typing import Any

import torch

from server.engine import native

log = logging.getLogger(__name__)

LINEAR_BACKENDS = ("auto", "native", "onednn", "torch")
PACKED_MAX_ROWS = 64


@cache
def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build has oneDNN's linear kernel and it runs here in ``dtype``.
    Builds carry the kernel on every x86 CPU, but oneDNN's bfloat16 products need AVX512
    (BW, VL, DQ) or AVX-NE-CONVERT: on an AVX2-only CPU they raise, so this tries one tiny
    product once per dtype rather than trusting the build."""
    available = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    if not (available and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        x, weight = torch.ones(2, 16, dtype=dtype), torch.ones(8, 16, dtype=dtype)
        out = torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    except RuntimeError as error:
        log.info("oneDNN's %s linear kernel does not run on this CPU: %s", dtype, error)
        return False
    return bool((out.float() == 16.0).all())


def mkl_packing_available() -> bool:
    """Whether this torch build has MKL's packed GEMM for float32 linear layers."""
    mkl = torch.ops.mkl
    return (
        bool(torch.backends.mkl.is_available())  # type: ignore[no-untyped-call]
        and hasattr(mkl, "_mkl_linear")
        and hasattr(mkl, "_mkl_reorder_linear_weight")
    )


@cache
def bf16_packing_available() -> bool:
    """Whether oneDNN can pack bfloat16 weights for its linear kernel on this CPU (the same
    instruction needs as its bfloat16 product; tried once)."""
    if not (
        onednn_available(torch.bfloat16) and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    ):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 16, dtype=torch.bfloat16), 4)
    except RuntimeError as error:
        log.info("oneDNN cannot pack bfloat16 weights on this CPU: %s", error)
        return False
    return True


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


def _pack_panels(weight: torch.Tensor, width: int) -> torch.Tensor:
    """``weight`` (``[out, in]``) as ``ceil(out / width)`` panels of its rows, transposed, the
    last padded with zero rows: the native product's layout. Float32 panels are ``[in,
    width]``; bfloat16 ones ``[ceil(in / 2), width, 2]``, the inputs taken in pairs (an odd
    input count padded with a zero column)."""
    out_features, in_features = weight.shape
    panels = -(-out_features // width)
    rows = panels * width - out_features
    if weight.dtype == torch.bfloat16:
        padded = torch.nn.functional.pad(weight, (0, in_features % 2, 0, rows))
        pairs = padded.view(panels, width, -(-in_features // 2), 2)
        return pairs.permute(0, 2, 1, 3).contiguous()
    padded = torch.nn.functional.pad(weight, (0, 0, 0, rows))
    return padded.view(panels, width, in_features).transpose(1, 2).contiguous()


def _route_native(module: torch.nn.Linear, width: int, max_rows: int | None = None) -> None:
    """``module``'s calls (those of at most ``max_rows`` rows, when given) go to the native
    product, against its weight packed once here; other calls take the module's forward as
    it was."""
    weight = module.weight.detach()
    packed, bias = _pack_panels(weight, width), _padded_bias(module, width)
    _native_forward(module, packed, bias, max_rows)


def _padded_bias(module: torch.nn.Linear, width: int) -> torch.Tensor | None:
    """The module's bias in float32, padded with zeros to whole panels of ``width``."""
    if module.bias is None:
        return None
    padding = -module.out_features % width
    return torch.nn.functional.pad(module.bias.detach().float(), (0, padding))


# A product over packed panels: the input, or None where the native product does not take it
# (more rows than its route serves, another dtype, a layout it cannot read).
_Product = Callable[[torch.Tensor], torch.Tensor | None]


def _native_product(
    packed: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor, max_rows: int | None
) -> _Product:
    """The native product against ``packed`` (panels of a ``weight``-shaped matrix, or a
    slice of a larger packing that starts at a panel), plus ``bias``."""
    out_features, in_features = weight.shape
    # One argument block per product: a call sets only its input, output and row count,
    # under the lock (the engine calls from one thread; anything else calling waits its turn).
    lock = threading.Lock()
    job = native.LinearJob(
        packed=packed.data_ptr(),
        bias=bias.data_ptr() if bias is not None else None,
        n=out_features,
        y_stride=out_features,
        k=in_features,
    )
    run = native.linear_runner(job, bf16=weight.dtype == torch.bfloat16)
    most = max_rows if max_rows is not None else float("inf")

    def product(x: torch.Tensor) -> torch.Tensor | None:
        # A 2-D input (the decoder loop's) is used and answered as it is: a reshape and a view
        # cost about 2 and 4 us each from Python (a 16 x 576 -> 576 call measured 88.8 us this
        # way against 100.4 us through the general path).
        flat_in = x.dim() == 2 and x.shape[1] == in_features
        rows = x.shape[0] if flat_in else x.numel() // in_features if in_features else 0
        if not 0 < rows <= most:
            return None
        flat = x if flat_in else x.reshape(rows, in_features)
        if flat.dtype != weight.dtype or flat.stride(-1) != 1:
            return None
        y = torch.empty(rows, out_features, dtype=weight.dtype)
        with lock:
            job.x, job.x_stride, job.y, job.m = flat.data_ptr(), flat.stride(0), y.data_ptr(), rows
            job.threads = torch.get_num_threads()
            run()
        return y if flat_in else y.view(*x.shape[:-1], out_features)

    return product


def _native_forward(
    module: torch.nn.Linear, packed: torch.Tensor, bias: torch.Tensor | None, max_rows: int | None
) -> None:
    """``module``'s forward through the native product against ``packed``; the calls it does
    not take go to the module's forward as it was."""
    product = _native_product(packed, bias, module.weight.detach(), max_rows)
    fallback = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = product(x)
        return fallback(x) if y is None else y

    setattr(module, "_ps_native", (packed, bias))  # noqa: B010 (kept alive with the module)
    setattr(module, "forward", forward)  # noqa: B010 (mypy: no method assignment)


# The projections that read the same input in a Llama-family layer, by the attribute their
# joint product is kept under on the owning module: their outputs side by side.
JOINT_PRODUCTS = {
    "_ps_qkv": ("q_proj", "k_proj", "v_proj"),
    "_ps_gate_up": ("gate_proj", "up_proj"),
}


def _route_joint(
    owner: torch.nn.Module, attr: str, names: tuple[str, ...], width: int, max_rows: int | None
) -> bool:
    """Route ``owner``'s linear layers ``names`` (same input, same dtype) to the native product
    against one packing of their weights stacked, and keep on ``owner.<attr>`` a product that
    gives all their outputs side by side in one call (fewer calls per layer; every output
    column of the native product is summed on its own, so each member's columns have the bits
    of its own product). Each member's own calls multiply against its slice of the packing.
    Returns False, routing nothing, where the members do not fit one packing (missing, of
    another type, different inputs, an output width that is not whole panels, biases on some
    only)."""
    members = [getattr(owner, name, None) for name in names]
    if not all(type(m) is torch.nn.Linear for m in members):
        return False
    linears = [m for m in members if isinstance(m, torch.nn.Linear)]
    first = linears[0].weight
    fits = all(
        m.in_features == first.shape[1]
        and m.weight.dtype == first.dtype
        and m.out_features % width == 0
        and (m.bias is None) == (linears[0].bias is None)
        for m in linears
    )
    if not fits:
        return False
    weight = torch.cat([m.weight.detach() for m in linears])
    packed = _pack_panels(weight, width)
    # Whole panels each: the members' biases side by side need no padding.
    has_bias = linears[0].bias is not None
    bias = torch.cat([m.bias.detach().float() for m in linears]) if has_bias else None
    panel = 0
    for m in linears:
        panels = m.out_features // width
        _native_forward(
            m,
            packed[panel : panel + panels],
            None if bias is None else bias[panel * width : (panel + panels) * width],
            max_rows,
        )
        panel += panels
    setattr(owner, attr, _native_product(packed, bias, weight, max_rows))
    return True


def _route_all_native(model: torch.nn.Module, width: int, max_rows: int | None = None) -> None:
    """Every linear layer of ``model`` to the native product (calls of at most ``max_rows``
    rows, when given), the projections of each ``JOINT_PRODUCTS`` group against one packing."""
    joined: set[torch.nn.Module] = set()
    for module in model.modules():
        for attr, names in JOINT_PRODUCTS.items():
            if _route_joint(module, attr, names, width, max_rows):
                joined.update(getattr(module, name) for name in names)
    for module in model.modules():
        if type(module) is torch.nn.Linear and module not in joined:
            _route_native(module, width, max_rows)


def native_linear_usable(param: torch.Tensor, forced: bool = False) -> str:
    """Why the native linear product cannot serve a model whose weights are like ``param``,
    or an empty string where it can. Unless ``forced``, bfloat16 steps aside for oneDNN on
    CPUs with AMX tiles (its products use them), and on CPUs without AVX512-BF16 where
    oneDNN has a bfloat16 product (the native one widens to float32 there)."""
    if param.device.type != "cpu" or param.dtype not in (torch.float32, torch.bfloat16):
        return "the native linear product takes float32 or bfloat16 weights on the CPU"
    kernel = native.load()
    if kernel.lib is None:
        return f"the native linear product is not available: {kernel.reason}"
    if param.dtype == torch.bfloat16 and not forced:
        if kernel.bf16_widens and onednn_available(torch.bfloat16):
            return "this CPU has no AVX512-BF16 and oneDNN has a bfloat16 product here"
        if native.has_matrix_unit():
            return "this CPU has AMX tiles: oneDNN's bfloat16 products use them"
    return ""


def _onednn_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
        x.reshape(-1, shape[-1]), self.weight, self.bias, "none", [], ""
    )
    return out.view(*shape[:-1], out.shape[-1])


def _route_onednn(module: torch.nn.Linear) -> None:
    """Every call of ``module`` to oneDNN's matmul."""
    forward: Any = types.MethodType(_onednn_forward, module)
    setattr(module, "forward", forward)  # noqa: B010 (mypy: no method assignment)


def route_linears(model: torch.nn.Module, backend: str = "auto") -> int:
    """Route the model's linear layers as ``backend`` asks (``auto``: the best that can run
    here). ``native`` (and ``auto`` where the native product serves the dtype here): in
    float32 every call to the native product; in bfloat16 calls of up to ``PACKED_MAX_ROWS``
    rows, larger ones to oneDNN. ``onednn`` (and ``auto`` otherwise, on the CPU in float32 or
    bfloat16): the LM head to oneDNN, and every layer's calls of up to ``PACKED_MAX_ROWS`` rows
    to a weight packed once at load (MKL's packed GEMM in float32, oneDNN's packed weights in
    bfloat16). Returns how many layers were routed. Raises ValueError for an unknown backend,
    or one that cannot run here."""
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"linear backend {backend!r}: expected one of {LINEAR_BACKENDS}")
    if backend == "torch":
        return 0
    param = next(model.parameters())
    linears = [
        (name, module) for name, module in model.named_modules() if type(module) is torch.nn.Linear
    ]
    if backend in ("auto", "native"):
        why = native_linear_usable(param, forced=backend == "native")
        if why and backend == "native":
            raise ValueError(f"linear backend 'native': {why}")
        if why and param.device.type == "cpu" and param.dtype in (torch.float32, torch.bfloat16):
            log.info("%s; linear layers run on MKL and oneDNN", why)
        if not why:
            width = native.load().panel_width
            widens = native.load().bf16_widens
            if param.dtype == torch.float32 or (widens and not onednn_available(param.dtype)):
                # Float32; or bfloat16 where the native product is the only fast one (torch's
                # is generic code): every call goes to it.
                _route_all_native(model, width)
                return len(linears)
            # Bfloat16: the native product takes decode-sized calls; larger ones stay on
            # oneDNN (the LM head through its matmul), which is as fast there.
            for name, module in linears:
                if name.endswith("lm_head") and onednn_available(param.dtype):
                    _route_onednn(module)
            _route_all_native(model, width, max_rows=PACKED_MAX_ROWS)
            return len(linears)
    usable = (
        param.device.type == "cpu"
        and param.dtype in (torch.float32, torch.bfloat16)
        and onednn_available(param.dtype)
    )
    if not usable:
        if backend == "onednn":
            raise ValueError(
                "linear backend 'onednn' needs a CPU model in float32 or bfloat16, a torch "
                "built with oneDNN, and for bfloat16 a CPU with AVX512 or AVX-NE-CONVERT"
            )
        if param.device.type == "cpu" and param.dtype == torch.bfloat16:
            log.info("oneDNN has no bfloat16 product on this CPU; linear layers stay on torch")
        return 0
    can_pack = mkl_packing_available() if param.dtype == torch.float32 else bf16_packing_available()
    shapes = {(m.out_features, m.in_features) for _, m in linears}
    packing = can_pack and all(packing_agrees(shape, param.dtype) for shape in shapes)
    routed = 0
    for name, module in linears:
        if name.endswith("lm_head"):
            _route_onednn(module)
        if packing:
            _route_packed(module, _pack(module.weight.detach()))
        if packing or name.endswith("lm_head"):
            routed += 1
    return routed
