"""Every path of the absorbed cross-attention and of the one-token GEMV, under every decode setting,
against the plain torch computation: which path each setting allows, and that all agree.

On a GPU with Triton the one-pass kernel, the blocked softmax and the GEMV run; elsewhere the
torch fallbacks do (the same numbers, the kernels reported as not allowed). Run:

    PYTHONPATH=. python benchmarks/fastdecode_paths.py [--context 40000]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from pipeline.fastdecode import absorbed_decode, decode_ops, settings, triton_support
from pipeline.model.cross_attention import CepeCrossAttention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=40_000, help="encoder states per sequence")
    args = ap.parse_args()
    ctx = args.context
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    print(f"device {dev}, Triton {triton_support.triton_available()}, kernels run "
          f"{triton_support.kernels_run(dev, False)}, {settings.current()}")
    torch.manual_seed(0)
    layer = CepeCrossAttention(512, 1024, num_heads=8, head_dim=64, norm=torch.nn.RMSNorm(512, eps=1e-5)).to(dev, dt).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    h = torch.randn(3, 1, 512, device=dev, dtype=dt)
    phi = torch.randn(3, ctx, 1024, device=dev, dtype=dt)
    mask = torch.ones(3, ctx, dtype=torch.bool, device=dev)
    mask[0, ctx // 6:] = False  # a short context
    mask[2, : ctx - ctx // 40] = False  # real tokens at the end only
    with torch.no_grad():
        ref = layer(h, phi, mask, form="projected").float()
        for fused in settings.FUSED_MODES:
            with settings.using(fused=fused):
                allowed = absorbed_decode.usable(dev, layer.num_heads, ctx)
                for form in ("absorbed", "absorbed_matmul", None):
                    out = layer(h, phi, mask, form=form).float()
                    err = ((out - ref).abs().max() / ref.abs().max()).item()
                    print(f"fused={fused:4} kernel allowed={allowed!s:5} form={form or 'auto':15} "
                          f"max error / max |projected| = {err:.2e}")
                    assert err < 3e-2, (fused, form, err)
        x = torch.randn(1, 1, 4096, device=dev, dtype=dt)
        w = torch.randn(4096, 4096, device=dev, dtype=dt)
        want = F.linear(x.float(), w.float())
        for kernels in (True, False):
            with settings.using(kernels=kernels):
                got = decode_ops.linear(x, w).float()
                err = ((got - want).abs().max() / want.abs().max()).item()
                print(f"kernels={kernels!s:5} GEMV used={decode_ops.gemv_usable(x, w)!s:5} error {err:.2e}")
                assert err < 3e-2, (kernels, err)
    print("all paths agree")


if __name__ == "__main__":
    main()
