"""Block sizes of the one-pass absorbed decode kernel, timed against the two matmuls it replaces.

One decode step's cross-attention core at LLaMA-2-7B shapes: 32 absorbed queries (one per head)
of the paper's encoder width (1024) over S encoder states, bf16, batch 1. For every kernel
configuration (query rows, context rows and encoder columns per block, warps, pipeline stages)
and programs per multiprocessor (`waves`), the partial-sum kernel and the merge are timed
together from a CUDA graph, and the result is compared with the matmul path. Bandwidth counts
one read of phi. The two matmuls are timed with torch's softmax and with the blocked softmax
decoding uses. Then the whole cross-attention layer (norm, projections, the absorbed query,
the attention, W_v, W_o) is timed both ways.

    PYTHONPATH=. python benchmarks/absorbed_kernel_sweep.py [--out sweep.json] [--layer-only]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline.bench.device import cuda_graph_ms
from pipeline.fastdecode import absorbed_decode, settings, triton_support
from pipeline.model.cross_attention import CepeCrossAttention

# (BLOCK_M, BLOCK_S, BLOCK_E, num_warps, num_stages)
CONFIGS = [  # around the default (16, 32, 128, 8, 3): one warp per 128 encoder columns
    (16, 32, 128, 8, 3), (16, 32, 128, 8, 2), (16, 16, 128, 8, 3), (16, 16, 128, 8, 4), (32, 16, 128, 8, 3),
    (32, 32, 128, 8, 2),
]
WAVES = (1, 2)


def matmul_path(q, phi, scale):
    """The two matmuls with torch's softmax (one block per row)."""
    scores = torch.matmul(q * scale, phi.transpose(1, 2))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(phi.dtype)
    return torch.matmul(probs, phi)


def blocked_path(q, phi, scale):
    """The two matmuls with the blocked softmax (what decoding runs on a GPU)."""
    probs = absorbed_decode.row_softmax(torch.matmul(q, phi.transpose(1, 2)), scale)
    return torch.matmul(probs, phi)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--contexts", default="126976,28672")
    ap.add_argument("--layer-only", action="store_true", help="skip the kernel configurations")
    args = ap.parse_args()
    settings.configure(fused="on")
    dev, dt = torch.device("cuda"), torch.bfloat16
    heads, width, scale = 32, 1024, 128**-0.5
    rows = []
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    for ctx in (int(c) for c in args.contexts.split(",")):
        q = torch.randn(1, heads, width, device=dev, dtype=dt)
        phi = torch.randn(1, ctx, width, device=dev, dtype=dt)
        phi_bytes = phi.numel() * phi.element_size()
        ref = matmul_path(q, phi, scale).float()
        t_mm = cuda_graph_ms(lambda: matmul_path(q, phi, scale))
        t_bl = cuda_graph_ms(lambda: blocked_path(q, phi, scale))
        t_one = cuda_graph_ms(lambda: torch.matmul(q, phi.transpose(1, 2)))
        err_bl = ((blocked_path(q, phi, scale).float() - ref).norm() / ref.norm()).item()
        print(f"\ncontext {ctx}: two matmuls + torch softmax {t_mm * 1000:.1f} us ({2 * phi_bytes / t_mm / 1e9:.2f} TB/s "
              f"for two reads); + blocked softmax {t_bl * 1000:.1f} us (rel diff {err_bl:.1e}); scores matmul alone {t_one * 1000:.1f} us")
        rows.append(dict(context=ctx, config="matmul_blocked_softmax", us=t_bl * 1000, rel_err=err_bl))
        rows.append(dict(context=ctx, config="scores_matmul", us=t_one * 1000))
        if args.layer_only:
            continue
        print(f"{'M':>3} {'S':>3} {'E':>4} {'warps':>5} {'stages':>6} {'waves':>5} {'splits':>6} {'us':>8} {'TB/s':>6} {'rel err':>8}  note")
        rows.append(dict(context=ctx, config="matmul", us=t_mm * 1000))
        for bm, bs, be, w, st in CONFIGS:
            cfg = dict(BLOCK_M=bm, BLOCK_S=bs, BLOCK_E=be, num_warps=w, num_stages=st)
            for waves in WAVES:
                splits = triton_support.num_splits(ctx, 1, -(-heads // bm), dev, waves=waves)
                note = ""
                try:
                    t0 = time.perf_counter()
                    out = absorbed_decode.fused_attention(q, phi, None, scale=scale, splits=splits, config=cfg)
                    torch.cuda.synchronize()
                    compile_s = time.perf_counter() - t0
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    t = cuda_graph_ms(lambda: absorbed_decode.fused_attention(q, phi, None, scale=scale, splits=splits, config=cfg))
                    note = f"first call {compile_s:.1f} s" if waves == WAVES[0] else ""
                except Exception as ex:  # a configuration that does not fit (shared memory, registers)
                    t, err, note = float("nan"), float("nan"), f"{type(ex).__name__}: {str(ex).splitlines()[0][:80]}"
                rows.append(dict(context=ctx, config=[bm, bs, be, w, st], waves=waves, splits=splits, us=t * 1000, rel_err=err))
                print(f"{bm:>3} {bs:>3} {be:>4} {w:>5} {st:>6} {waves:>5} {splits:>6} {t * 1000:>8.1f} "
                      f"{phi_bytes / t / 1e9:>6.2f} {err:>8.1e}  {note}", flush=True)
        del phi, q
    # whole layer, default configuration
    norm = torch.nn.RMSNorm(4096).to(dev, dt)
    layer = CepeCrossAttention(4096, width, heads, 128, norm).to(dev, dt).eval()
    for lin in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj):
        torch.nn.init.normal_(lin.weight, std=0.02)
    print(f"\nwhole cross-attention layer, default configuration {absorbed_decode.default_config(width)}")
    with torch.no_grad():
        for ctx in (int(c) for c in args.contexts.split(",")):
            h = torch.randn(1, 1, 4096, device=dev, dtype=dt)
            phi = torch.randn(1, ctx, width, device=dev, dtype=dt)
            fused = layer(h, phi, form="absorbed").float()
            mm = layer(h, phi, form="absorbed_matmul").float()
            t_f = cuda_graph_ms(lambda: layer(h, phi, form="absorbed"))
            t_m = cuda_graph_ms(lambda: layer(h, phi, form="absorbed_matmul"))
            err = ((fused - mm).norm() / mm.norm()).item()
            rows.append(dict(context=ctx, layer=True, fused_us=t_f * 1000, matmul_us=t_m * 1000, rel_diff=err))
            print(f"context {ctx}: fused {t_f * 1000:.1f} us, two matmuls {t_m * 1000:.1f} us, rel diff {err:.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
