"""Where a CEPE prefill's memory goes above its weights and what it keeps.

Builds the bench's CEPE side (LLaMA-2-7B-shaped decoder + the 435M encoder, random weights,
bf16), runs one prefill of `--total` tokens, and reports for each part (each encoder layer, and
per decoder layer its self-attention, cross-attention and MLP) the largest transient it
allocated above what was resident when it started, plus the prefill's peak, what it keeps (KV
cache + encoder states) and its transient overall (peak - weights - kept).
    PYTHONPATH=. python benchmarks/prefill_memory.py [--total 131072]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from pipeline.bench.device import Clock
from pipeline.bench.presets import decoder_config, encoder_config
from pipeline.bench.sides import Cepe
from pipeline.bench.split import Split

GB = 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--total", type=int, default=131072)
    ap.add_argument("--decoder-len", type=int, default=4096)
    ap.add_argument("--chunk-batch", type=int, default=64)
    args = ap.parse_args()
    dev = torch.device("cuda")
    dec = decoder_config("llama-2-7b")
    dec._attn_implementation = "sdpa"
    side = Cepe(dec, encoder_config("cepe-435m", dec.vocab_size), dev, torch.bfloat16, encoder_chunk_batch=args.chunk_batch)
    split = Split.of(args.total, args.decoder_len, 256)
    peaks: dict[str, float] = defaultdict(float)
    starts: dict[int, int] = {}

    def pre():
        def hook(module, *_):
            torch.cuda.synchronize()
            starts[id(module)] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        return hook

    def post(name):
        def hook(module, *_):
            torch.cuda.synchronize()
            peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() - starts[id(module)])
        return hook

    model = side.model
    parts = [("encoder layer", layer) for layer in model.encoder.layers]
    for layer in model.decoder.model.layers:
        parts += [("self-attention", layer.self_attn), ("mlp", layer.mlp)]
        if getattr(layer, "cross_attn", None) is not None:
            parts.append(("cross-attention", layer.cross_attn))
    parts.append(("lm_head", model.decoder.lm_head))
    for name, module in parts:
        module.register_forward_pre_hook(pre())
        module.register_forward_hook(post(name))
    weights = torch.cuda.memory_allocated()
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():  # per-part transients (each hook resets the peak counter) ...
        prefill = side.prefill(split, 1, Clock(dev), gen)
        torch.cuda.synchronize()
    kept = side.state_bytes(prefill)
    del prefill
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():  # ... then the whole prefill's peak, without hooks
        for _, module in parts:
            module._forward_pre_hooks.clear()
            module._forward_hooks.clear()
        prefill = side.prefill(split, 1, Clock(dev), gen)
        torch.cuda.synchronize()
        overall = torch.cuda.max_memory_allocated()
    print(f"CEPE prefill, total {args.total}: {split.context_tokens} encoder + {split.decoder_tokens} decoder tokens, "
          f"{args.chunk_batch} chunks per encoder call")
    print(f"weights {weights / GB:.3f} GB; kept (KV cache + encoder states) {kept / GB:.3f} GB; "
          f"peak {overall / GB:.3f} GB; transient {(overall - weights - kept) / GB:.3f} GB")
    for name, value in sorted(peaks.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<16} largest transient {value / GB:.3f} GB")


if __name__ == "__main__":
    main()
