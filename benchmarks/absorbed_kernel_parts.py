"""Where the version-5 one-pass absorbed decode kernel spent its time: its loop with parts removed.

That kernel (online softmax; since replaced by `pipeline/fastdecode/absorbed_kernels.py`'s, which takes
one softmax offset per context range) was slower than the two matmuls it would replace. This
script times variants of its loop at LLaMA-2-7B decode shapes (32 absorbed queries of width 1024
over 126,976 encoder states, bf16, batch 1), each from a CUDA graph:

  sel-dot        the kernel's loop: partial scores per E-chunk (one warp each), summed on the
                 tensor cores as sel @ (partials stacked by chunk, in bf16), online softmax,
                 weighted sum of the tile
  sel-dot-tf32   the same with the partials kept in float32 (tf32 tensor cores)
  warp-sum       the kernel's first loop: the partial scores summed with tl.sum over the warp axis
  scores         partial scores, their tl.sum across warps and the running max only
  values         the weighted sum only (constant probabilities): no cross-warp communication
  no-sum         partial scores, exponentials of each chunk's own partial score (wrong
                 mathematics), weighted sum: everything but the cross-warp sum
  2d-scores      full scores as 2-D dots accumulated over E-chunks (warps split the context rows,
                 so the row max and sum cross warps instead), then the weighted sum with a
                 second load of the tile
  2d-scores-3d   the same scores, then the 3-D weighted sum of the kernel

Bandwidth counts one read of the encoder states. The merge of the ranges (`combine`) is timed
apart.

    PYTHONPATH=. python benchmarks/absorbed_kernel_parts.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline.bench.device import cuda_graph_ms
from pipeline.fastdecode import absorbed_decode

MODES = {"sel-dot": 7, "sel-dot-tf32": 8, "warp-sum": 0, "scores": 1, "values": 2, "no-sum": 3, "2d-scores": 5,
         "2d-scores-3d": 6}
# (BLOCK_M, BLOCK_S, BLOCK_E, num_warps, num_stages)
CONFIGS = [(16, 32, 128, 8, 3), (16, 32, 128, 8, 2), (16, 16, 128, 8, 3), (16, 16, 128, 8, 2), (16, 64, 128, 8, 2), (16, 32, 256, 4, 2), (16, 16, 64, 16, 3),
           (32, 32, 128, 8, 2), (16, 32, 128, 4, 2), (16, 32, 256, 8, 2)]


@triton.jit
def loop_variant(Q, PHI, ACC, STAT, S, split_len, qk_scale, stride_ps,
                 E: tl.constexpr, NC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
                 BLOCK_E: tl.constexpr, MODE: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col = tl.arange(0, NC)[:, None, None] * BLOCK_E + tl.arange(0, BLOCK_E)[None, None, :]  # (NC, 1, BE)
    q3 = tl.load(Q + offs_m[None, :, None] * E + col)  # (NC, M, BE)
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([NC, BLOCK_M, BLOCK_E], tl.float32)
    acc2 = tl.zeros([BLOCK_M, E], tl.float32)
    stacked = tl.arange(0, NC * BLOCK_M)
    sel = (tl.arange(0, BLOCK_M)[:, None] == (stacked % BLOCK_M)[None, :]).to(tl.float32)  # (M, NC*M)
    start = pid_s * split_len
    end = tl.minimum(start + split_len, S)
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        if MODE != 5:
            tile = tl.load(PHI + offs_s[None, :, None] * stride_ps + col)  # (NC, BS, BE)
        if MODE == 0 or MODE == 7 or MODE == 8:
            part = tl.dot(q3, tl.trans(tile, (0, 2, 1)))
            if MODE == 0:
                scores = tl.sum(part, axis=0) * qk_scale
            elif MODE == 7:
                stack = tl.reshape(part.to(tile.dtype), (NC * BLOCK_M, BLOCK_S))
                scores = tl.dot(sel.to(tile.dtype), stack) * qk_scale
            else:
                scores = tl.dot(sel, tl.reshape(part, (NC * BLOCK_M, BLOCK_S)), input_precision="tf32") * qk_scale
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            p3 = tl.broadcast_to(p.to(tile.dtype)[None, :, :], (NC, BLOCK_M, BLOCK_S))
            acc = acc * alpha[None, :, None] + tl.dot(p3, tile)
            m_i = m_new
        elif MODE == 1:
            part = tl.dot(q3, tl.trans(tile, (0, 2, 1)))
            scores = tl.sum(part, axis=0) * qk_scale
            m_i = tl.maximum(m_i, tl.max(scores, 1))
        elif MODE == 2:
            p3 = tl.full((NC, BLOCK_M, BLOCK_S), 0.001, tile.dtype)
            acc = acc + tl.dot(p3, tile)
        elif MODE == 3:
            part = tl.dot(q3, tl.trans(tile, (0, 2, 1)))
            p3 = tl.exp2(part - 1.0).to(tile.dtype)
            acc = acc + tl.dot(p3, tile)
        else:  # 5, 6
            scores = tl.zeros((BLOCK_M, BLOCK_S), tl.float32)
            for c in tl.static_range(NC):
                qc = tl.load(Q + offs_m[:, None] * E + c * BLOCK_E + tl.arange(0, BLOCK_E)[None, :])
                tc = tl.load(PHI + offs_s[:, None] * stride_ps + c * BLOCK_E + tl.arange(0, BLOCK_E)[None, :])
                scores = tl.dot(qc, tl.trans(tc), scores)
            scores = scores * qk_scale
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
            if MODE == 5:
                full = tl.load(PHI + offs_s[:, None] * stride_ps + tl.arange(0, E)[None, :])
                acc2 = acc2 * alpha[:, None] + tl.dot(p.to(full.dtype), full)
            else:
                p3 = tl.broadcast_to(p.to(tile.dtype)[None, :, :], (NC, BLOCK_M, BLOCK_S))
                acc = acc * alpha[None, :, None] + tl.dot(p3, tile)
    if MODE == 5:
        tl.store(ACC + pid_s * BLOCK_M * E + offs_m[:, None] * E + tl.arange(0, E)[None, :], acc2)
    else:
        tl.store(ACC + pid_s * BLOCK_M * E + offs_m[None, :, None] * E + col, acc)
    tl.store(STAT + pid_s * BLOCK_M + tl.arange(0, BLOCK_M), m_i + l_i)


def main() -> None:
    dev = torch.device("cuda")
    ctx, nq, width = 126976, 32, 1024
    q = torch.randn(nq, width, device=dev, dtype=torch.bfloat16)
    phi = torch.randn(ctx, width, device=dev, dtype=torch.bfloat16)
    nbytes = phi.numel() * phi.element_size()
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}")
    print(f"{'M':>3} {'S':>3} {'E':>4} {'warps':>5} {'stages':>6} {'variant':>13} {'splits':>6} {'us':>8} {'TB/s':>6}")
    for bm, bs, be, warps, stages in CONFIGS:
        for name, mode in MODES.items():
            for splits in (66, 132):
                split_len = -(-(-(-ctx // splits)) // bs) * bs  # whole tiles per range
                acc = torch.empty(splits, nq, width, device=dev)
                stat = torch.empty(splits, nq, device=dev)
                grid = (splits, nq // bm)

                def run():
                    loop_variant[grid](q, phi, acc, stat, ctx, split_len, 0.1, width, E=width, NC=width // be,
                                       BLOCK_M=bm, BLOCK_S=bs, BLOCK_E=be, MODE=mode, num_warps=warps, num_stages=stages)

                try:
                    run()
                    t = cuda_graph_ms(run)
                    print(f"{bm:>3} {bs:>3} {be:>4} {warps:>5} {stages:>6} {name:>13} {splits:>6} {t * 1000:>8.1f} "
                          f"{nbytes / t / 1e9:>6.2f}", flush=True)
                except Exception as ex:  # a block shape that does not fit (shared memory)
                    print(f"{bm:>3} {bs:>3} {be:>4} {warps:>5} {stages:>6} {name:>13} {splits:>6} "
                          f"{type(ex).__name__}: {str(ex).splitlines()[0][:70]}", flush=True)
    for splits in (66, 132):
        acc = torch.randn(1, splits, nq, width, device=dev)
        top, total = torch.randn(1, splits, nq, device=dev), torch.rand(1, splits, nq, device=dev)
        t = cuda_graph_ms(lambda: absorbed_decode.combine(acc, top, total, torch.bfloat16))
        print(f"merge of {splits} ranges: {t * 1000:.1f} us")


if __name__ == "__main__":
    main()
