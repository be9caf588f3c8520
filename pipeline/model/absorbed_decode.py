"""One-pass absorbed cross-attention for decoding: a split-context Triton kernel.

In the absorbed form (cross_attention.py) every head of a decoding step attends to the same
encoder states phi (B, S, E) with a query of width E. Written as two matmuls (scores = q phi^T,
then probs phi) each step reads phi twice per layer: at 128K context that is 2 x 260 MB per layer,
the largest part of a CEPE decode step. This kernel reads each phi tile once: per tile of
BLOCK_S context rows it forms the scores of BLOCK_M queries, updates a running (online) softmax
and accumulates probs x tile into a (BLOCK_M, E) float32 accumulator, flash-decoding style.

The context is split into `splits` ranges that run in parallel (one query block x one range per
program); each writes its unnormalised partial sum with its running max and denominator, and a
small reduction (`combine`) merges them exactly. Query blocks of the same range are neighbours in
the launch order, so the second one finds the tile in L2.

Opt-in (`CEPE_FUSED_DECODE=1`): measured on an H200 at 127K context this version is slower than
the two matmuls it replaces (1.00 vs 0.42 ms per layer, docs/results/bench.md), so decoding uses
the matmuls unless asked. When enabled it runs for decode steps on a CUDA device with Triton
installed; everything else (training, prefill, CPU) takes the matmul or sdpa paths, which give
the same result.
"""

from __future__ import annotations

import functools
import os

import torch

BLOCK_M = 16  # queries per program: the smallest tensor-core tile (tl.dot needs M >= 16)
MAX_QUERIES = 64  # above this the matmul path is as good (phi is shared by enough queries)


def enabled() -> bool:
    """The kernel is opt-in: `CEPE_FUSED_DECODE=1` (read at each call) and Triton importable."""
    return os.environ.get("CEPE_FUSED_DECODE") == "1" and triton_available()


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def usable(device: torch.device, num_queries: int, requires_grad: bool = False) -> bool:
    """Whether the fused kernel applies: enabled, a CUDA device (or the Triton interpreter), few
    queries, no gradient wanted (the kernel has no backward)."""
    if num_queries > MAX_QUERIES or (requires_grad and torch.is_grad_enabled()) or not enabled():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    configs = [
        triton.Config({"BLOCK_S": bs}, num_warps=w, num_stages=st)
        for bs, w, st in ((16, 4, 2), (32, 4, 2), (32, 8, 2), (32, 8, 3), (64, 8, 2), (64, 8, 3), (16, 8, 3))
    ]
    if os.environ.get("TRITON_INTERPRET") == "1":
        configs = [triton.Config({"BLOCK_S": 16}, num_warps=4, num_stages=1)]

    @triton.autotune(configs=configs, key=["E_PAD", "NQ", "HAS_MASK"])
    @triton.jit
    def absorbed_partial(
        Q, PHI, MASK, ACC, MAX, SUM,
        S, split_len, NQ,
        stride_qb, stride_qm,
        stride_pb, stride_ps,
        stride_kb, stride_ks,
        stride_ab, stride_as, stride_am,
        stride_mb, stride_ms,
        E: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
        HAS_MASK: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_b = tl.program_id(2).to(tl.int64)  # B x S x E elements pass 2^31 at large batches
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_e = tl.arange(0, E_PAD)
        row_ok = offs_m < NQ
        col_ok = offs_e < E
        q = tl.load(Q + pid_b * stride_qb + offs_m[:, None] * stride_qm + offs_e[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_M, E_PAD), pre-scaled
        m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # finite: a range with no valid key stays NaN-free
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, E_PAD], tl.float32)
        start = pid_s.to(tl.int64) * split_len
        end = tl.minimum(start + split_len, S)
        for s0 in range(start, end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            valid = offs_s < end
            tile = tl.load(PHI + pid_b * stride_pb + offs_s[:, None] * stride_ps + offs_e[None, :],
                           mask=valid[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_S, E_PAD)
            scores = tl.dot(q, tl.trans(tile))  # (BLOCK_M, BLOCK_S), float32
            if HAS_MASK:
                keep = tl.load(MASK + pid_b * stride_kb + offs_s * stride_ks, mask=valid, other=0)
                valid = valid & (keep != 0)
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])  # masked keys: exp(-inf) = 0
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(tile.dtype), tile)
            m_i = m_new
        base = pid_b * stride_ab + pid_s * stride_as
        tl.store(ACC + base + offs_m[:, None] * stride_am + offs_e[None, :], acc,
                 mask=row_ok[:, None] & col_ok[None, :])
        stat = pid_b * stride_mb + pid_s * stride_ms + offs_m
        tl.store(MAX + stat, m_i, mask=row_ok)
        tl.store(SUM + stat, l_i, mask=row_ok)

    return absorbed_partial


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(context_len: int, batch: int, num_queries: int, device: torch.device) -> int:
    """Context ranges per sequence: about two programs per multiprocessor, each range >= 256 rows.

    Fewer ranges mean smaller partial sums (splits x queries x E float32 per sequence, merged by
    `combine`); more keep every multiprocessor busy.
    """
    sms = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 8
    blocks = -(-num_queries // BLOCK_M)
    want = max(1, -(-2 * sms // (blocks * batch)))
    return max(1, min(want, -(-context_len // 256)))


def partials(
    q_abs: torch.Tensor, phi: torch.Tensor, key_mask: torch.Tensor | None, splits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per context range: unnormalised sums (B, splits, M, E) float32, running max and denominator
    (B, splits, M) float32. q_abs (B, M, E) already scaled; phi (B, S, E); key_mask (B, S) bool."""
    import triton

    bsz, nq, e = q_abs.shape
    ctx_len = phi.shape[1]
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
    grid = (triton.cdiv(nq, BLOCK_M), splits, bsz)
    _kernel()[grid](
        q_abs, phi, mask, acc, stat_max, stat_sum,
        ctx_len, split_len, nq,
        q_abs.stride(0), q_abs.stride(1),
        phi.stride(0), phi.stride(1),
        *mask_strides,
        acc.stride(0), acc.stride(1), acc.stride(2),
        stat_max.stride(0), stat_max.stride(1),
        E=e, E_PAD=triton.next_power_of_2(e), BLOCK_M=BLOCK_M, HAS_MASK=key_mask is not None,
    )
    return acc, stat_max, stat_sum


def combine(acc: torch.Tensor, stat_max: torch.Tensor, stat_sum: torch.Tensor) -> torch.Tensor:
    """Merge the ranges exactly: out = sum_j e^(m_j - m) acc_j / sum_j e^(m_j - m) l_j -> (B, M, E)."""
    top = stat_max.amax(dim=1, keepdim=True)  # (B, 1, M)
    weight = torch.exp(stat_max - top)  # (B, splits, M); ranges with no valid key weigh 0
    denom = (weight * stat_sum).sum(dim=1)  # (B, M)
    out = torch.einsum("bjm,bjme->bme", weight, acc)  # (B, M, E)
    return out / denom[..., None]


def absorbed_attention(q_abs: torch.Tensor, phi: torch.Tensor, key_mask: torch.Tensor | None = None,
                       splits: int | None = None) -> torch.Tensor:
    """softmax(q_abs phi^T) phi in one pass over phi.

    Args:
        q_abs: (B, M, E) absorbed queries, already multiplied by the softmax scale.
        phi: (B, S, E) encoder states (keys and values at once).
        key_mask: (B, S) bool, True = attend; every row must have at least one True (KeyMask
            guarantees it), or None.
        splits: context ranges per sequence (default: `num_splits`).
    Returns:
        (B, M, E) in phi's dtype.
    """
    splits = splits or num_splits(phi.shape[1], phi.shape[0], q_abs.shape[1], phi.device)
    out = combine(*partials(q_abs, phi, key_mask, splits))
    return out.to(phi.dtype)
