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

`fused_attention` (the default on a GPU from FUSED_MIN_CONTEXT encoder states on;
`settings.current().fused` ("on"/"off", from `CEPE_FUSED_DECODE` = 1 or 0) forces it on or off;
kernels in `absorbed_kernels`): reads each phi
tile once. Per tile of BLOCK_S context rows it forms the scores of BLOCK_M queries and accumulates
2^(score - offset) x tile, flash-decoding style. E (1024) is far wider than an attention head, and
a (queries x E) float32 accumulator plus the (queries x E) query cannot sit in one warp's
registers, so every tensor is split along E into NC chunks of BLOCK_E columns, held as 3-D (NC,
rows, BLOCK_E) blocks, and both products are batched dots over the chunk axis: each warp owns one
chunk of the query, of the tile and of the accumulator. The scores are the sum of the chunks'
partial scores, taken on the tensor cores: sel @ (the partials stacked by chunk, in bf16), where
sel (BLOCK_M, NC x BLOCK_M) picks each query's rows.

Every exchange between warps costs a round of shared-memory stores and barriers, and an online
softmax needs two more per tile (the row max and the row sum cross warps). So the kernel uses one
offset per query for a whole context range, the max of the range's first tile, instead of a
running max: the sum needs no rescaling, and the exponentials' sum and the scores' max are kept
per element and reduced once per range. Should a range's scores stray more than 64 (log2 units)
from that offset, it is recomputed with its own max, so the result is exact either way. Each range
writes its unnormalised sum with its offset and denominator, and a second small kernel merges the
ranges exactly. On an H200 at 127K context: 116-119 us with the merge, against 143-150 us for the
two matmuls and the softmax, and 135 us for the same kernel with an online softmax
(docs/results/bench_diagnostics.md).

Both are registered as torch ops (`torch.ops.cepe.*`), so torch.compile treats each as one opaque
call. `pipeline.fastdecode.absorbed` chooses among them and the torch paths; everything else
(training, prefill, CPU) takes the torch matmul or sdpa paths, which give the same result.
"""

from __future__ import annotations

import torch

from pipeline.fastdecode import settings
from pipeline.fastdecode.triton_support import LOG2E, interpreted, kernels_run, mask_argument, num_splits, register_op

MAX_QUERIES = 64  # above this the matmul path is as good (phi is shared by enough queries)
# From this many encoder states on, the kernel is the default (H200, a whole cross-attention layer,
# docs/results/bench_diagnostics.md): 164 vs 196 us at 127K, 86 vs 87 us at 28K, 70 vs 62 us at 4K.
FUSED_MIN_CONTEXT = 32768


def usable(device: torch.device, num_queries: int, context_len: int, requires_grad: bool = False) -> bool:
    """Whether a call runs the fused kernel: the kernels run here, few queries, and
    `settings.current().fused` allows it at this context length."""
    if num_queries > MAX_QUERIES or not kernels_run(device, requires_grad):
        return False
    mode = settings.current().fused
    return mode == "on" or (mode == "auto" and context_len >= FUSED_MIN_CONTEXT)


def _kernels():
    """The Triton kernels (absorbed_partial, absorbed_combine, row_softmax_block), imported on
    first use: CPU-only installs never import Triton."""
    from pipeline.fastdecode import absorbed_kernels as k

    return k.absorbed_partial, k.absorbed_combine, k.row_softmax_block


def _chunks(width: int, block_e: int) -> int:
    """NC: chunks of BLOCK_E columns covering the encoder width, a power of two (tl.arange)."""
    import triton

    return triton.next_power_of_2(-(-width // block_e))


def default_config(width: int) -> dict:
    """Block sizes per program (measured on an H200 for E = 1024, docs/results/bench_diagnostics.md).

    Every warp owns one chunk of BLOCK_E columns; 16 query rows is the smallest tensor-core tile.
    """
    if interpreted():
        return dict(BLOCK_M=16, BLOCK_S=16, BLOCK_E=16, num_warps=1, num_stages=1)
    block_e = 128
    return dict(BLOCK_M=16, BLOCK_S=32, BLOCK_E=block_e, num_warps=min(_chunks(width, block_e), 8), num_stages=3)


def partials(
    q_abs: torch.Tensor, phi: torch.Tensor, key_mask: torch.Tensor | None, splits: int,
    scale: float = 1.0, config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per context range: sums of 2^(score - offset) phi (B, splits, M, E) float32, the offset and
    the sum of 2^(score - offset) (B, splits, M) float32, scores in log2 units (x scale x log2 e);
    the offset is -1e30 for a range without a valid key.

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
    mask, mask_strides = mask_argument(key_mask, phi)
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
        num_warps=1 if interpreted() else 4,
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
    """Whether `row_softmax` applies: the kernels run here (a GPU, no gradient)."""
    return kernels_run(scores.device, scores.requires_grad)


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
    if interpreted():
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
                     HAS_MASK=key_mask is not None, WRITE=write, num_warps=1 if interpreted() else 4)
    return out.view(bsz, rows, n)


def _row_softmax_fake(scores: torch.Tensor, scale: float, key_mask: torch.Tensor | None) -> torch.Tensor:
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@register_op("row_softmax", _row_softmax_fake)
def _row_softmax_op(scores: torch.Tensor, scale: float, key_mask: torch.Tensor | None) -> torch.Tensor:
    return _row_softmax(scores, scale, key_mask)


def _absorbed_attention_fake(q_abs: torch.Tensor, phi: torch.Tensor, key_mask: torch.Tensor | None,
                             scale: float) -> torch.Tensor:
    return q_abs.new_empty(q_abs.shape, dtype=phi.dtype)


@register_op("absorbed_attention", _absorbed_attention_fake)
def _absorbed_attention_op(q_abs: torch.Tensor, phi: torch.Tensor, key_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    return fused_attention(q_abs, phi, key_mask, scale)
