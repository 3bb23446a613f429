"""The CPU linear routes: MKL's packed GEMM for float32 decode-sized calls, oneDNN for the LM
head. Each is held to the float64 product of the same inputs, at every row count a step can
give (below, at and above ``PACKED_MAX_ROWS``)."""

import pytest
import torch

from server.engine.cpu_kernels import PACKED_MAX_ROWS, mkl_packing_available, route_linears

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
        assert route_linears(model, "auto") == 3
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


def test_bfloat16_and_torch_backend_pack_nothing() -> None:
    model = _model()
    assert route_linears(model, "torch") == 0
    assert not hasattr(model.up, "_ps_packed")
    bf16 = _model().to(torch.bfloat16)
    assert route_linears(bf16, "auto") == 1  # the LM head to oneDNN only
    assert not hasattr(bf16.up, "_ps_packed")
