"""The decode step's memory-bound products on a GPU: the GEMV kernel against cuBLAS, and the split-KV
attention against sdpa, at LLaMA-2-7B shapes (batch 1, bf16).

- projections: one token times the decoder's weights, separate (4096 x 4096, 11008 x 4096,
  4096 x 11008) and packed (q/k/v 12288 x 4096, gate/up 22016 x 4096), through F.linear (cuBLAS)
  and through `decode_ops.gemv` at several block shapes (the first row of each shape is the
  default configuration);
- attention: one query per head (32 heads of 128) over a static cache of the CEPE decoder's
  window (4,352 positions) and of full attention at 128K (131,328), with a boolean mask, through
  sdpa (cuDNN, its choice there) and `decode_ops.kv_attention` at several block shapes.

Every call is timed from a CUDA graph, rotating over enough copies of the weights or caches that
none is served from L2. Relative errors are against float64.

    PYTHONPATH=. python benchmarks/decode_ops.py [--out decode_ops.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from pipeline.bench.device import cuda_graph_ms
from pipeline.fastdecode import decode_ops

GEMV_CONFIGS = [(2, 1024, 4, 3), (4, 512, 4, 3), (8, 512, 8, 3), (16, 256, 4, 3), (16, 256, 4, 1), (4, 1024, 8, 3)]
KV_CONFIGS = [(64, 4, 3, 2), (64, 4, 3, 1), (64, 4, 3, 4), (64, 4, 4, 2), (32, 4, 4, 2), (128, 4, 3, 2), (128, 8, 2, 2),
              (64, 8, 3, 2), (32, 4, 3, 4), (64, 4, 2, 2)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def copies(make, nbytes: int, floor: int = 512 << 20) -> list:
    return [make() for _ in range(max(2, -(-floor // nbytes)))]


def per_call_us(calls: list) -> float:
    def run():
        for call in calls:
            call()
    return cuda_graph_ms(run, repeats=15, inner=2) / len(calls) * 1000.0


def projections(dev, dt) -> list[dict]:
    rows = []
    for n, k in [(4096, 4096), (12288, 4096), (11008, 4096), (22016, 4096), (4096, 11008)]:
        nbytes = n * k * 2
        ws = copies(lambda: torch.randn(n, k, device=dev, dtype=dt) * 0.02, nbytes)
        x = torch.randn(1, k, device=dev, dtype=dt)
        ref = x.double() @ ws[0].double().T
        row = {"N": n, "K": k, "MB": round(nbytes / 1e6, 1)}
        row["cublas_us"] = round(per_call_us([lambda w=w: F.linear(x, w) for w in ws]), 2)
        row["cublas_rel_err"] = rel(F.linear(x, ws[0]), ref)
        default = decode_ops.gemv_config(n, k)
        configs = [(default["BLOCK_N"], default["BLOCK_K"], default["num_warps"], default["num_stages"])]
        configs += [c for c in GEMV_CONFIGS if c != configs[0]]
        row["gemv"] = []
        for bn, bk, nw, ns in configs:
            cfg = dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
            err = rel(decode_ops.gemv(x, ws[0], cfg), ref)
            us = per_call_us([lambda w=w: decode_ops.gemv(x, w, cfg) for w in ws])
            row["gemv"].append({"config": [bn, bk, nw, ns], "us": round(us, 2), "TB_s": round(nbytes / us / 1e6, 2), "rel_err": err})
        print(json.dumps(row), flush=True)
        rows.append(row)
        del ws
    return rows


def attention(dev, dt) -> list[dict]:
    rows = []
    heads, d, scale = 32, 128, 128**-0.5
    for length in (4352, 131328):
        nbytes = 2 * heads * length * d * 2
        kvs = copies(lambda: (torch.randn(1, heads, length, d, device=dev, dtype=dt),
                              torch.randn(1, heads, length, d, device=dev, dtype=dt)), nbytes, floor=256 << 20)
        q = torch.randn(1, heads, 1, d, device=dev, dtype=dt)
        mask = torch.zeros(1, length, dtype=torch.bool, device=dev)
        mask[:, : length - 300] = True  # the static cache's unwritten tail
        mask4 = mask[:, None, None, :]
        k0, v0 = kvs[0]
        probs = torch.softmax((q.double() @ k0.double().transpose(-1, -2) * scale).masked_fill(~mask4, float("-inf")), -1)
        ref = (probs @ v0.double()).transpose(1, 2)  # (1, 1, H, D)
        row = {"length": length, "MB": round(nbytes / 1e6, 1)}
        row["sdpa_us"] = round(per_call_us([lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask4, scale=scale)
                                            for k, v in kvs]), 2)
        row["sdpa_rel_err"] = rel(F.scaled_dot_product_attention(q, k0, v0, attn_mask=mask4, scale=scale).transpose(1, 2), ref)
        default = decode_ops.kv_config()
        first = (default["BLOCK_S"], default["num_warps"], default["num_stages"], default["waves"])
        configs = [first] + [c for c in KV_CONFIGS if c != first]
        row["kv"] = []
        for bs, nw, ns, waves in configs:
            cfg = dict(BLOCK_S=bs, num_warps=nw, num_stages=ns, waves=waves)
            err = rel(decode_ops.kv_attention(q, k0, v0, mask, scale, config=cfg), ref)
            us = per_call_us([lambda k=k, v=v: decode_ops.kv_attention(q, k, v, mask, scale, config=cfg) for k, v in kvs])
            row["kv"].append({"config": [bs, nw, ns, waves], "us": round(us, 2), "TB_s": round(nbytes / us / 1e6, 2), "rel_err": err})
        print(json.dumps(row), flush=True)
        rows.append(row)
        del kvs
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", choices=("attention", "projections"), default=None)
    args = ap.parse_args()
    import triton

    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(json.dumps(report), flush=True)
    if args.only != "projections":
        report["attention"] = attention(dev, dt)
    if args.only != "attention":
        report["projections"] = projections(dev, dt)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
