"""Triton kernels of a decoding step's memory-bound products (imported only by `decode_ops`, and
only where Triton is).

A decoding step at batch 1 multiplies one row by every weight matrix and one query per head by
the cached keys and values: every byte is read once and used for one multiply-add, so the time
is the bytes over the memory bandwidth, and a kernel is as good as the bandwidth it reaches. The
launch shapes, and why these two beat cuBLAS and cuDNN on those shapes, are in `decode_ops`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gemv(
    W, X, Y, N, K,
    stride_wb, stride_wn, stride_xb, stride_yb,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr,
):
    """y[b, n] = sum_k W[b, n, k] x[b, k] for one block of BLOCK_N rows of W (k contiguous;
    stride_wb = 0 shares one matrix between the b). Products are summed per element in float32
    and reduced across the row once, after the loop. GATED: x is (gate, up), 2K wide, and the
    vector is silu(gate) * up (a SwiGLU MLP's down projection, without a kernel of its own)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    w_ptr = W + b * stride_wb + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
    x_ptr = X + b * stride_xb + cols
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + cols) < K
        w = tl.load(w_ptr + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + k0, mask=k_ok, other=0.0).to(tl.float32)
        if GATED:
            up = tl.load(x_ptr + K + k0, mask=k_ok, other=0.0).to(tl.float32)
            x = (x / (1.0 + tl.exp(-x)) * up).to(X.dtype.element_ty).to(tl.float32)  # rounded once, as fused elementwise code does
        acc += w.to(tl.float32) * x[None, :]
    tl.store(Y + b * stride_yb + rows, tl.sum(acc, 1).to(Y.dtype.element_ty), mask=row_ok)


@triton.jit
def gemv_t(
    W, X, Y, D, N,
    stride_wb, stride_wd, stride_xb, stride_yb,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y[b, n] = sum_d x[b, d] W[b, d, n] for one block of BLOCK_N columns (n contiguous): the
    absorbed query of one head, q_h W_k,h, with W_k viewed (heads, head_dim, E)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        w = tl.load(W + b * stride_wb + offs_d[:, None] * stride_wd + offs_n[None, :], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        x = tl.load(X + b * stride_xb + offs_d, mask=d_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[:, None]
    tl.store(Y + b * stride_yb + offs_n, tl.sum(acc, 0).to(Y.dtype.element_ty), mask=n_ok)


@triton.jit
def kv_partial(
    Q, K, V, MASK, ACC, MAX, SUM,
    L, split_len, groups, qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_ms,
    stride_ab, stride_ah, stride_as,
    stride_sb, stride_sh,
    D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """The query heads of one KV head of one sequence over one range of cached positions
    (flash-decoding): ACC = sum 2^(s - m) v, SUM = sum 2^(s - m), MAX = m (the range's max score,
    log2 units; -inf for a range with no attended position, whose sums are 0). The `groups`
    query heads sharing the KV head are the rows of both products, padded to BLOCK_G (16, the
    tensor cores' smallest tile): as products the tiles' loads are software-pipelined."""
    pid_s = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)  # H_kv x L x D elements can pass 2^31
    b = tl.program_id(2).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    g_ok = offs_g < groups
    heads = kvh * groups + offs_g
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None], other=0.0)  # (G, D)
    start = pid_s * split_len
    end = tl.minimum(start + split_len, L)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        in_range = offs_s < end
        keep = in_range
        if HAS_MASK:
            allowed = tl.load(MASK + b * stride_mb + offs_s * stride_ms, mask=in_range, other=0)
            keep = keep & (allowed != 0)
        k = tl.load(k_base + offs_s[:, None] * stride_ks + offs_d[None, :], mask=in_range[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (G, S)
        s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_s[:, None] * stride_vs + offs_d[None, :], mask=in_range[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    stat = b * stride_sb + heads * stride_sh + pid_s
    tl.store(ACC + b * stride_ab + heads[:, None] * stride_ah + pid_s * stride_as + offs_d[None, :], acc, mask=g_ok[:, None])
    tl.store(MAX + stat, m_i, mask=g_ok)
    tl.store(SUM + stat, l_i, mask=g_ok)


@triton.jit
def kv_combine(
    ACC, MAX, SUM, OUT, SPLITS,
    stride_ab, stride_ah, stride_as,
    stride_sb, stride_sh,
    stride_ob, stride_oh,
    D: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    """out[b, h] = sum_j 2^(m_j - M) acc_j / sum_j 2^(m_j - M) l_j over the ranges j (M their max)."""
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_j = tl.arange(0, SPLITS_PAD)
    j_ok = offs_j < SPLITS
    m_j = tl.load(MAX + b * stride_sb + h * stride_sh + offs_j, mask=j_ok, other=float("-inf"))
    l_j = tl.load(SUM + b * stride_sb + h * stride_sh + offs_j, mask=j_ok, other=0.0)
    top = tl.max(m_j, 0)
    w_j = tl.where(m_j == float("-inf"), 0.0, tl.exp2(m_j - top))
    offs_d = tl.arange(0, D)
    parts = tl.load(ACC + b * stride_ab + h * stride_ah + offs_j[:, None] * stride_as + offs_d[None, :],
                    mask=j_ok[:, None], other=0.0)  # (SPLITS_PAD, D)
    out = tl.sum(w_j[:, None] * parts, 0) / tl.sum(w_j * l_j, 0)
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty))
