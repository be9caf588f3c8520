"""Time one cross-attention layer, projected vs absorbed, for a decode step and a prefill.

LLaMA-2-7B shapes (32 heads x 128, hidden 4096) over the paper's encoder width (1024), bf16.
The absorbed form is timed with its fused one-pass decode kernel (`absorbed`: this script turns
the kernel forced on (`settings.configure(fused="on")`); the kernel serves up to 64 queries) and as two matmuls (`absorbed_matmul`). For one query the
table also gives the bandwidth the layer reaches, counting the encoder states read once and the
layer's weights. Prints a table; used to choose `absorbed_min_context` (cross_attention.py).
    PYTHONPATH=. python benchmarks/cross_attention_forms.py
"""

from __future__ import annotations


import torch

from pipeline.bench.device import cuda_median_ms as time_ms
from pipeline.fastdecode import settings
from pipeline.model.cross_attention import CepeCrossAttention


def main() -> None:
    settings.configure(fused="on")
    dev, dt = "cuda", torch.bfloat16
    norm = torch.nn.RMSNorm(4096).to(dev, dt)
    xattn = CepeCrossAttention(4096, 1024, 32, 128, norm).to(dev, dt)
    for w in (xattn.q_proj, xattn.k_proj, xattn.v_proj, xattn.o_proj):
        torch.nn.init.normal_(w.weight, std=0.02)
    weight_bytes = sum(p.numel() * p.element_size() for p in xattn.parameters())
    print(f"{'queries':>8} {'context':>8} {'projected ms':>13} {'absorbed_matmul ms':>19} {'absorbed ms':>12} "
          f"{'rel diff':>9} {'rel diff fused':>15} {'fused TB/s':>11}")
    with torch.no_grad():
        for q_len in (1, 16, 4096):
            for ctx in (1024, 4096, 28672, 126976):
                h = torch.randn(1, q_len, 4096, device=dev, dtype=dt)
                phi = torch.randn(1, ctx, 1024, device=dev, dtype=dt)
                a = xattn(h, phi, form="projected")
                b = xattn(h, phi, form="absorbed_matmul")
                c = xattn(h, phi, form="absorbed")
                rel = ((a.float() - b.float()).norm() / a.float().norm()).item()
                rel_fused = ((b.float() - c.float()).norm() / b.float().norm()).item()
                tp = time_ms(lambda: xattn(h, phi, form="projected"))
                tm = time_ms(lambda: xattn(h, phi, form="absorbed_matmul"))
                ta = time_ms(lambda: xattn(h, phi, form="absorbed"))
                tbs = (phi.numel() * phi.element_size() + weight_bytes) / (ta / 1000) / 1e12
                print(f"{q_len:>8} {ctx:>8} {tp:>13.3f} {tm:>19.3f} {ta:>12.3f} {rel:>9.1e} {rel_fused:>15.1e} {tbs:>11.2f}")


if __name__ == "__main__":
    main()
