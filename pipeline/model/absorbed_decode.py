"""Kernels of the absorbed cross-attention while decoding: a blocked softmax and a one-pass kernel.

In the absorbed form (cross_attention.py) every head of a decoding step attends to the same
encoder states phi (B, S, E) with a query of width E. As two matmuls (scores = q phi^T, then
probs phi) each step reads phi twice per layer: at 128K context 2 x 260 MB per layer, the largest
part of a CEPE decode step.

`row_softmax` (used by default on a GPU): the softmax between the two matmuls. Its input is 32
rows (one per head) of up to 128K scores; torch's softmax gives each row one block, so 32
multiprocessors do the work and it took 50 us of the 195 us of the attention at 127K (H200). Cut
into blocks of 2,048 scores, a first pass takes each block's max and sum of exponentials and a
second normalises every block with its row's totals: 144 us for the two matmuls and softmax.

`fused_attention` (opt-in, `CEPE_FUSED_DECODE=1`): reads each phi tile once. Per tile of
BLOCK_S context rows it forms the scores of BLOCK_M queries, updates a running (online) softmax
and accumulates probs x tile, flash-decoding style. E (1024) is far wider than an attention head,
and a (queries x E) float32 accumulator plus the (queries x E) query cannot sit in one warp's
registers, so every tensor is split along E into NC chunks of BLOCK_E columns, held as 3-D
(NC, rows, BLOCK_E) blocks, and both products are batched dots over the chunk axis: each warp owns
one chunk of the query, of the tile and of the accumulator. The scores are the sum of the chunks'
partial scores, taken on the tensor cores: sel @ (the partials stacked by chunk, in bf16), where
sel (BLOCK_M, NC x BLOCK_M) picks each query's rows. (Written as `tl.sum` over the warp axis,
Triton lowered the same sum into eight rounds of shared-memory store, barrier, load, barrier per
tile, and the ranges took 306 us instead of 123.) The context is split into ranges that run in
parallel; each writes its unnormalised partial sum with its running max and denominator, and a
second small kernel merges them exactly. On an H200 at 127K context: 123 us for the ranges plus
4-7 us for the merge, against 144 us for the two matmuls and the softmax; in a whole layer 184 vs
192 us at 127K but 89 vs 87 us at 28K (docs/results/bench_diagnostics.md). The margin is small
and changes sign with the context length, so it stays opt-in (`CEPE_FUSED_DECODE=1`).

Both are registered as torch ops (`torch.ops.cepe.*`), so torch.compile treats each as one opaque
call. Everything else (training, prefill, CPU) takes the torch matmul or sdpa paths, which give
the same result.
"""

from __future__ import annotations

import functools
import os

import torch

MAX_QUERIES = 64  # above this the matmul path is as good (phi is shared by enough queries)
LOG2E = 1.4426950408889634


def enabled() -> bool:
    """The kernel is opt-in: `CEPE_FUSED_DECODE=1` (read at each call) and Triton importable."""
    return os.environ.get("CEPE_FUSED_DECODE") == "1" and triton_available()


_TRITON: bool | None = None


def triton_available() -> bool:
    """Whether Triton imports (probed once; a plain global, so torch.compile traces the check)."""
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON = True
        except Exception:
            _TRITON = False
    return _TRITON


def usable(device: torch.device, num_queries: int, requires_grad: bool = False) -> bool:
    """Whether the fused kernel applies: enabled, a CUDA device (or the Triton interpreter), few
    queries, no gradient wanted (the kernel has no backward)."""
    if num_queries > MAX_QUERIES or (requires_grad and torch.is_grad_enabled()) or not enabled():
        return False
    return device.type == "cuda" or _interpreted()


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

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
        pid_s = tl.program_id(0)  # context ranges vary fastest: the query blocks of one range run together
        pid_m = tl.program_id(1)
        pid_b = tl.program_id(2).to(tl.int64)  # B x S x E elements pass 2^31 at large batches
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        col = tl.arange(0, NC)[:, None, None] * BLOCK_E + tl.arange(0, BLOCK_E)[None, None, :]  # (NC, 1, BE)
        row_ok = offs_m < NQ
        col_ok = col < E
        q_ptrs = Q + pid_b * stride_qb + offs_m[None, :, None] * stride_qm + col  # (NC, M, BE)
        q_ok = row_ok[None, :, None] & col_ok
        q3 = tl.load(q_ptrs, mask=q_ok, other=0.0)  # (NC, M, BE): one query chunk per warp
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a range with no valid key stays NaN-free
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([NC, BLOCK_M, BLOCK_E], tl.float32)
        # sel[m, c * BLOCK_M + m'] = (m == m'): sel @ (partial scores stacked by chunk) sums the
        # chunks on the tensor cores, one shared-memory exchange per tile (tl.sum over the warp
        # axis took eight rounds of store, barrier, load, barrier)
        stacked = tl.arange(0, NC * BLOCK_M)
        sel = (tl.arange(0, BLOCK_M)[:, None] == (stacked % BLOCK_M)[None, :]).to(PHI.dtype.element_ty)
        start = pid_s.to(tl.int64) * split_len
        end = tl.minimum(start + split_len, S)
        phi_base = PHI + pid_b * stride_pb
        for s0 in range(start, end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            valid = offs_s < end
            tile = tl.load(phi_base + offs_s[None, :, None] * stride_ps + col,
                           mask=valid[None, :, None] & col_ok, other=0.0)  # (NC, BS, BE)
            part = tl.dot(q3, tl.trans(tile, (0, 2, 1)))  # (NC, M, BS): each chunk's share of the scores
            part = tl.reshape(part.to(tile.dtype), (NC * BLOCK_M, BLOCK_S))  # rows c * M + m
            scores = tl.dot(sel, part) * qk_scale  # (M, BS), in log2 units
            if HAS_MASK:
                keep = tl.load(MASK + pid_b * stride_kb + offs_s * stride_ks, mask=valid, other=0)
                valid = valid & (keep != 0)
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])  # masked keys: 2^-inf = 0
            l_i = l_i * alpha + tl.sum(p, 1)
            p3 = tl.broadcast_to(p.to(tile.dtype)[None, :, :], (NC, BLOCK_M, BLOCK_S))
            acc = acc * alpha[None, :, None] + tl.dot(p3, tile)  # (NC, M, BE)
            m_i = m_new
        base = pid_b * stride_ab + pid_s * stride_as
        tl.store(ACC + base + offs_m[None, :, None] * stride_am + col, acc, mask=q_ok)
        stat = pid_b * stride_mb + pid_s * stride_ms + offs_m
        tl.store(MAX + stat, m_i, mask=row_ok)
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

    return absorbed_partial, absorbed_combine, row_softmax_block


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _chunks(width: int, block_e: int) -> int:
    """NC: chunks of BLOCK_E columns covering the encoder width, a power of two (tl.arange)."""
    import triton

    return triton.next_power_of_2(-(-width // block_e))


def default_config(width: int) -> dict:
    """Block sizes per program (measured on an H200 for E = 1024, docs/results/bench_diagnostics.md).

    Every warp owns one chunk of BLOCK_E columns; 16 query rows is the smallest tensor-core tile.
    """
    if _interpreted():
        return dict(BLOCK_M=16, BLOCK_S=16, BLOCK_E=16, num_warps=1, num_stages=1)
    block_e = 128
    return dict(BLOCK_M=16, BLOCK_S=32, BLOCK_E=block_e, num_warps=min(_chunks(width, block_e), 8), num_stages=3)


def num_splits(context_len: int, batch: int, query_blocks: int, device: torch.device, waves: int = 1) -> int:
    """Context ranges per sequence: `waves` programs per multiprocessor, each range >= 256 rows.

    Fewer ranges mean smaller partial sums (splits x queries x E float32 per sequence, merged by
    the combine kernel); more keep every multiprocessor busy.
    """
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 8
    want = max(1, -(-waves * sms // (query_blocks * batch)))
    return max(1, min(want, -(-context_len // 256)))


def partials(
    q_abs: torch.Tensor, phi: torch.Tensor, key_mask: torch.Tensor | None, splits: int,
    scale: float = 1.0, config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per context range: unnormalised sums (B, splits, M, E) float32, running max and denominator
    (B, splits, M) float32, the max in log2 units (scores x scale x log2 e).

    q_abs (B, M, E); phi (B, S, E); key_mask (B, S) bool or None; scale multiplies the scores.
    """
    import triton

    bsz, nq, e = q_abs.shape
    ctx_len = phi.shape[1]
    cfg = dict(config or default_config(e))
    block_m, block_e = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_E")
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    q_abs = q_abs.contiguous()
    phi = phi if phi.stride(-1) == 1 else phi.contiguous()
    split_len = -(-ctx_len // splits)
    acc = torch.empty(bsz, splits, nq, e, device=phi.device, dtype=torch.float32)
    stat_max = torch.empty(bsz, splits, nq, device=phi.device, dtype=torch.float32)
    stat_sum = torch.empty_like(stat_max)
    if key_mask is not None:
        mask = key_mask.to(torch.uint8) if key_mask.dtype == torch.bool else key_mask
        mask_strides = (mask.stride(0), mask.stride(1))
    else:
        mask, mask_strides = phi, (0, 0)  # never read (HAS_MASK=False)
    grid = (splits, triton.cdiv(nq, block_m), bsz)
    _kernels()[0][grid](
        q_abs, phi, mask, acc, stat_max, stat_sum,
        ctx_len, split_len, nq, scale * LOG2E,
        q_abs.stride(0), q_abs.stride(1),
        phi.stride(0), phi.stride(1),
        *mask_strides,
        acc.stride(0), acc.stride(1), acc.stride(2),
        stat_max.stride(0), stat_max.stride(1),
        E=e, NC=_chunks(e, block_e), BLOCK_M=block_m, BLOCK_E=block_e, HAS_MASK=key_mask is not None,
        num_warps=num_warps, num_stages=num_stages, **cfg,
    )
    return acc, stat_max, stat_sum


def combine(acc: torch.Tensor, stat_max: torch.Tensor, stat_sum: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Merge the context ranges exactly -> (B, M, E) in `dtype` (one small kernel)."""
    import triton

    bsz, splits, nq, e = acc.shape
    out = torch.empty(bsz, nq, e, device=acc.device, dtype=dtype)
    splits_pad = triton.next_power_of_2(splits)
    block_e = max(1, min(triton.next_power_of_2(e), 8192 // splits_pad))  # all ranges of a column block at once
    grid = (nq, triton.cdiv(e, block_e), bsz)
    _kernels()[1][grid](
        acc, stat_max, stat_sum, out, splits, nq,
        acc.stride(0), acc.stride(1), acc.stride(2),
        stat_max.stride(0), stat_max.stride(1),
        out.stride(0), out.stride(1),
        E=e, SPLITS_PAD=splits_pad, BLOCK_E=block_e,
        num_warps=1 if _interpreted() else 4,
    )
    return out


def absorbed_attention(q_abs: torch.Tensor, phi: torch.Tensor, key_mask: torch.Tensor | None = None,
                       scale: float = 1.0) -> torch.Tensor:
    """`fused_attention` with its default splits and blocks, as a registered op (opaque to
    torch.compile)."""
    return torch.ops.cepe.absorbed_attention(q_abs, phi, key_mask, scale)


def fused_attention(q_abs: torch.Tensor, phi: torch.Tensor, key_mask: torch.Tensor | None = None,
                    scale: float = 1.0, splits: int | None = None, config: dict | None = None) -> torch.Tensor:
    """softmax(scale q_abs phi^T) phi in one pass over phi.

    Args:
        q_abs: (B, M, E) absorbed queries.
        phi: (B, S, E) encoder states (keys and values at once).
        key_mask: (B, S) bool, True = attend; every row must have at least one True (KeyMask
            guarantees it), or None.
        scale: the softmax scale (1 / sqrt(head_dim)).
        splits: context ranges per sequence (default: `num_splits`).
        config: block sizes (default: `default_config`).
    Returns:
        (B, M, E) in phi's dtype.
    """
    bsz, nq, e = q_abs.shape
    cfg = config or default_config(e)
    if splits is None:
        splits = num_splits(phi.shape[1], bsz, -(-nq // cfg["BLOCK_M"]), phi.device)
    return combine(*partials(q_abs, phi, key_mask, splits, scale, cfg), dtype=phi.dtype)


def softmax_usable(scores: torch.Tensor) -> bool:
    """Whether `row_softmax` applies: Triton on a CUDA device (or its interpreter), no gradient."""
    if not triton_available() or (scores.requires_grad and torch.is_grad_enabled()):
        return False
    return scores.device.type == "cuda" or _interpreted()


def row_softmax(scores: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`_row_softmax` as a registered op: torch.compile keeps it whole instead of tracing the
    Triton launches (see `_row_softmax` for the arguments)."""
    return torch.ops.cepe.row_softmax(scores, scale, key_mask)


def _row_softmax(scores: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None,
                 block: int = 2048) -> torch.Tensor:
    """softmax(scale x scores) over the last axis, for few rows over a long context, in scores' dtype.

    The two-matmul absorbed form has 32 rows (one per head) of up to 128K scores per layer and
    step; a one-block-per-row softmax keeps 32 of the GPU's multiprocessors busy and takes longer
    than reading the scores should. Here every row is cut into blocks: a first launch takes each
    block's max and sum of exponentials, a second normalises every block with its row's totals.
    Computed in float32 (the scale folded in), written in scores' dtype.

    scores: (B, R, N); key_mask: (B, N) bool, True = attend (each row needs one), or None.
    """
    import triton

    bsz, rows, n = scores.shape
    x = scores.reshape(bsz * rows, n)  # (B*R, N)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if _interpreted():
        block = min(block, 64)
    nblk = triton.cdiv(n, block)
    stat_max = torch.empty(bsz * rows, nblk, device=x.device, dtype=torch.float32)
    stat_sum = torch.empty_like(stat_max)
    out = torch.empty(bsz * rows, n, device=x.device, dtype=scores.dtype)
    if key_mask is not None:
        mask = key_mask.view(torch.uint8) if key_mask.dtype == torch.bool else key_mask
        mask_stride = mask.stride(0)
    else:
        mask, mask_stride = x, 0  # never read (HAS_MASK=False)
    kernel = _kernels()[2]
    grid = (bsz * rows, nblk)
    for write in (False, True):  # block statistics, then every block normalised with its row's totals
        kernel[grid](x, mask, stat_max, stat_sum, out, n, nblk, scale * LOG2E, x.stride(0), mask_stride,
                     stat_max.stride(0), out.stride(0), rows, BLOCK=block, NBLK_PAD=triton.next_power_of_2(nblk),
                     HAS_MASK=key_mask is not None, WRITE=write, num_warps=1 if _interpreted() else 4)
    return out.view(bsz, rows, n)


@torch.library.custom_op("cepe::row_softmax", mutates_args=())
def _row_softmax_op(scores: torch.Tensor, scale: float, key_mask: torch.Tensor | None) -> torch.Tensor:
    return _row_softmax(scores, scale, key_mask)


@_row_softmax_op.register_fake
def _(scores: torch.Tensor, scale: float, key_mask: torch.Tensor | None) -> torch.Tensor:
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.custom_op("cepe::absorbed_attention", mutates_args=())
def _absorbed_attention_op(q_abs: torch.Tensor, phi: torch.Tensor, key_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    return fused_attention(q_abs, phi, key_mask, scale)


@_absorbed_attention_op.register_fake
def _(q_abs: torch.Tensor, phi: torch.Tensor, key_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    return q_abs.new_empty(q_abs.shape, dtype=phi.dtype)
