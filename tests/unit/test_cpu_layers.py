"""A layer's small operators through the native kernels (``engine/layers.c``, wrapped by
``cpu_layers``): RMSNorm and SiLU against float64 references, the rotary embedding and the cache
write against torch's operators bit for bit, and the routing of a model's modules.
"""

from __future__ import annotations

import pytest
import torch
from test_native_attention import tiny_llama
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from server.engine import cpu_layers, decoder, native
from server.engine.decoder import _rotate

WIDTHS = [1, 7, 31, 32, 33, 64, 100, 576]


@pytest.fixture(autouse=True)
def kernels_built() -> None:
    assert native.load().lib is not None, native.load().reason


def rows(n: int, width: int, seed: int, stride: int = 0) -> torch.Tensor:
    """``n`` rows of ``width`` float32 values of magnitudes 1e-3 to 1e2, ``stride`` apart
    when given (a slice of wider rows)."""
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(n, max(stride, width), generator=gen)
    full *= torch.logspace(-3, 2, n).unsqueeze(1)
    return full[:, :width]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("stride", [0, 700])
def test_rms_norm_within_float32_rounding_of_float64(width: int, stride: int) -> None:
    """Each output within a few float32 roundings of the float64 RMSNorm (the sum of squares in
    another order than torch's, so not its bits), rows at any stride."""
    x = rows(9, width, seed=width, stride=stride)
    weight = torch.randn(width, generator=torch.Generator().manual_seed(1))
    got = cpu_layers.rms_norm(x, weight, 1e-5)
    assert got is not None and got.shape == x.shape and got.is_contiguous()
    x64 = x.double()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    bound = 8 * 2.0**-24 * want.abs() + 1e-30
    assert ((got.double() - want).abs() <= bound).all()


def test_rms_norm_matches_transformers_module_and_keeps_shape() -> None:
    norm = LlamaRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-2, 2, 48))
        x = torch.randn(2, 5, 48)
        got = cpu_layers.rms_norm(x, norm.weight, 1e-6)
        assert got is not None and got.shape == (2, 5, 48)
        torch.testing.assert_close(got, norm(x), rtol=2e-6, atol=1e-7)
    assert cpu_layers.rms_norm(x.bfloat16(), norm.weight, 1e-6) is None  # the weight's dtype


BF16 = torch.bfloat16


def bf16_steps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """How many bfloat16 steps (at ``want``'s magnitude) ``got`` lies from float64 ``want``."""
    step = 2.0 ** (torch.floor(torch.log2(want.abs().clamp_min(2.0**-126))) - 7)
    return (got.double() - want).abs() / step


@pytest.mark.parametrize("width", WIDTHS)
def test_bfloat16_rms_norm_within_two_steps_of_float64(width: int) -> None:
    """Bfloat16 rows: the normalised row rounded to bfloat16 and its product with the bfloat16
    weight rounded again (transformers' RMSNorm in bfloat16), so each output lies within two
    bfloat16 steps of the float64 RMSNorm of the same inputs; rows at a stride."""
    x = rows(9, width, seed=width, stride=2 * width).to(BF16)
    weight = torch.randn(width, generator=torch.Generator().manual_seed(1)).to(BF16)
    got = cpu_layers.rms_norm(x, weight, 1e-5)
    assert got is not None and got.dtype == BF16 and got.shape == x.shape
    x64 = x.double()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    assert (bf16_steps(got, want) <= 2).all()


@pytest.mark.parametrize("width", [64, 256])
def test_bfloat16_rms_norm_has_transformers_bits_where_the_sum_is_exact(width: int) -> None:
    """Where every sum of squares is exact in float32 whatever the order (small integers) and
    the width a power of two (a mean by division or by the reciprocal is the same), the kernel
    gives transformers' bfloat16 RMSNorm bit for bit: its roundings are the module's."""
    gen = torch.Generator().manual_seed(width)
    norm = LlamaRMSNorm(width, eps=1e-6).to(BF16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=gen))
        x = torch.randint(-8, 9, (33, width), generator=gen).to(BF16)
        want = norm(x)
    got = cpu_layers.rms_norm(x, norm.weight, 1e-6)
    assert got is not None and torch.equal(got, want)


@pytest.mark.parametrize("width", WIDTHS)
def test_bfloat16_silu_rounds_the_float32_kernels_values(width: int) -> None:
    """Bfloat16 SiLU is the float32 kernel's SiLU of the (exactly widened) inputs rounded once
    to bfloat16, so within one bfloat16 step of float64's; the gate multiplies those rounded
    values by up and rounds again, which is torch's ``silu(gate) * up`` in bfloat16."""
    gate = rows(11, width, seed=width, stride=2 * width + 3).to(BF16)
    up = rows(11, width, seed=width + 1).to(BF16)
    silu = cpu_layers.silu_gate(gate)
    float_silu = cpu_layers.silu_gate(gate.float())
    assert silu is not None and float_silu is not None and silu.dtype == BF16
    assert torch.equal(silu, float_silu.to(BF16))
    g64 = gate.double()
    want = g64 * torch.sigmoid(g64)
    assert (bf16_steps(silu, want)[gate > -80] <= 1).all()
    gated = cpu_layers.silu_gate(gate, up)
    assert gated is not None and torch.equal(gated, silu * up)
    assert cpu_layers.silu_gate(gate, up.float()) is None  # one dtype for both


@pytest.mark.parametrize("width", WIDTHS)
def test_silu_within_a_few_ulp_and_the_gate_has_its_bits(width: int) -> None:
    """SiLU within 4 float32 roundings of the float64 value above -80 (torch's is within 2.4
    on these rows; this kernel's measured 3.2 at most on 200,000 values), and below -87, where
    the true value is under 2e-36 and float32 runs out of normal numbers, zero; -inf, inf and
    NaN as torch gives them. The gate's outputs are the same SiLU values, each times up rounded
    once, which is what torch's product after the activation gives."""
    gate = rows(11, width, seed=width, stride=2 * width + 3)
    gate[0, : min(width, 4)] = torch.tensor([-200.0, 200.0, -88.5, 0.0])[: min(width, 4)]
    up = rows(11, width, seed=width + 1)
    silu = cpu_layers.silu_gate(gate)
    assert silu is not None and silu.shape == gate.shape
    g64 = gate.double()
    want = g64 * torch.sigmoid(g64)
    normal = gate > -80
    bound = 4 * 2.0**-24 * want.abs() + 2.0**-149
    assert ((silu.double() - want).abs() <= bound)[normal].all()
    assert (silu[gate < -87] == 0).all() and (want[gate < -87].abs() < 2e-36).all()
    gated = cpu_layers.silu_gate(gate, up)
    assert gated is not None and torch.equal(gated, silu * up)
    special = torch.tensor([float("-inf"), float("inf"), float("nan"), -0.0])
    got = cpu_layers.silu_gate(special)
    assert got is not None
    want_special = torch.nn.functional.silu(special)  # nan, inf, nan, -0 as torch gives them
    assert torch.equal(got.isnan(), want_special.isnan())
    assert torch.equal(got[~got.isnan()], want_special[~want_special.isnan()])


@pytest.mark.parametrize("head_dim", [2, 16, 64, 130])
@pytest.mark.parametrize("tokens", [1, 16, 300])
def test_rotate_has_the_bits_of_torch_operators(head_dim: int, tokens: int) -> None:
    """The native rotary embedding equals ``x * cos + x.roll(D / 2) * signed_sin`` as torch
    computes it, to the last bit, for heads cut from wider rows (the joint q/k/v output)."""
    gen = torch.Generator().manual_seed(head_dim + tokens)
    wide = torch.randn(tokens, 7 * head_dim, generator=gen)
    x = wide[:, : 5 * head_dim].view(tokens, 5, head_dim)
    cos = torch.randn(tokens, 1, head_dim, generator=gen)
    signed_sin = torch.randn(tokens, 1, head_dim, generator=gen)
    got = cpu_layers.rotate(x, cos, signed_sin)
    half = head_dim // 2
    want = torch.mul(x, cos).add_(x.roll(half, dims=-1).mul_(signed_sin))
    assert got is not None and torch.equal(got, want)
    assert torch.equal(_rotate(x, cos, signed_sin), want)
    assert cpu_layers.rotate(x.bfloat16(), cos, signed_sin) is None  # tables of another dtype


@pytest.mark.parametrize("head_dim", [2, 16, 64, 130])
@pytest.mark.parametrize("tokens", [1, 16, 300])
def test_bfloat16_rotate_has_the_bits_of_torch_operators(head_dim: int, tokens: int) -> None:
    """In bfloat16 torch rounds each product to bfloat16 and their float32 sum again; the
    kernel's result equals those operators' to the last bit."""
    gen = torch.Generator().manual_seed(head_dim + tokens)
    wide = (torch.randn(tokens, 7 * head_dim, generator=gen) * 50).to(BF16)
    x = wide[:, : 5 * head_dim].view(tokens, 5, head_dim)
    cos = torch.randn(tokens, 1, head_dim, generator=gen).to(BF16)
    signed_sin = torch.randn(tokens, 1, head_dim, generator=gen).to(BF16)
    got = cpu_layers.rotate(x, cos, signed_sin)
    want = torch.mul(x, cos).add_(x.roll(head_dim // 2, dims=-1).mul_(signed_sin))
    assert got is not None and got.dtype == BF16 and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_copies_rows_to_slots_and_zeroes_tokens_that_are_not_finite(dtype) -> None:
    """Rows land at their slots exactly, other slots untouched; a token with an inf or a NaN
    in any head of its key or value is written as zeros in both and flagged, as torch's
    path (``masked_fill`` then ``index_copy_``) writes it."""
    gen = torch.Generator().manual_seed(3)
    heads, tokens, d, slots_n = 3, 6, 16, 40
    key = torch.randn(tokens, heads, d, generator=gen).to(dtype).transpose(0, 1)
    value = torch.randn(tokens, 2 * heads, d, generator=gen).to(dtype)[:, 1::2].transpose(0, 1)
    key[2, 1, 5] = float("inf")  # token 1, third head, key
    value[0, 4, 0] = float("nan")  # token 4, first head, value
    slots = torch.tensor([7, 0, 39, 12, 13, 25])
    k_cache = torch.full((heads, slots_n, d), 9.0, dtype=dtype)
    v_cache = k_cache.clone()
    nonfinite = torch.tensor([False, False, False, True, False, False])
    assert cpu_layers.write_kv(key, value, k_cache, v_cache, slots, nonfinite)
    assert nonfinite.tolist() == [False, True, False, True, True, False]
    bad = torch.tensor([False, True, False, False, True, False])
    want_k = torch.full_like(k_cache, 9.0)
    want_v = want_k.clone()
    want_k.index_copy_(1, slots, key.masked_fill(bad[None, :, None], 0.0))
    want_v.index_copy_(1, slots, value.masked_fill(bad[None, :, None], 0.0))
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_write_kv_refuses_what_it_cannot_take() -> None:
    key = torch.randn(2, 3, 8)
    cache = torch.zeros(2, 10, 8)
    flags = torch.zeros(3, dtype=torch.bool)
    slots = torch.tensor([1, 2, 3])
    assert not cpu_layers.write_kv(key.half(), key.half(), cache, cache.clone(), slots, flags)
    assert not cpu_layers.write_kv(key, key, cache, cache.clone(), slots.int(), flags)
    assert not cpu_layers.write_kv(key, key, cache[:, :, :4], cache.clone(), slots, flags)
    assert not cpu_layers.write_kv(key, key, cache[:1], cache[:1].clone(), slots, flags)
    with pytest.raises(IndexError, match="out of range"):
        cpu_layers.write_kv(key, key, cache, cache, torch.tensor([1, 10, 2]), flags)
    assert torch.equal(cache, torch.zeros(2, 10, 8))  # nothing written


def test_route_layers_takes_float32_and_bfloat16_norms_and_silu() -> None:
    model = tiny_llama()
    layer = model.model.layers[0]
    x = torch.randn(3, 32)
    with torch.no_grad():
        before = layer.input_layernorm(x)
        assert cpu_layers.route_layers(model) == 4  # two norms, the activation, the final norm
        torch.testing.assert_close(layer.input_layernorm(x), before, rtol=2e-6, atol=1e-7)
    assert layer.input_layernorm._ps_layer and layer.mlp.act_fn._ps_layer
    bf16 = tiny_llama(BF16)
    norm, act = bf16.model.layers[0].input_layernorm, bf16.model.layers[0].mlp.act_fn
    h = torch.randn(3, 32).to(BF16)
    with torch.no_grad():
        norm_before, act_before = norm(h), act(h)
        assert cpu_layers.route_layers(bf16) == 4
        assert norm._ps_layer and act._ps_layer
        assert torch.allclose(norm(h).float(), norm_before.float(), rtol=2.0**-6, atol=0)
        assert torch.allclose(act(h).float(), act_before.float(), rtol=2.0**-7, atol=0)
    assert cpu_layers.route_layers(tiny_llama(torch.float16)) == 0


def test_a_module_computing_something_else_is_not_routed() -> None:
    """A norm class of the known name whose forward computes something else (a new
    transformers version's, say) keeps its forward: the one-time check refuses it."""

    class LlamaRMSNorm(torch.nn.Module):  # noqa: N801 (the name is what the router looks for)
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(16))
            self.variance_epsilon = 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight  # no normalisation

    holder = torch.nn.Module()
    holder.norm = LlamaRMSNorm()
    assert cpu_layers.route_layers(holder) == 0
    assert not hasattr(holder.norm, "_ps_layer")


def test_without_the_kernels_the_decoder_keeps_torch_operators(monkeypatch) -> None:
    """With the kernels off (``PREFIX_SERVE_NATIVE=0``; likewise without a compiler) nothing is
    routed and the decoder loop's norms, rotation and gate are torch's operators, equal to
    the modules' own forwards; the cache write declines, leaving it to torch's path."""
    native.load.cache_clear()
    monkeypatch.setenv("PREFIX_SERVE_NATIVE", "0")
    try:
        assert native.load().lib is None
        model = tiny_llama()
        assert cpu_layers.route_layers(model) == 0
        layer = model.model.layers[0]
        gen = torch.Generator().manual_seed(4)
        x = torch.randn(5, 2, 16, generator=gen)
        cos, signed_sin = torch.randn(2, 5, 1, 16, generator=gen)
        assert cpu_layers.rotate(x, cos, signed_sin) is None
        want = torch.mul(x, cos).add_(x.roll(8, dims=-1).mul_(signed_sin))
        assert torch.equal(decoder._rotate(x, cos, signed_sin), want)
        h = torch.randn(3, 32, generator=gen)
        with torch.no_grad():
            mlp = layer.mlp
            gated = mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)
            assert torch.equal(decoder._gated(mlp, h), gated)
            assert torch.equal(decoder._rms_norm(h, model.model.norm), model.model.norm(h))
        cache = torch.zeros(2, 10, 16)
        k = torch.randn(2, 3, 16, generator=gen)
        flags = torch.zeros(3, dtype=torch.bool)
        assert not cpu_layers.write_kv(k, k, cache, cache.clone(), torch.tensor([1, 2, 3]), flags)
    finally:
        native.load.cache_clear()
