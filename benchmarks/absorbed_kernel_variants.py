"""Two other layouts of the one-pass absorbed decode kernel, timed against the one decoding uses.

`pipeline/fastdecode/absorbed_kernels.absorbed_partial` splits the encoder width E into one chunk per
warp; each tile's scores are the sum of the chunks' partial scores, so every tile needs two
exchanges between warps (the partial scores, then the probabilities). Both variants here keep its
arithmetic (one softmax offset per context range, a second pass if the scores stray) and change
only how the work is laid out:

  transposed  scores^T = tile @ q^T with warps splitting the context rows (each with the full
              width: no partial scores), acc^T += tile^T @ p^T (Hopper's wgmma, operands in
              shared memory); q^T is reloaded per tile, as held in registers it spills
  gluon       the kernel's own layout written in Gluon (Triton's explicit-layout dialect, 3.6 on
              the H200 measured): each warp copies its own chunk (cp.async), every warp reads all
              chunks' partial scores from shared memory and sums them itself, and the
              probabilities become the next product's operand in registers: two barriers per tile
              instead of four

Decode shapes of LLaMA-2-7B with the paper's encoder: 32 absorbed queries of width 1024, bf16,
batch 1; every kernel is timed with its merge from a CUDA graph and checked against a float64
reference. Results and the reading of them: docs/results/bench_diagnostics.md.

    PYTHONPATH=. python benchmarks/absorbed_kernel_variants.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pipeline.bench.device import cuda_graph_ms
from pipeline.fastdecode import absorbed_decode, triton_support
from pipeline.fastdecode.absorbed_kernels import MAX_DRIFT


# ---------------------------------------------------------------------------------------------
# transposed: warps split the context rows
# ---------------------------------------------------------------------------------------------
@triton.jit
def _t_pass(qt_ptrs, q_ok, PHI, start, end, offset, qk_scale, stride_ps,
            E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    acc_t = tl.zeros([E, BLOCK_M], tl.float32)
    l_el = tl.zeros([BLOCK_S, BLOCK_M], tl.float32)
    mx_el = tl.full([BLOCK_S, BLOCK_M], float("-inf"), tl.float32)
    offs_e = tl.arange(0, E)
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        valid = offs_s < end
        tile = tl.load(PHI + offs_s[:, None] * stride_ps + offs_e[None, :], mask=valid[:, None], other=0.0)  # (BS, E)
        q_t = tl.load(qt_ptrs, mask=q_ok, other=0.0)  # (E, M), reloaded: held across the loop it spills
        s_t = tl.where(valid[:, None], tl.dot(tile, q_t) * qk_scale, float("-inf"))  # (BS, M)
        mx_el = tl.maximum(mx_el, s_t)
        p_t = tl.exp2(s_t - offset[None, :])
        l_el += p_t
        acc_t = tl.dot(tl.trans(tile), p_t.to(tile.dtype), acc_t)  # (E, M)
    return acc_t, tl.sum(l_el, 0), tl.max(mx_el, 0)


@triton.jit
def transposed_partial(Q, PHI, ACC, MAX, SUM, S, split_len, NQ, qk_scale, stride_ps,
                       E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    pid_s = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, E)
    row_ok = offs_m < NQ
    qt_ptrs = Q + offs_m[None, :] * E + offs_e[:, None]
    start = pid_s.to(tl.int64) * split_len
    end = tl.minimum(start + split_len, S)
    no_offset = tl.zeros([BLOCK_M], tl.float32)
    _a, _l, first = _t_pass(qt_ptrs, row_ok[None, :], PHI, start, tl.minimum(start + BLOCK_S, end), no_offset,
                            qk_scale, stride_ps, E, BLOCK_M, BLOCK_S)
    offset = tl.where(first == float("-inf"), 0.0, first)
    acc_t, l_i, top = _t_pass(qt_ptrs, row_ok[None, :], PHI, start, end, offset, qk_scale, stride_ps, E, BLOCK_M, BLOCK_S)
    if tl.max(tl.where(top == float("-inf"), 0.0, tl.abs(top - offset)), 0) > MAX_DRIFT:
        offset = tl.where(top == float("-inf"), 0.0, top)
        acc_t, l_i, top = _t_pass(qt_ptrs, row_ok[None, :], PHI, start, end, offset, qk_scale, stride_ps, E,
                                  BLOCK_M, BLOCK_S)
    tl.store(ACC + pid_s * NQ * E + offs_m[None, :] * E + offs_e[:, None], acc_t, mask=row_ok[None, :])
    tl.store(MAX + pid_s * NQ + offs_m, tl.where(l_i > 0, offset, -1.0e30), mask=row_ok)
    tl.store(SUM + pid_s * NQ + offs_m, l_i, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# gluon: the kernel's layout, with explicit shared memory and layouts
# ---------------------------------------------------------------------------------------------
try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
except ImportError:  # a Triton without Gluon: the variant is skipped
    gluon = None

if gluon is not None:
    _async_load = getattr(cp, "async_load", None) or cp.async_copy_global_to_shared  # renamed after 3.6
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    _NEW_API = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))

    @gluon.jit
    def _g_issue(tiles, stage, phi_base, row0, end, stride_ps, r3, cole3, col_ok3):
        rows = row0 + r3  # each warp copies its own chunk of the tile
        _async_load(tiles.index(stage), phi_base + rows * stride_ps + cole3, mask=(rows < end) & col_ok3)
        cp.commit_group()

    @gluon.jit
    def _g_pass(q3, tiles, xbuf, xrows, phi_base, start, end, offset, qk_scale, stride_ps, r3, cole3, col_ok3,
                NC: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_S: gl.constexpr, BLOCK_E: gl.constexpr,
                STAGES: gl.constexpr, MMA: gl.constexpr, S2: gl.constexpr, DA: gl.constexpr, DB: gl.constexpr,
                FIRST_ONLY: gl.constexpr):
        for i in gl.static_range(STAGES - 1):
            _g_issue(tiles, i, phi_base, start + i * BLOCK_S, end, stride_ps, r3, cole3, col_ok3)
        cp.wait_group(STAGES - 2)
        _barrier()
        acc = gl.zeros([NC, BLOCK_M, BLOCK_E], gl.float32, MMA)
        l_el = gl.zeros([BLOCK_M, BLOCK_S], gl.float32, S2)
        mx_el = gl.full([BLOCK_M, BLOCK_S], float("-inf"), gl.float32, S2)
        zero_s = gl.zeros([NC, BLOCK_M, BLOCK_S], gl.float32, MMA)
        t = 0
        for s0 in range(start, end, BLOCK_S):
            cur = tiles.index(t % STAGES)  # landed and visible since the last barrier
            part = mma_v2(q3, cur.permute([0, 2, 1]).load(DB), zero_s)  # (NC, M, BS): each warp its chunk's share
            xbuf.store(part.to(gl.bfloat16))
            _barrier()  # every warp's partial scores are in; every read of the stage refilled below is done
            _g_issue(tiles, (t + STAGES - 1) % STAGES, phi_base, s0 + (STAGES - 1) * BLOCK_S, end, stride_ps, r3,
                     cole3, col_ok3)
            scores = xrows.index(0).load(S2).to(gl.float32)
            for c in gl.static_range(1, NC):  # every warp sums all chunks itself
                scores += xrows.index(c).load(S2).to(gl.float32)
            scores = scores * qk_scale
            cp.wait_group(STAGES - 2)  # the next tile has landed (this thread's copies) ...
            _barrier()  # ... for every thread, and the partial scores may be overwritten
            offs_s = s0 + gl.arange(0, BLOCK_S, layout=gl.SliceLayout(0, S2))
            scores = gl.where(gl.expand_dims(offs_s < end, 0), scores, float("-inf"))
            mx_el = gl.maximum(mx_el, scores)
            if not FIRST_ONLY:
                p = gl.exp2(scores - gl.expand_dims(offset, 1))
                l_el += p
                p3 = gl.expand_dims(p.to(gl.bfloat16), 0) + gl.zeros([NC, BLOCK_M, BLOCK_S], gl.bfloat16, MMA)
                acc = mma_v2(gl.convert_layout(p3, DA), cur.load(DB), acc)  # accumulator -> operand in registers
            t += 1
        cp.wait_group(0)
        _barrier()
        return acc, gl.sum(l_el, axis=1), gl.max(mx_el, axis=1)

    @gluon.jit
    def gluon_partial(Q, PHI, ACC, MAX, SUM, S, split_len, NQ, qk_scale, stride_ps,
                      E: gl.constexpr, NC: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_S: gl.constexpr,
                      BLOCK_E: gl.constexpr, STAGES: gl.constexpr):
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NC, 1, 1], instr_shape=[1, 16, 8])
        DA: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
        DB: gl.constexpr = gl.DotOperandLayout(1, MMA, 2)
        S2: gl.constexpr = gl.SliceLayout(0, MMA)  # (M, BS), every warp all of it
        ROWS: gl.constexpr = gl.SliceLayout(1, S2)
        LD: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 32 * 8 // BLOCK_E, BLOCK_E // 8], [NC, 1, 1], [2, 1, 0])
        pid_s = gl.program_id(0)
        pid_m = gl.program_id(1)
        c_ld = gl.arange(0, NC, layout=gl.SliceLayout(1, gl.SliceLayout(2, LD)))
        e_ld = gl.arange(0, BLOCK_E, layout=gl.SliceLayout(0, gl.SliceLayout(1, LD)))
        cole3 = gl.expand_dims(gl.expand_dims(c_ld, 1), 2) * BLOCK_E + gl.expand_dims(gl.expand_dims(e_ld, 0), 1)
        col_ok3 = cole3 < E
        r3 = gl.expand_dims(gl.expand_dims(gl.arange(0, BLOCK_S, layout=gl.SliceLayout(0, gl.SliceLayout(2, LD))), 0), 2)
        m_q = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, gl.SliceLayout(2, LD)))
        mq3 = gl.expand_dims(gl.expand_dims(m_q, 0), 2)
        qv = gl.load(Q + mq3 * E + cole3, mask=(mq3 < NQ) & col_ok3, other=0.0)
        qs = gl.allocate_shared_memory(gl.bfloat16, [NC, BLOCK_M, BLOCK_E], gl.SwizzledSharedLayout(8, 1, 8, [2, 1, 0]),
                                       qv.to(gl.bfloat16))
        q3 = qs.load(DA)
        tiles = gl.allocate_shared_memory(gl.bfloat16, [STAGES, NC, BLOCK_S, BLOCK_E],
                                          gl.SwizzledSharedLayout(8, 1, 8, [2, 1, 0]))
        xbuf = gl.allocate_shared_memory(gl.bfloat16, [NC, BLOCK_M, BLOCK_S], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0]))
        # the same bytes as NC separate (M, BS) buffers (unswizzled, so both views agree)
        rows_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        if _NEW_API:
            xrows = xbuf.reinterpret(gl.bfloat16, [NC, BLOCK_M, BLOCK_S], rows_layout)
        else:
            xrows = xbuf._reinterpret(gl.bfloat16, [NC, BLOCK_M, BLOCK_S], rows_layout)
        start = pid_s.to(gl.int64) * split_len
        end = gl.minimum(start + split_len, S)
        no_offset = gl.zeros([BLOCK_M], gl.float32, ROWS)
        _a, _l, first = _g_pass(q3, tiles, xbuf, xrows, PHI, start, gl.minimum(start + BLOCK_S, end), no_offset, qk_scale,
                                stride_ps, r3, cole3, col_ok3, NC, BLOCK_M, BLOCK_S, BLOCK_E, STAGES, MMA, S2, DA, DB, True)
        offset = gl.where(first == float("-inf"), 0.0, first)
        acc, l_i, top = _g_pass(q3, tiles, xbuf, xrows, PHI, start, end, offset, qk_scale, stride_ps, r3, cole3,
                                col_ok3, NC, BLOCK_M, BLOCK_S, BLOCK_E, STAGES, MMA, S2, DA, DB, False)
        if gl.max(gl.where(top == float("-inf"), 0.0, gl.abs(top - offset)), axis=0) > MAX_DRIFT:
            offset = gl.where(top == float("-inf"), 0.0, top)
            acc, l_i, top = _g_pass(q3, tiles, xbuf, xrows, PHI, start, end, offset, qk_scale, stride_ps, r3, cole3,
                                    col_ok3, NC, BLOCK_M, BLOCK_S, BLOCK_E, STAGES, MMA, S2, DA, DB, False)
        c_o = gl.arange(0, NC, layout=gl.SliceLayout(1, gl.SliceLayout(2, MMA)))
        m_o = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, gl.SliceLayout(2, MMA)))
        e_o = gl.arange(0, BLOCK_E, layout=gl.SliceLayout(0, gl.SliceLayout(1, MMA)))
        colo = gl.expand_dims(gl.expand_dims(c_o, 1), 2) * BLOCK_E + gl.expand_dims(gl.expand_dims(e_o, 0), 1)
        mo3 = gl.expand_dims(gl.expand_dims(m_o, 0), 2)
        gl.store(ACC + pid_s * NQ * E + mo3 * E + colo, acc, mask=(mo3 < NQ) & (colo < E))
        m_r = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=ROWS)
        gl.store(MAX + pid_s * NQ + m_r, gl.where(l_i > 0, offset, -1.0e30), mask=m_r < NQ)
        gl.store(SUM + pid_s * NQ + m_r, l_i, mask=m_r < NQ)


def launcher(name: str, q: torch.Tensor, phi: torch.Tensor, scale: float, splits: int, cfg: dict):
    """A zero-argument call running variant `name` (partials and merge) on q (1, M, E), phi (1, S, E)."""
    _, nq, e = q.shape
    ctx = phi.shape[1]
    split_len = -(-ctx // splits)
    acc = torch.empty(1, splits, nq, e, device=q.device)
    top, total = torch.empty(1, splits, nq, device=q.device), torch.empty(1, splits, nq, device=q.device)
    grid = (splits, -(-nq // cfg["BLOCK_M"]))
    args = (q[0], phi[0], acc, top, total, ctx, split_len, nq, scale * triton_support.LOG2E, phi.stride(1))
    if name == "transposed":
        def partial():
            transposed_partial[grid](*args, E=e, BLOCK_M=cfg["BLOCK_M"], BLOCK_S=cfg["BLOCK_S"],
                                     num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    else:
        nc = triton.next_power_of_2(-(-e // cfg["BLOCK_E"]))

        def partial():
            gluon_partial[grid](*args, E=e, NC=nc, BLOCK_M=cfg["BLOCK_M"], BLOCK_S=cfg["BLOCK_S"],
                                BLOCK_E=cfg["BLOCK_E"], STAGES=cfg["STAGES"], num_warps=nc)

    def run():
        partial()
        return absorbed_decode.combine(acc, top, total, phi.dtype)

    return run


VARIANTS = {
    "transposed": [dict(BLOCK_M=32, BLOCK_S=32, num_warps=8, num_stages=3), dict(BLOCK_M=16, BLOCK_S=32, num_warps=8, num_stages=3),
                   dict(BLOCK_M=16, BLOCK_S=32, num_warps=4, num_stages=3), dict(BLOCK_M=16, BLOCK_S=16, num_warps=8, num_stages=3)],
    "gluon": [dict(BLOCK_M=16, BLOCK_S=32, BLOCK_E=128, STAGES=2), dict(BLOCK_M=16, BLOCK_S=32, BLOCK_E=128, STAGES=3),
              dict(BLOCK_M=16, BLOCK_S=16, BLOCK_E=128, STAGES=3), dict(BLOCK_M=16, BLOCK_S=16, BLOCK_E=128, STAGES=4)],
}


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    heads, width, scale = 32, 1024, 128**-0.5
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}")
    torch.manual_seed(0)
    for ctx in (126976, 28672, 4096):
        q = torch.randn(1, heads, width, device=dev, dtype=dt)
        phi = torch.randn(1, ctx, width, device=dev, dtype=dt)
        ref = (torch.softmax((q[0].double() * scale) @ phi[0].double().T, -1) @ phi[0].double()).float()
        nbytes = phi.numel() * phi.element_size()
        splits = triton_support.num_splits(ctx, 1, 2, dev)
        t = cuda_graph_ms(lambda: absorbed_decode.fused_attention(q, phi, None, scale=scale, splits=splits))
        print(f"\ncontext {ctx}: the decoding kernel {t * 1000:.1f} us ({nbytes / t / 1e9:.2f} TB/s), {splits} ranges")
        for name, configs in VARIANTS.items():
            if name == "gluon" and gluon is None:
                print("gluon: this Triton has no Gluon")
                continue
            for cfg in configs:
                ranges = triton_support.num_splits(ctx, 1, -(-heads // cfg["BLOCK_M"]), dev)
                try:
                    run = launcher(name, q, phi, scale, ranges, cfg)
                    err = ((run().float()[0] - ref).norm() / ref.norm()).item()
                    t = cuda_graph_ms(run)
                    print(f"{name:10s} {cfg} {ranges} ranges: {t * 1000:.1f} us ({nbytes / t / 1e9:.2f} TB/s), "
                          f"rel err {err:.1e}", flush=True)
                except Exception as ex:  # a configuration that does not fit (shared memory, registers)
                    print(f"{name:10s} {cfg}: {type(ex).__name__}: {str(ex).splitlines()[0][:100]}", flush=True)


if __name__ == "__main__":
    main()
