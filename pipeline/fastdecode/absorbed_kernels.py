"""Triton kernels of the absorbed decode path (imported only where Triton is, by `absorbed_decode`).

Kept apart from their launchers so that the interpreter (TRITON_INTERPRET=1) sees every jitted
helper: it resolves them as module globals. Shapes, units and the reasons behind each kernel are
in `absorbed_decode`'s docstring; here, only what each loop does.
"""

from __future__ import annotations

import triton
import triton.language as tl

# A range is recomputed with its true maximum as offset when its scores stray further than this
# (log2 units) from the first tile's maximum: with 2^64 per term and at most 2^31 terms, the sums
# stay far below float32's 2^128.
MAX_DRIFT = tl.constexpr(64.0)


@triton.jit
def _tile_scores(q3, sel, phi_base, mask_base, s0, end, qk_scale, stride_ps, stride_ks, col, col_ok,
                 NC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr):
    """The tile of context rows s0.. (NC, BS, BE) and its scores (M, BS) in log2 units, -inf from
    `end` on and where masked: each warp's chunk gives a partial product (3-D dot over the chunk
    axis), and sel @ (the partials stacked by chunk) sums them on the tensor cores."""
    offs_s = s0 + tl.arange(0, BLOCK_S)
    valid = offs_s < end
    tile = tl.load(phi_base + offs_s[None, :, None] * stride_ps + col,
                   mask=valid[None, :, None] & col_ok, other=0.0)  # (NC, BS, BE)
    part = tl.dot(q3, tl.trans(tile, (0, 2, 1)))  # (NC, M, BS)
    part = tl.reshape(part.to(tile.dtype), (NC * BLOCK_M, BLOCK_S))  # rows c * M + m
    scores = tl.dot(sel, part) * qk_scale  # (M, BS)
    if HAS_MASK:
        keep = tl.load(mask_base + offs_s * stride_ks, mask=valid, other=0)
        valid = valid & (keep != 0)
    return tile, tl.where(valid[None, :], scores, float("-inf"))


@triton.jit
def _range_pass(q3, sel, phi_base, mask_base, start, end, offset, qk_scale, stride_ps, stride_ks, col, col_ok,
                NC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
                HAS_MASK: tl.constexpr):
    """Sum over one context range of 2^(score - offset) x phi and of 2^(score - offset), with one
    offset per query for the whole range, so no tile needs its row max; the scores' max is kept
    per element and reduced once at the end (the caller checks it against the offset)."""
    acc = tl.zeros([NC, BLOCK_M, BLOCK_E], tl.float32)
    l_el = tl.zeros([BLOCK_M, BLOCK_S], tl.float32)
    mx_el = tl.full([BLOCK_M, BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(start, end, BLOCK_S):
        tile, scores = _tile_scores(q3, sel, phi_base, mask_base, s0, end, qk_scale, stride_ps, stride_ks, col, col_ok,
                                    NC, BLOCK_M, BLOCK_S, HAS_MASK)
        mx_el = tl.maximum(mx_el, scores)
        p = tl.exp2(scores - offset[:, None])  # masked keys: 2^-inf = 0
        l_el += p
        p3 = tl.broadcast_to(p.to(tile.dtype)[None, :, :], (NC, BLOCK_M, BLOCK_S))
        acc = tl.dot(p3, tile, acc)  # (NC, M, BE)
    return acc, tl.sum(l_el, 1), tl.max(mx_el, 1)


@triton.jit
def absorbed_partial(
    Q, PHI, MASK, ACC, MAX, SUM,
    S, split_len, NQ, qk_scale,
    stride_qb, stride_qm,
    stride_pb, stride_ps,
    stride_kb, stride_ks,
    stride_ab, stride_as, stride_am,
    stride_mb, stride_ms,
    E: tl.constexpr, NC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """One context range of one block of queries: ACC = sum 2^(s - m) phi, SUM = sum 2^(s - m),
    MAX = m, the offset used (the first tile's max; the range's own max if the scores strayed
    more than MAX_DRIFT from it, after a second pass), or -1e30 for a range with no valid key."""
    pid_s = tl.program_id(0)  # context ranges vary fastest: the query blocks of one range run together
    pid_m = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)  # B x S x E elements pass 2^31 at large batches
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.arange(0, NC)[:, None, None] * BLOCK_E + tl.arange(0, BLOCK_E)[None, None, :]  # (NC, 1, BE)
    row_ok = offs_m < NQ
    col_ok = col < E
    q_ok = row_ok[None, :, None] & col_ok
    q3 = tl.load(Q + pid_b * stride_qb + offs_m[None, :, None] * stride_qm + col, mask=q_ok, other=0.0)  # (NC, M, BE)
    # sel[m, c * BLOCK_M + m'] = (m == m'): sums the chunks' partial scores on the tensor cores
    stacked = tl.arange(0, NC * BLOCK_M)
    sel = (tl.arange(0, BLOCK_M)[:, None] == (stacked % BLOCK_M)[None, :]).to(PHI.dtype.element_ty)
    start = pid_s.to(tl.int64) * split_len
    end = tl.minimum(start + split_len, S)
    phi_base = PHI + pid_b * stride_pb
    mask_base = MASK + pid_b * stride_kb
    # the offset: the first tile's max per query (0 where that tile has no valid key)
    _tile, first = _tile_scores(q3, sel, phi_base, mask_base, start, end, qk_scale, stride_ps, stride_ks, col, col_ok,
                                NC, BLOCK_M, BLOCK_S, HAS_MASK)
    offset = tl.max(first, 1)
    offset = tl.where(offset == float("-inf"), 0.0, offset)
    acc, l_i, top = _range_pass(q3, sel, phi_base, mask_base, start, end, offset, qk_scale, stride_ps, stride_ks,
                                col, col_ok, NC, BLOCK_M, BLOCK_S, BLOCK_E, HAS_MASK)
    drift = tl.where(top == float("-inf"), 0.0, tl.abs(top - offset))
    if tl.max(drift, 0) > MAX_DRIFT:  # rare: redo the range with its own max as the offset
        offset = tl.where(top == float("-inf"), 0.0, top)
        acc, l_i, top = _range_pass(q3, sel, phi_base, mask_base, start, end, offset, qk_scale, stride_ps, stride_ks,
                                    col, col_ok, NC, BLOCK_M, BLOCK_S, BLOCK_E, HAS_MASK)
    base = pid_b * stride_ab + pid_s * stride_as
    tl.store(ACC + base + offs_m[None, :, None] * stride_am + col, acc, mask=q_ok)
    stat = pid_b * stride_mb + pid_s * stride_ms + offs_m
    tl.store(MAX + stat, tl.where(l_i > 0, offset, -1.0e30), mask=row_ok)
    tl.store(SUM + stat, l_i, mask=row_ok)


@triton.jit
def absorbed_combine(
    ACC, MAX, SUM, OUT,
    SPLITS, NQ,
    stride_ab, stride_as, stride_am,
    stride_mb, stride_ms,
    stride_ob, stride_om,
    E: tl.constexpr, SPLITS_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """out[b, m, e-block] = sum_j 2^(m_j - m) acc_j / sum_j 2^(m_j - m) l_j (ranges in log2 units)."""
    m = tl.program_id(0)
    pid_e = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_j = tl.arange(0, SPLITS_PAD)
    stat = b * stride_mb + offs_j * stride_ms + m
    m_j = tl.load(MAX + stat, mask=offs_j < SPLITS, other=-float("inf"))
    l_j = tl.load(SUM + stat, mask=offs_j < SPLITS, other=0.0)
    w_j = tl.exp2(m_j - tl.max(m_j, 0))  # (SPLITS_PAD,); ranges with no valid key weigh 0
    denom = tl.sum(w_j * l_j, 0)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    parts = tl.load(ACC + b * stride_ab + offs_j[:, None] * stride_as + m * stride_am + offs_e[None, :],
                    mask=(offs_j < SPLITS)[:, None] & e_ok[None, :], other=0.0)  # (SPLITS_PAD, BLOCK_E)
    out = tl.sum(w_j[:, None] * parts, 0)
    tl.store(OUT + b * stride_ob + m * stride_om + offs_e, (out / denom).to(OUT.dtype.element_ty), mask=e_ok)


@triton.jit
def row_softmax_block(
    X, MASK, MAX, SUM, OUT, N, NBLK, qk_scale, stride_xr, stride_kb, stride_mr, stride_or, ROWS_PER_BATCH,
    BLOCK: tl.constexpr, NBLK_PAD: tl.constexpr, HAS_MASK: tl.constexpr, WRITE: tl.constexpr,
):
    """One block of a row of scale x scores (log2 units, -inf where masked). First pass
    (WRITE=False): the block's max and sum of 2^(x - max). Second pass: probs = 2^(x - M) / Z
    from all blocks' statistics (M the row max, Z the sum)."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(X + row * stride_xr + offs, mask=ok, other=float("-inf")).to(tl.float32) * qk_scale
    if HAS_MASK:
        keep = tl.load(MASK + (row // ROWS_PER_BATCH) * stride_kb + offs, mask=ok, other=0)
        x = tl.where(keep != 0, x, float("-inf"))
    if WRITE:
        offs_j = tl.arange(0, NBLK_PAD)
        m_j = tl.load(MAX + row * stride_mr + offs_j, mask=offs_j < NBLK, other=float("-inf"))
        l_j = tl.load(SUM + row * stride_mr + offs_j, mask=offs_j < NBLK, other=0.0)
        top = tl.max(m_j, 0)
        denom = tl.sum(tl.exp2(m_j - top) * l_j, 0)
        tl.store(OUT + row * stride_or + offs, (tl.exp2(x - top) / denom).to(OUT.dtype.element_ty), mask=ok)
    else:
        m = tl.max(x, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)  # a block without a valid key sums to 0
        tl.store(MAX + row * stride_mr + blk, m)
        tl.store(SUM + row * stride_mr + blk, tl.sum(tl.exp2(x - m_safe), 0))
