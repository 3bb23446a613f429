"""The native paged attention kernel (``engine/paged_attention.c``) against the torch reference
backend, and its loader's refusals.

The kernel reads keys and values through each unit's slot list, in blocks of 64 keys, with
head dimensions padded to a multiple of 64 in its own buffers; these cases cross every one of
those edges: widths that are not a multiple of 64, causal masks that hide whole blocks from a
row, padding queries, masks shared by a unit's queries, head dimensions of 8, 40, 64 and 128.
The reference is ``attend`` (plain torch products) on the gathered keys in float64.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from server.engine import native
from server.engine.attention import _attend_native, _attend_padded
from server.engine.attention_metadata import PaddedBatch
from server.engine.model_runner import ModelRunner


@pytest.fixture
def fresh_loader():
    """``native.load`` forgets its result before and after the test (it caches it)."""
    native.load.cache_clear()
    yield
    native.load.cache_clear()


def padded_batch(
    gen: np.random.Generator, units: int, q_len: int, width: int, num_slots: int, causal: bool
) -> tuple[PaddedBatch, int]:
    """``units`` units of ``q_len`` queries over ``width`` keys each, keys in whole blocks of
    16 slots scattered over the cache; the last padded query is padding. Causal: query j sees
    keys up to ``width - q_len + j``; else every query sees a random 70% of the keys (and its
    first). Returns the batch and its number of flat rows."""
    blocks = -(-width // 16)
    slots = np.stack(
        [
            (gen.permutation(num_slots // 16)[:blocks, None] * 16 + np.arange(16)).ravel()[:width]
            for _ in range(units)
        ]
    )
    if causal:
        last = width - q_len + np.arange(q_len)
        hidden = np.arange(width)[None, None, :] > last[None, :, None]
        hidden = np.broadcast_to(hidden, (units, q_len, width)).copy()
    else:
        hidden = gen.random((units, q_len, width)) > 0.7
        hidden[:, :, 0] = False
    rows = units * q_len
    order = gen.permutation(rows)  # queries' flat rows, out of unit order
    return (
        PaddedBatch(
            q_len=q_len,
            q_index=torch.from_numpy(order),
            valid=torch.arange(rows - 1),
            rows=torch.from_numpy(order[: rows - 1]),
            slots=torch.from_numpy(slots),
            hidden=torch.from_numpy(hidden),
        ),
        rows,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("units", "q_len", "width", "causal", "head_dim"),
    [
        (4, 4, 150, False, 64),  # decode units: 3 blocks, the last partial
        (5, 1, 200, False, 64),  # one query a unit: one tile, float32 values read in place
        (3, 37, 100, True, 64),  # prefill: causal rows that see no key of the last block
        (2, 5, 64, False, 8),  # tiny heads: padded to 64
        (2, 3, 70, True, 40),
        (2, 2, 129, False, 128),  # two vectors of four per sum
        (3, 7, 333, False, 96),  # bfloat16 pairs with padded dimensions, an odd last block
    ],
)
def test_kernel_equals_reference(dtype, units, q_len, width, causal, head_dim) -> None:
    gen = np.random.default_rng(units * 1000 + width)
    hq, hkv, num_slots = 6, 2, 512
    pb, rows = padded_batch(gen, units, q_len, width, num_slots, causal)
    torch.manual_seed(width)
    k_cache = torch.randn(hkv, num_slots, head_dim).to(dtype)
    v_cache = torch.randn(hkv, num_slots, head_dim).to(dtype)
    q = torch.randn(rows, hq, head_dim).to(dtype).transpose(0, 1)  # [Hq, T, D], rows strided
    scale = head_dim**-0.5
    want, want_lse = _attend_padded(q.double(), k_cache.double(), v_cache.double(), pb, scale)
    out = torch.full_like(q, 7.0)
    lse = torch.full((hq, rows), 7.0)
    _attend_native(q, k_cache, v_cache, pb, scale, out, lse)
    got, got_lse = out.index_select(1, pb.rows).double(), lse.index_select(1, pb.rows).double()
    if dtype == torch.float32:
        assert (got - want).abs().max().item() < 2e-6
    else:
        # Bfloat16 rounds the output, and (where the CPU multiplies bfloat16 pairs) each
        # probability before the weighted sum: at most half a step (2^-8 of the value) each,
        # so at most 2^-8 of |out| plus 2^-8 of the weighted sum of |v|, whose reference is
        # the same attention over |v|. Float32 arithmetic adds far less than the 1e-5 slack.
        spread, _ = _attend_padded(q.double(), k_cache.double(), v_cache.double().abs(), pb, scale)
        bound = 2.0**-8 * (want.abs() + spread) + 1e-5
        assert bool(((got - want).abs() <= bound).all())
    assert (got_lse - want_lse).abs().max().item() < 2e-6
    # The padding query's row is left as it was: the kernel writes real queries only.
    padding = int(pb.q_index[-1])
    assert bool((out[:, padding] == 7.0).all()) and bool((lse[:, padding] == 7.0).all())


def test_query_that_sees_no_key_gets_zeros_and_other_rows_are_untouched_by_nan() -> None:
    """A row with every key hidden: zeros and a log-sum-exp of -inf (torch's kernels give
    NaN). A NaN query gives NaN in its own row only."""
    gen = np.random.default_rng(5)
    pb, rows = padded_batch(gen, 2, 3, 40, 128, False)
    pb.hidden[0, 1, :] = True
    q = torch.randn(6, rows, 16)
    q[:, int(pb.q_index[3])] = float("nan")  # unit 1's first query
    k_cache, v_cache = torch.randn(2, 128, 16), torch.randn(2, 128, 16)
    out, lse = torch.zeros_like(q), torch.zeros(6, rows)
    _attend_native(q, k_cache, v_cache, pb, 0.25, out, lse)
    blind, poisoned = int(pb.q_index[1]), int(pb.q_index[3])
    assert bool((out[:, blind] == 0).all()) and bool((lse[:, blind] == float("-inf")).all())
    assert bool(out[:, poisoned].isnan().all())
    others = [int(r) for r in pb.rows if int(r) not in (blind, poisoned)]
    assert bool(out[:, others].isfinite().all())
    want, _ = _attend_padded(q, k_cache, v_cache, pb, 0.25)
    keep = [i for i, r in enumerate(pb.rows.tolist()) if r in others]
    assert (out[:, others] - want[:, keep]).abs().max().item() < 2e-6


def test_shapes_the_kernel_does_not_take_are_refused_before_any_read() -> None:
    pb, rows = padded_batch(np.random.default_rng(1), 1, 2, 16, 64, False)
    out = torch.zeros(4, rows, 512)
    with pytest.raises(ValueError, match="head dimension 512 \\(at most 256\\)"):
        _attend_native(torch.zeros(4, rows, 512), *torch.zeros(2, 2, 64, 512), pb, 1.0, out)
    assert bool((out == 0).all())
    pb, rows = padded_batch(np.random.default_rng(1), 1, 2, 16, 64, False)
    with pytest.raises(ValueError, match="5 query heads over 2 kv heads"):
        _attend_native(torch.zeros(5, rows, 8), *torch.zeros(2, 2, 64, 8), pb, 1.0, out)


def tiny_llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def test_auto_picks_native_where_it_builds() -> None:
    """ "auto": the kernel wherever it builds (AVX-512 and AVX2 builds alike: each ran W1's
    attention faster than torch's fused kernel), for float32 and bfloat16; torch's fused
    kernel for other dtypes. "native" refuses what the kernel cannot take."""
    runner = ModelRunner(tiny_llama(), num_blocks=4, block_size=4)
    assert native.load().lib is not None, native.load().reason
    assert runner.attention_backend == "native"
    bf16 = ModelRunner(tiny_llama(torch.bfloat16), num_blocks=4, block_size=4)
    assert bf16.attention_backend == "native"
    forced = ModelRunner(tiny_llama(), num_blocks=4, block_size=4, attention_backend="native")
    assert forced.attention_backend == "native"
    half = ModelRunner(tiny_llama(torch.float16), num_blocks=4, block_size=4)
    assert half.attention_backend == "fused"  # the kernel takes float32 and bfloat16 only
    with pytest.raises(ValueError, match="float32 or bfloat16, not torch.float16"):
        ModelRunner(tiny_llama(torch.float16), 4, 4, attention_backend="native")
    with pytest.raises(ValueError, match="expected one of"):
        ModelRunner(tiny_llama(), 4, 4, attention_backend="flash")


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"PREFIX_SERVE_NATIVE": "0"}, "turned off by PREFIX_SERVE_NATIVE=0"),
        ({"CC": "no-such-compiler-here"}, "no C compiler (no-such-compiler-here) on PATH"),
        ({"CC": "false"}, "failed"),
    ],
)
def test_without_the_kernel_auto_falls_back_and_native_says_why(
    fresh_loader, monkeypatch, tmp_path, env, reason
) -> None:
    monkeypatch.setenv("PREFIX_SERVE_CACHE", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert native.load().lib is None
    assert reason in native.load().reason
    assert ModelRunner(tiny_llama(), 4, 4).attention_backend == "fused"
    with pytest.raises(ValueError, match="attention backend 'native': .*not available"):
        ModelRunner(tiny_llama(), 4, 4, attention_backend="native")
    assert list(tmp_path.iterdir()) == []  # a failed build leaves no file behind


def test_build_is_cached_and_a_library_others_can_write_is_refused(
    fresh_loader, monkeypatch, tmp_path
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PREFIX_SERVE_CACHE", str(cache))
    assert native.load().lib is not None
    (built,) = cache.iterdir()
    assert built.name.startswith("kernels-") and built.suffix == ".so"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    first = built.stat().st_mtime_ns
    native.load.cache_clear()
    assert native.load().lib is not None and built.stat().st_mtime_ns == first  # not rebuilt
    os.chmod(built, built.stat().st_mode | stat.S_IWOTH)
    native.load.cache_clear()
    assert native.load().reason == f"{built} is writable by other users"
    os.chmod(built, built.stat().st_mode & ~stat.S_IWOTH)
    os.chmod(cache, 0o777)  # anyone could have swapped the file in
    native.load.cache_clear()
    assert native.load().reason == f"{cache} is writable by other users"
    assert ModelRunner(tiny_llama(), 4, 4).attention_backend == "fused"
