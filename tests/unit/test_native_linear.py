"""The native float32 linear product (``engine/linear.c``, routed by ``cpu_kernels``) against
exact and float64 products, and its routing's refusals.

The kernel packs the weight into panels of 32 output columns (the last padded with zeros),
takes rows in register tiles of 8 and in blocks of at most 256 (split evenly), and sums each
output over blocks of 64 terms; the shapes below cross each of those edges (row counts around 8
and 256, column counts that are not a multiple of 32, inner sizes that are not a multiple of
64, a bias, inputs whose rows are not contiguous).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_native_attention import tiny_llama

from server.engine import cpu_kernels, native
from server.engine.cpu_kernels import route_linears

ROWS = [1, 3, 7, 8, 9, 16, 64, 255, 256, 257, 600]
SHAPES = [(40, 48), (300, 96), (33, 100), (64, 1), (576, 576)]  # (out, in)


@pytest.fixture
def fresh_loader():
    """``native.load`` forgets its result before and after the test (it caches it)."""
    native.load.cache_clear()
    yield
    native.load.cache_clear()


def route(layer: torch.nn.Linear) -> torch.nn.Linear:
    """``layer`` routed to the native product (its weight packed as it is now)."""
    holder = torch.nn.Module()
    holder.layer = layer
    assert route_linears(holder, "native") == 1
    assert hasattr(layer, "_ps_native")
    return layer


def routed(out_features: int, in_features: int, bias: bool, seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return route(torch.nn.Linear(in_features, out_features, bias=bias))


def error_bound(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """A bound on a float32 sum in blocks of 64 terms (each block's sum started fresh, the
    blocks' sums then added in order), then the bias: at most 64 + ceil(K/64) + 1 roundings
    stand between any partial sum and the output, each of at most 2**-24 relative to the sum
    of the terms' magnitudes."""
    k = layer.in_features
    steps = 64 + math.ceil(k / 64) + 1
    magnitude = x.double().abs() @ layer.weight.double().abs().T
    if layer.bias is not None:
        magnitude += layer.bias.double().abs()
    return steps * 2.0**-24 * magnitude + 1e-30


def exact(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    want = x.double() @ layer.weight.double().T
    if layer.bias is not None:
        want += layer.bias.double()
    return want


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_product_within_the_float32_bound(rows: int, out_features: int, in_features: int):
    layer = routed(out_features, in_features, bias=True, seed=rows)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        got = layer(x)
    assert got.shape == (rows, out_features) and got.dtype == torch.float32
    err = (got.double() - exact(x, layer)).abs()
    assert bool((err <= error_bound(x, layer)).all()), float(err.max())


# 312, 621 and 1,235 rows: the rows split evenly over the fewest blocks of at most 256, in whole
# tiles (with AVX2's 6-row tiles: 2 x 156, 210 + 210 + 201, 4 x 252 + 227; with AVX-512's 8-row
# tiles: 160 + 152, 208 + 208 + 205, 4 x 248 + 243).
@pytest.mark.parametrize("rows", [1, 9, 16, 40, 257, 312, 621, 1235])
def test_integer_products_are_exact(rows: int) -> None:
    """Small integers multiply and add exactly in float32 (every partial sum stays below
    2**24), so the product must equal the integer product to the last bit, whatever order
    the kernel adds in: a dropped, repeated or misplaced term cannot hide in rounding."""
    gen = torch.Generator().manual_seed(rows)
    layer = torch.nn.Linear(130, 70)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-8, 9, (70, 130), generator=gen).float())
        layer.bias.copy_(torch.randint(-100, 101, (70,), generator=gen).float())
    route(layer)
    x = torch.randint(-8, 9, (rows, 130), generator=gen).float()
    want = (x.long() @ layer.weight.long().T + layer.bias.long()).float()
    with torch.no_grad():
        assert torch.equal(layer(x), want)


def test_no_rows_writes_nothing() -> None:
    """The kernel called directly with no rows (the Python wrapper never asks for that) returns
    without touching its output: the row blocks are counted from the rows."""
    weight = torch.randn(40, 48, generator=torch.Generator().manual_seed(0))
    packed = cpu_kernels._pack_panels(weight, native.load().panel_width)
    x, y = torch.ones(1, 48), torch.full((1, 40), 7.0)
    job = native.LinearJob(packed=packed.data_ptr(), n=40, y_stride=40, k=48, threads=2)
    job.x, job.x_stride, job.y, job.m = x.data_ptr(), 48, y.data_ptr(), 0
    native.linear_runner(job)()
    assert torch.equal(y, torch.full((1, 40), 7.0))
    job.m = 1  # the same job with its row: the product
    native.linear_runner(job)()
    assert torch.allclose(y.double(), x.double() @ weight.double().T, rtol=1e-5, atol=1e-5)


def test_inputs_of_any_layout_and_batch_shape() -> None:
    """Rows a stride apart (a slice of a wider tensor) are read in place; a leading batch
    shape is kept; an input whose last dimension is not contiguous takes the layer's own
    forward. Each gives the product within the bound."""
    layer = routed(50, 64, bias=False, seed=1)
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(20, 100, generator=gen)
    sliced = wide[:, 10:74]
    assert sliced.stride() == (100, 1)
    transposed = torch.randn(64, 12, generator=gen).T
    batched = torch.randn(2, 3, 64, generator=gen)
    with torch.no_grad():
        for x in (sliced, transposed, batched):
            got = layer(x)
            assert got.shape == (*x.shape[:-1], 50)
            flat = x.reshape(-1, 64)
            err = (got.reshape(-1, 50).double() - exact(flat, layer)).abs()
            assert bool((err <= error_bound(flat, layer)).all())
        assert layer(torch.empty(0, 64)).shape == (0, 50)


def test_same_bits_whatever_the_thread_count() -> None:
    """Each output is summed by one task in a fixed order, so the threads torch runs with
    change which task computes it, never its value."""
    layer = routed(300, 96, bias=True, seed=2)
    x = torch.randn(300, 96, generator=torch.Generator().manual_seed(2))
    one, many = on_one_and_many_threads(layer, x)
    assert torch.equal(one, many)


def on_one_and_many_threads(
    layer: torch.nn.Linear, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer(x)`` with torch on one thread, then on at least two."""
    threads = torch.get_num_threads()
    with torch.no_grad():
        try:
            torch.set_num_threads(1)
            one = layer(x)
            torch.set_num_threads(max(2, threads))
            many = layer(x)
        finally:
            torch.set_num_threads(threads)
    return one, many


def test_auto_routes_float32_and_bfloat16_to_native_where_they_run() -> None:
    """Float32: every layer. Bfloat16: every layer unless oneDNN serves it better here (a CPU
    with AMX tiles, or one without AVX512-BF16 where oneDNN has a bfloat16 product).
    ``native`` asks for it on any CPU."""
    model = tiny_llama()
    assert route_linears(model, "auto") == 8  # seven projections and the LM head
    assert all(hasattr(m, "_ps_native") for m in model.modules() if type(m) is torch.nn.Linear)
    kernel = native.load()
    assert kernel.bf16_linear
    bf16 = tiny_llama(torch.bfloat16)
    route_linears(bf16, "auto")
    onednn = cpu_kernels.onednn_available(torch.bfloat16)
    native_here = not native.has_matrix_unit() and not (kernel.bf16_widens and onednn)
    routed = [hasattr(m, "_ps_native") for m in bf16.modules() if type(m) is torch.nn.Linear]
    assert routed == [native_here] * 8
    assert route_linears(tiny_llama(torch.bfloat16), "native") == 8
    with pytest.raises(ValueError, match="linear backend 'native': .*float32 or bfloat16"):
        route_linears(tiny_llama(torch.float16), "native")


def test_without_the_kernels_auto_keeps_the_blas_routes(fresh_loader, monkeypatch) -> None:
    monkeypatch.setenv("PREFIX_SERVE_NATIVE", "0")
    model = tiny_llama()
    route_linears(model, "auto")
    assert not any(hasattr(m, "_ps_native") for m in model.modules())
    assert hasattr(model.lm_head, "_ps_packed") == cpu_kernels.mkl_packing_available()
    with pytest.raises(ValueError, match="not available: turned off by PREFIX_SERVE_NATIVE=0"):
        route_linears(tiny_llama(), "native")


def route_bf16(layer: torch.nn.Linear) -> None:
    """Route a bfloat16 layer to the native product (``native`` asks for it on any CPU: every
    build has one, multiplying bfloat16 pairs with AVX512-BF16 and widening to float32
    without)."""
    kernel = native.load()
    assert kernel.bf16_linear
    if "avx512_bf16" not in native._cpu_flags().split():
        assert kernel.bf16_widens  # -march=native: no pair instruction without the CPU's
    holder = torch.nn.Module()
    holder.layer = layer
    assert route_linears(holder, "native") == 1


def routed_bf16(out_features: int, in_features: int, bias: bool, seed: int) -> torch.nn.Linear:
    """A bfloat16 layer routed to the native product."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)
    route_bf16(layer)
    return layer


# Without AVX512-BF16, calls of 32 rows or more widen the inputs and panels once and run the
# float32 tiles, fewer widen each pair as they go: row counts on both sides.
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 16, 31, 32, 64, 300])
@pytest.mark.parametrize(("out_features", "in_features"), [*SHAPES, (70, 33)])
def test_bfloat16_product_within_half_a_step(rows: int, out_features: int, in_features: int):
    """Float32 sums of exact pair products, one rounding to bfloat16: each output lies within
    half a bfloat16 step (2**-8 relative) of the float32 sum, which lies within K + 1
    float32 roundings of the float64 product of the same inputs."""
    layer = routed_bf16(out_features, in_features, bias=True, seed=rows)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        got = layer(x)
    assert got.shape == (rows, out_features) and got.dtype == torch.bfloat16
    want = exact(x, layer)
    magnitude = x.double().abs() @ layer.weight.double().abs().T + layer.bias.double().abs()
    summed = (in_features + 2) * 2.0**-24 * magnitude
    err = (got.double() - want).abs()
    assert bool((err <= 2.0**-8 * (want.abs() + summed) + summed + 1e-30).all())


@pytest.mark.parametrize(("rows", "in_features"), [(1, 64), (9, 33), (40, 33), (64, 130)])
def test_bfloat16_integer_products_are_exact(rows: int, in_features: int) -> None:
    """Products and sums of small integers are exact in float32 and the results (below 256)
    exact in bfloat16: a dropped, repeated or misplaced pair, or the odd input's padding read
    as a value, changes the output. The 65-row call takes the layer's own forward where oneDNN
    has a bfloat16 product, and the native product's once-widened path where it has none (AVX2
    CPUs)."""
    gen = torch.Generator().manual_seed(rows)
    layer = torch.nn.Linear(in_features, 45).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-1, 2, (45, in_features), generator=gen))
        layer.bias.copy_(torch.randint(-100, 101, (45,), generator=gen))
    route_bf16(layer)
    x = torch.randint(-1, 2, (rows, in_features), generator=gen).to(torch.bfloat16)
    want = x.long() @ layer.weight.long().T + layer.bias.long()
    assert int(want.abs().max()) < 256
    with torch.no_grad():
        assert torch.equal(layer(x), want.to(torch.bfloat16))
        big = torch.randint(-1, 2, (65, in_features), generator=gen).to(torch.bfloat16)
        assert torch.equal(layer(big), torch.nn.functional.linear(big, layer.weight, layer.bias))


def test_bfloat16_rows_a_stride_apart_and_any_thread_count() -> None:
    """Rows of a slice are read in place, and the threads torch runs with never change a bit."""
    layer = routed_bf16(300, 96, bias=False, seed=3)
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(40, 130, generator=gen).to(torch.bfloat16)
    sliced = wide[:, 20:116]
    assert sliced.stride() == (130, 1)
    with torch.no_grad():
        contiguous = layer(sliced.contiguous())
    one, many = on_one_and_many_threads(layer, sliced)
    assert torch.equal(one, contiguous) and torch.equal(many, contiguous)


@pytest.mark.parametrize(("out_features", "in_features"), [(300, 96), (70, 33), (576, 1536)])
def test_bfloat16_rows_have_the_same_bits_in_calls_of_any_size(out_features, in_features):
    """A row's output does not depend on the rows it is multiplied with: a 300-row call equals,
    bit for bit, the same rows in calls of 1 to 37 rows (without AVX512-BF16, calls on both
    sides of the 32 rows where the product switches to widening once per call)."""
    layer = routed_bf16(out_features, in_features, bias=True, seed=in_features)
    x = torch.randn(300, in_features, generator=torch.Generator().manual_seed(4))
    x = (x * 4).to(torch.bfloat16)
    with torch.no_grad():
        whole = layer(x)
        for size in (1, 16, 31, 32, 37):
            parts = torch.cat([layer(x[i : i + size]) for i in range(0, 300, size)])
            assert torch.equal(parts, whole), size


def test_panel_width_follows_the_cpus_vectors() -> None:
    """The float32 tile is sized for the CPU's registers: 2 vectors of 16 floats with AVX-512,
    of 8 with AVX2 only (a 16-float vector split in two spilled an 8-row tile's sums to memory
    and ran 6-30x slower than MKL on an AVX2 EPYC)."""
    kernel = native.load()
    assert kernel.lib is not None, kernel.reason
    wide = "avx512f" in native._cpu_flags().split()
    assert kernel.panel_width == (32 if wide else 16)


class Projections(torch.nn.Module):
    """An attention block's three projections of one input, as a Llama-family layer names
    them (biases as Qwen2's)."""

    def __init__(self, widths: tuple[int, int, int], hidden: int, bias: bool, dtype) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (
            torch.nn.Linear(hidden, width, bias=bias).to(dtype) for width in widths
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 16, 300])
def test_joint_product_has_the_bits_of_each_projection_alone(dtype, bias, rows) -> None:
    """One call of the joint q/k/v product gives, side by side, exactly the outputs of the three
    layers each routed alone (the native product sums every output column on its own), and
    each layer's own calls, now against its slice of the joint packing, give them too. Those
    outputs are themselves within the float32 bound of the float64 product."""
    width = native.load().panel_width
    torch.manual_seed(rows)
    hidden = 3 * width + 5  # inner size not a multiple of the 64-term blocks
    joint = Projections((4 * width, 2 * width, 2 * width), hidden, bias, dtype)
    alone = Projections((4 * width, 2 * width, 2 * width), hidden, bias, dtype)
    alone.load_state_dict(joint.state_dict())
    route_linears(joint, "native")
    for layer in (alone.q_proj, alone.k_proj, alone.v_proj):
        holder = torch.nn.Module()
        holder.layer = layer
        route_linears(holder, "native")
    assert hasattr(joint, "_ps_qkv") and not hasattr(alone, "_ps_qkv")
    x = torch.randn(rows, hidden).to(dtype)
    want = [alone.q_proj(x), alone.k_proj(x), alone.v_proj(x)]
    assert torch.equal(joint._ps_qkv(x), torch.cat(want, dim=1))
    assert torch.equal(joint.q_proj(x), want[0])
    assert torch.equal(joint.k_proj(x), want[1])
    assert torch.equal(joint.v_proj(x), want[2])
    if dtype == torch.float32:
        got = joint._ps_qkv(x).double()
        layers = (joint.q_proj, joint.k_proj, joint.v_proj)
        reference = torch.cat([exact(x, layer) for layer in layers], dim=1)
        bound = torch.cat([error_bound(x, layer) for layer in layers], dim=1)
        assert ((got - reference).abs() <= bound).all()


def test_projections_that_do_not_fit_one_packing_are_routed_alone() -> None:
    """An output width that is not whole panels, or a bias on some of the three only: no joint
    product, each layer routed to the native product by itself."""
    width = native.load().panel_width
    odd = Projections((2 * width, width + 3, width), 2 * width, False, torch.float32)
    mixed = Projections((width, width, width), 2 * width, False, torch.float32)
    mixed.k_proj = torch.nn.Linear(2 * width, width, bias=True)
    for block in (odd, mixed):
        assert route_linears(block, "native") == 3
        assert not hasattr(block, "_ps_qkv")
        assert all(hasattr(m, "_ps_native") for m in (block.q_proj, block.k_proj, block.v_proj))
        x = torch.randn(5, 2 * width)
        for layer in (block.q_proj, block.k_proj, block.v_proj):
            assert ((layer(x).double() - exact(x, layer)).abs() <= error_bound(x, layer)).all()
