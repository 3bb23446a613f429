"""The CPU linear routes without the native product (``linear_backend="onednn"``, and what
``auto`` takes in bfloat16): MKL's packed GEMM for float32 decode-sized calls, oneDNN's packed
weights for bfloat16 ones, oneDNN for the LM head (the native product:
``test_native_linear.py``). Each is held to the float64 product of the
same inputs, at every row count a step can give (below, at and above ``PACKED_MAX_ROWS``)."""

import pytest
import torch

from server.engine import cpu_kernels, native
from server.engine.cpu_kernels import (
    PACKED_MAX_ROWS,
    bf16_packing_available,
    mkl_packing_available,
    onednn_available,
    packing_agrees,
    route_linears,
)

pytestmark = pytest.mark.skipif(
    not mkl_packing_available(), reason="this torch build has no MKL packed GEMM"
)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.up = torch.nn.Linear(48, 96, bias=False)
    model.proj = torch.nn.Linear(96, 40, bias=True)
    model.lm_head = torch.nn.Linear(40, 300, bias=False)
    return model


@pytest.mark.parametrize("rows", [1, 3, 8, 16, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1, 200])
def test_routed_layers_give_the_product(rows: int) -> None:
    model = _model()
    x = torch.randn(1, rows, 48, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        assert route_linears(model, "onednn") == 3
        assert all(hasattr(getattr(model, n), "_ps_packed") for n in ("up", "proj", "lm_head"))
        h = x
        for name in ("up", "proj", "lm_head"):
            want = h.double() @ getattr(model, name).weight.double().T
            if getattr(model, name).bias is not None:
                want += getattr(model, name).bias.double()
            got = getattr(model, name)(h)
            assert got.shape == (1, rows, want.shape[-1])
            assert got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
            h = got


@pytest.mark.parametrize("rows", [1, 3, 16, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1, 200])
def test_bfloat16_routed_layers_give_the_product(rows: int) -> None:
    """Bfloat16 in, float32 accumulation, one rounding to bfloat16 out: each output is within
    half a bfloat16 step (2**-8 relative) of the float64 product of the same bfloat16 inputs.
    On a CPU where oneDNN has no bfloat16 product (AVX2 only), ``onednn`` refuses with the
    reason, ``auto`` routes every layer to the native product (which widens bfloat16 to
    float32 there), and it meets the same bound."""
    model = _model().to(torch.bfloat16)
    gen = torch.Generator().manual_seed(rows)
    names = ("up", "proj", "lm_head")
    with torch.no_grad():
        if bf16_packing_available():
            assert route_linears(model, "onednn") == 3
            assert all(hasattr(getattr(model, n), "_ps_packed") for n in names)
        else:
            assert not onednn_available(torch.bfloat16)
            with pytest.raises(ValueError, match="bfloat16 a CPU with AVX512 or AVX-NE-CONVERT"):
                route_linears(model, "onednn")
            assert native.load().bf16_widens
            assert route_linears(model, "auto") == 3
            assert all(hasattr(getattr(model, n), "_ps_native") for n in names)
        for name in names:
            layer = getattr(model, name)
            x = torch.randn(1, rows, layer.in_features, generator=gen).to(torch.bfloat16)
            want = x.double() @ layer.weight.double().T
            if layer.bias is not None:
                want += layer.bias.double()
            got = layer(x)
            assert got.shape == (1, rows, layer.out_features)
            assert got.dtype == torch.bfloat16
            assert bool(((got.double() - want).abs() <= want.abs() * 2**-8 + 1e-4).all())


def test_onednn_probe_answers_per_dtype() -> None:
    """The probe runs oneDNN's product for real: float32 runs on every x86 CPU torch supports;
    bfloat16 runs exactly where packing does (both need AVX512 or AVX-NE-CONVERT), and where it
    runs it gives the exact product of small integers."""
    assert onednn_available(torch.float32)
    assert onednn_available(torch.bfloat16) == bf16_packing_available()
    flags = native._cpu_flags().split()
    if "avx512bw" not in flags and "avx_ne_convert" not in flags:
        assert not onednn_available(torch.bfloat16)


def test_packing_check_rejects_a_wrong_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """``packing_agrees`` is what keeps a library whose packed product is wrong here from being
    used: it holds for the real product and fails once the product's columns come out of
    order, and then nothing is routed to packed weights."""
    assert packing_agrees((96, 48), torch.float32)
    if bf16_packing_available():
        assert packing_agrees((96, 48), torch.bfloat16)
    real = cpu_kernels._packed_linear

    def shuffled(*args: torch.Tensor | None) -> torch.Tensor:
        out = real(*args)  # type: ignore[arg-type]
        return out[:, torch.arange(out.shape[1] - 1, -1, -1)]

    monkeypatch.setattr(cpu_kernels, "_packed_linear", shuffled)
    assert not packing_agrees((96, 48), torch.float32)
    model = _model()
    assert route_linears(model, "onednn") == 1  # the LM head to oneDNN only
    assert not hasattr(model.up, "_ps_packed")


def test_torch_backend_packs_nothing() -> None:
    model = _model()
    assert route_linears(model, "torch") == 0
    assert not hasattr(model.up, "_ps_packed")
    bf16 = _model().to(torch.bfloat16)
    assert route_linears(bf16, "torch") == 0
    assert not hasattr(bf16.up, "_ps_packed")
