"""The encoder pass over a long context, eager against `torch.compile`d layers.

The paper's encoder shape (435M) from the `cepe-435m` preset, random
weights, bf16, over `--context` tokens in 256-token chunks encoded `--chunk-batch` at a time, as
`cepe bench` runs it. Prints the time of each (median of repeats after warm-up, the compile in
the warm-up), the matmul TFLOP/s they reach, and the largest difference between their outputs.
    PYTHONPATH=. python benchmarks/encoder_compile.py [--context 126976] [--chunk-batch 64]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from pipeline.bench import costs
from pipeline.bench.device import cuda_median_ms
from pipeline.bench.presets import encoder_config
from pipeline.model import CepeEncoder


def time_s(fn, repeats: int = 5) -> float:
    return cuda_median_ms(fn, repeats=repeats, warmup=0) / 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=126976)
    ap.add_argument("--chunk-len", type=int, default=256)
    ap.add_argument("--chunk-batch", type=int, default=64)
    ap.add_argument("--encoder", default="cepe-435m")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    config = encoder_config(args.encoder, decoder_vocab_size=32000)
    torch.manual_seed(0)
    eager = CepeEncoder(config).to(dev, dt).eval()
    compiled = copy.deepcopy(eager)
    compiled.compile_layers()
    n = args.context // args.chunk_len
    ids = torch.randint(3, 32000, (1, n, args.chunk_len), device=dev)
    flops = costs.encoder_flops(costs.Shape.of(config), n, args.chunk_len)
    with torch.inference_mode():
        run_e = lambda: eager.encode_chunks(ids, chunk_batch_size=args.chunk_batch)[0]  # noqa: E731
        run_c = lambda: compiled.encode_chunks(ids, chunk_batch_size=args.chunk_batch)[0]  # noqa: E731
        out_e = run_e()
        start = time.perf_counter()
        out_c = run_c()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        run_c()
        diff = (out_e.float() - out_c.float()).abs().max().item()
        te, tc = time_s(run_e), time_s(run_c)
    print(f"encoder {args.encoder}: {n} chunks x {args.chunk_len}, {args.chunk_batch} per call, {flops / 1e15:.3f} PFLOP")
    print(f"eager    {te * 1000:8.1f} ms  {flops / te / 1e12:6.0f} TFLOP/s")
    print(f"compiled {tc * 1000:8.1f} ms  {flops / tc / 1e12:6.0f} TFLOP/s  (first call incl. compile {compile_s:.1f} s)")
    print(f"max |eager - compiled| {diff:.3g} (output scale {out_e.float().abs().max().item():.3g})")


if __name__ == "__main__":
    main()
