"""The engine's Triton kernels, in one module so that triton is imported only when a GPU
decode step first needs them (``triton_attention`` and ``triton_layers`` say what each
computes, and launch them)."""

# ruff: noqa
import triton
import triton.language as tl


@triton.jit
def attend_range(
    q,
    k_base,
    v_base,
    table_ptr,
    start,
    end,
    cache_slot_stride,
    scale,
    dims,
    dim_ok,
    ROWS: tl.constexpr,
    D_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Keys ``start..end`` of one block table for the query rows ``q [ROWS, D_PAD]``:
    the running maximum, total and weighted sum (flash-attention's recurrence)."""
    top = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    total = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, D_PAD], dtype=tl.float32)
    for first in range(start, end, BLOCK_N):
        pos = first + tl.arange(0, BLOCK_N)
        valid = pos < end
        page = tl.load(table_ptr + pos // PAGE, mask=valid, other=0)
        slot = page.to(tl.int64) * PAGE + pos % PAGE
        offs = slot[:, None] * cache_slot_stride + dims[None, :]
        kv_ok = valid[:, None] & dim_ok[None, :]
        k = tl.load(k_base + offs, mask=kv_ok, other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(valid[None, :], scores * scale, float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, 1))
        alpha = tl.exp(top - new_top)
        weights = tl.exp(scores - new_top[:, None])
        total = total * alpha + tl.sum(weights, 1)
        v = tl.load(v_base + offs, mask=kv_ok, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(weights, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(weights.to(v.dtype), v)
        top = new_top
    return top, total, acc


@triton.jit
def store_partial(
    part_ptr, lse_ptr, at, top, total, acc, row_ok, dims, dim_ok, D_PAD: tl.constexpr
):
    some = total > 0
    out = tl.where(some[:, None], acc / tl.where(some, total, 1.0)[:, None], 0.0)
    lse = tl.where(some, top + tl.log(tl.where(some, total, 1.0)), float("-inf"))
    tl.store(
        part_ptr + at[:, None] * D_PAD + dims[None, :],
        out,
        mask=row_ok[:, None] & dim_ok[None, :],
    )
    tl.store(lse_ptr + at, lse, mask=row_ok)


@triton.jit
def own_partial(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    lens_ptr,
    starts_ptr,
    part_ptr,
    lse_ptr,
    q_row_stride,
    q_head_stride,
    cache_head_stride,
    cache_slot_stride,
    table_stride,
    scale,
    q_heads,
    total_splits,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    HAS_STARTS: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Program (row b, kv head h, split s): the row's g query heads of h over split s of
    its own keys (from its start)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    n = tl.load(lens_ptr + b)
    first = 0
    if HAS_STARTS:
        first = tl.load(starts_ptr + b)
    per_split = tl.cdiv(tl.cdiv(n - first, SPLITS), BLOCK_N) * BLOCK_N
    start = first + s * per_split
    end = tl.minimum(start + per_split, n)
    rows = tl.arange(0, G_PAD)
    dims = tl.arange(0, D_PAD)
    heads = h * G + rows
    row_ok = rows < G
    dim_ok = dims < D
    q = tl.load(
        q_ptr + heads[:, None] * q_head_stride + b * q_row_stride + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    top, total, acc = attend_range(
        q,
        k_ptr + h.to(tl.int64) * cache_head_stride,
        v_ptr + h.to(tl.int64) * cache_head_stride,
        tables_ptr + b * table_stride,
        start,
        end,
        cache_slot_stride,
        scale,
        dims,
        dim_ok,
        G_PAD,
        D_PAD,
        PAGE,
        BLOCK_N,
        IEEE,
    )
    at = (b * q_heads + heads) * total_splits + s
    store_partial(part_ptr, lse_ptr, at, top, total, acc, row_ok, dims, dim_ok, D_PAD)


@triton.jit
def segment_partial(
    q_ptr,
    k_ptr,
    v_ptr,
    seg_tables_ptr,
    seg_lens_ptr,
    members_ptr,
    part_ptr,
    lse_ptr,
    q_row_stride,
    q_head_stride,
    cache_head_stride,
    cache_slot_stride,
    table_stride,
    members_stride,
    scale,
    q_heads,
    total_splits,
    split_offset,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    M_TILES: tl.constexpr,
    SPLITS: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Program (group tile, kv head h, split s): BLOCK_M member rows of one group, their
    g query heads of h as one [BLOCK_M * G_PAD, D] matrix, over split s of the group's
    segment: each key block is read once for all of them."""
    group = tl.program_id(0) // M_TILES
    tile = tl.program_id(0) % M_TILES
    h = tl.program_id(1)
    s = tl.program_id(2)
    n = tl.load(seg_lens_ptr + group)
    if n == 0:  # an unused group: most programs of a captured grid, done at once
        return
    lead = tile * BLOCK_M
    if (
        tl.load(members_ptr + group * members_stride + lead, mask=lead < members_stride, other=-1)
        < 0
    ):
        return  # members fill a group's row from the front: this tile has none
    per_split = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_N) * BLOCK_N
    start = s * per_split
    end = tl.minimum(start + per_split, n)
    r = tl.arange(0, BLOCK_M * G_PAD)
    m = tile * BLOCK_M + r // G_PAD
    member = tl.load(members_ptr + group * members_stride + m, mask=m < members_stride, other=-1)
    head = h * G + r % G_PAD
    row_ok = (member >= 0) & (r % G_PAD < G)
    row = tl.where(row_ok, member, 0)
    dims = tl.arange(0, D_PAD)
    dim_ok = dims < D
    q = tl.load(
        q_ptr + head[:, None] * q_head_stride + row[:, None] * q_row_stride + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    top, total, acc = attend_range(
        q,
        k_ptr + h.to(tl.int64) * cache_head_stride,
        v_ptr + h.to(tl.int64) * cache_head_stride,
        seg_tables_ptr + group * table_stride,
        start,
        end,
        cache_slot_stride,
        scale,
        dims,
        dim_ok,
        BLOCK_M * G_PAD,
        D_PAD,
        PAGE,
        BLOCK_N,
        IEEE,
    )
    at = (row * q_heads + head) * total_splits + split_offset + s
    store_partial(part_ptr, lse_ptr, at, top, total, acc, row_ok, dims, dim_ok, D_PAD)


@triton.jit
def merge(
    part_ptr,
    lse_ptr,
    out_ptr,
    out_row_stride,
    out_head_stride,
    q_heads,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    SPLITS: tl.constexpr,
):
    """Program (row b, query head): its splits merged by their log-sum-exps (a split
    that saw no key has -inf and weighs nothing)."""
    b = tl.program_id(0)
    hq = tl.program_id(1)
    splits = tl.arange(0, SPLITS)
    dims = tl.arange(0, D_PAD)
    at = (b * q_heads + hq) * SPLITS + splits
    lse = tl.load(lse_ptr + at)
    top = tl.max(lse, 0)  # finite: the first own split always holds a key
    weights = tl.exp(lse - top)
    parts = tl.load(part_ptr + at[:, None] * D_PAD + dims[None, :])
    parts = tl.where(weights[:, None] > 0, parts * weights[:, None], 0.0)
    out = tl.sum(parts, 0) / tl.sum(weights, 0)
    tl.store(
        out_ptr + b * out_row_stride + hq * out_head_stride + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < D,
    )


@triton.jit
def add_rms_norm(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    n,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=ok, other=0.0)
    if HAS_RES:
        x = x + tl.load(res_ptr + row * n + cols, mask=ok, other=0.0)
        tl.store(res_out_ptr + row * n + cols, x, mask=ok)
    h = x.to(tl.float32)
    h = h * tl.math.rsqrt(tl.sum(h * h, 0) / n + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    out = h.to(x.dtype) * w
    tl.store(out_ptr + row * n + cols, out, mask=ok)


@triton.jit
def rope_write(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_ptr,
    v_ptr,
    slots_ptr,
    flags_ptr,
    qkv_stride,
    cache_head_stride,
    Q_HEADS: tl.constexpr,
    KV_HEADS: tl.constexpr,
    D: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    Q_PAD: tl.constexpr,
    KV_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    d_ok = dims < HALF
    base = qkv_ptr + row * qkv_stride
    cos1 = tl.load(cos_ptr + row * D + dims, mask=d_ok, other=0.0)
    cos2 = tl.load(cos_ptr + row * D + HALF + dims, mask=d_ok, other=0.0)
    sin1 = tl.load(sin_ptr + row * D + dims, mask=d_ok, other=0.0)
    sin2 = tl.load(sin_ptr + row * D + HALF + dims, mask=d_ok, other=0.0)
    # Queries: [Q_PAD, HALF] halves; x * cos + rotate_half(x) * sin, rounded as torch's
    # three operators round (two products, then their sum).
    qh = tl.arange(0, Q_PAD)
    q_ok = (qh < Q_HEADS)[:, None] & d_ok[None, :]
    q1 = tl.load(base + qh[:, None] * D + dims[None, :], mask=q_ok, other=0.0)
    q2 = tl.load(base + qh[:, None] * D + HALF + dims[None, :], mask=q_ok, other=0.0)
    dt = q1.dtype
    o1 = (q1 * cos1[None, :]).to(dt) + (-q2 * sin1[None, :]).to(dt)
    o2 = (q2 * cos2[None, :]).to(dt) + (q1 * sin2[None, :]).to(dt)
    q_out = q_out_ptr + row * (Q_HEADS * D) + qh[:, None] * D + dims[None, :]
    tl.store(q_out, o1.to(dt), mask=q_ok)
    tl.store(q_out + HALF, o2.to(dt), mask=q_ok)
    # Keys (rotated) and values of every kv head: written to the row's slot, or zeros
    # with the row flagged when any of them is not finite.
    kh = tl.arange(0, KV_PAD)
    k_ok = (kh < KV_HEADS)[:, None] & d_ok[None, :]
    k_at = base + (Q_HEADS + kh[:, None]) * D + dims[None, :]
    v_at = base + (Q_HEADS + KV_HEADS + kh[:, None]) * D + dims[None, :]
    k1 = tl.load(k_at, mask=k_ok, other=0.0)
    k2 = tl.load(k_at + HALF, mask=k_ok, other=0.0)
    v1 = tl.load(v_at, mask=k_ok, other=0.0)
    v2 = tl.load(v_at + HALF, mask=k_ok, other=0.0)
    r1 = ((k1 * cos1[None, :]).to(dt) + (-k2 * sin1[None, :]).to(dt)).to(dt)
    r2 = ((k2 * cos2[None, :]).to(dt) + (k1 * sin2[None, :]).to(dt)).to(dt)
    finite = (r1 == r1) & (r2 == r2) & (v1 == v1) & (v2 == v2)
    finite = finite & (tl.abs(r1.to(tl.float32)) < float("inf"))
    finite = finite & (tl.abs(r2.to(tl.float32)) < float("inf"))
    finite = finite & (tl.abs(v1.to(tl.float32)) < float("inf"))
    finite = finite & (tl.abs(v2.to(tl.float32)) < float("inf"))
    bad = tl.sum(tl.sum(tl.where(finite | ~k_ok, 0, 1), 1), 0) > 0
    slot = tl.load(slots_ptr + row).to(tl.int64)
    cache = kh[:, None].to(tl.int64) * cache_head_stride + slot * D + dims[None, :]
    zero = tl.zeros([KV_PAD, HALF_PAD], dtype=dt)
    tl.store(k_ptr + cache, tl.where(bad, zero, r1), mask=k_ok)
    tl.store(k_ptr + cache + HALF, tl.where(bad, zero, r2), mask=k_ok)
    tl.store(v_ptr + cache, tl.where(bad, zero, v1), mask=k_ok)
    tl.store(v_ptr + cache + HALF, tl.where(bad, zero, v2), mask=k_ok)
    if bad:
        tl.store(flags_ptr + row, 1)


@triton.jit
def silu_mul(gu_ptr, out_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    gate = tl.load(gu_ptr + row * 2 * n + cols, mask=ok, other=0.0)
    up = tl.load(gu_ptr + row * 2 * n + n + cols, mask=ok, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * n + cols, act * up, mask=ok)


@triton.jit
def greedy_advance(
    logits_ptr,
    vocab,
    logits_stride,
    nonfinite_ptr,
    ids_ptr,
    flags_ptr,
    out_stride,
    step_ptr,
    window,
    tokens_ptr,
    positions_ptr,
    slots_ptr,
    lens_ptr,
    limits_ptr,
    tables_ptr,
    tables_stride,
    width,
    block_size,
    scratch_slot,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * logits_stride
    # Per lane: the largest value so far and its first index (blocks come in index order, a
    # later equal value does not replace it), and how many values were not finite.
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_at = tl.zeros([BLOCK], dtype=tl.int32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < vocab
        x = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32)
        bad += tl.where(ok & ((x != x) | (tl.abs(x) == float("inf"))), 1, 0)
        take = x > best
        best = tl.where(take, x, best)
        best_at = tl.where(take, cols, best_at)
    top = tl.max(best, 0)
    first = tl.min(tl.where(best == top, best_at, vocab), 0)
    token = tl.where(tl.sum(bad, 0) > 0, -1, first)
    step = tl.load(step_ptr)
    index = tl.minimum(step, window - 1)
    tl.store(ids_ptr + index * out_stride + row, token)
    tl.store(flags_ptr + index * out_stride + row, tl.load(nonfinite_ptr + row))
    # The row's next step: one position on while within its limit, else the scratch slot.
    active = (step + 1 < tl.load(limits_ptr + row)).to(tl.int32)
    pos = tl.load(positions_ptr + row) + active
    col = tl.minimum(pos // block_size, width - 1)
    block = tl.load(tables_ptr + row * tables_stride + col)
    slot = tl.where(active > 0, block * block_size + pos % block_size, scratch_slot)
    tl.store(slots_ptr + row, slot)
    tl.store(positions_ptr + row, pos)
    tl.store(lens_ptr + row, tl.load(lens_ptr + row) + active)
    tl.store(tokens_ptr + row, tl.maximum(token, 0))


@triton.jit
def bump_step(step_ptr, window):
    tl.store(step_ptr, tl.minimum(tl.load(step_ptr) + 1, window))
