"""The one-pass absorbed decode kernel gives the same attention as the matmul path.

Both kernels (per-range partial sums, and their merge) run under Triton's interpreter (CPU) when
Triton is installed, and compiled on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pipeline.model import absorbed_decode
from pipeline.model.cross_attention import CepeCrossAttention


def reference(q: torch.Tensor, phi: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scores = q.double() @ phi.double().transpose(1, 2)  # (B, M, S)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ phi.double()


def torch_partials(q, phi, mask, splits):
    """What the partial kernel computes per context range (running max in log2 units)."""
    bsz, nq, e = q.shape
    size = -(-phi.shape[1] // splits)
    acc = torch.zeros(bsz, splits, nq, e, dtype=torch.float64)
    top = torch.full((bsz, splits, nq), -1.0e30, dtype=torch.float64)
    total = torch.zeros(bsz, splits, nq, dtype=torch.float64)
    for j in range(splits):
        part = phi[:, j * size : (j + 1) * size].double()
        scores = q.double() @ part.transpose(1, 2)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, j * size : (j + 1) * size], float("-inf"))
        m = torch.maximum(scores.amax(-1) * absorbed_decode.LOG2E, torch.tensor(-1.0e30, dtype=torch.float64))
        p = torch.exp2(scores * absorbed_decode.LOG2E - m[..., None])
        acc[:, j], top[:, j], total[:, j] = p @ part, m, p.sum(-1)
    return acc, top, total


def test_kernel_is_not_used_where_it_cannot_apply(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("CEPE_FUSED_DECODE", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not absorbed_decode.usable(gpu, 32)  # opt-in
    monkeypatch.setenv("CEPE_FUSED_DECODE", "1")
    assert not absorbed_decode.usable(cpu, 32)  # no GPU
    assert not absorbed_decode.usable(gpu, absorbed_decode.MAX_QUERIES + 1)
    with torch.enable_grad():
        assert not absorbed_decode.usable(gpu, 32, requires_grad=True)  # no backward in the kernel
    if absorbed_decode.triton_available():
        assert absorbed_decode.usable(gpu, 32)  # enabled, a GPU, few queries, no gradient


INTERPRETED = textwrap.dedent(
    """
    import torch
    from pipeline.model import absorbed_decode
    from tests.test_absorbed_decode import reference, torch_partials
    torch.manual_seed(0)
    # (B, M, S, E, masked, splits): several ranges, a partial last tile, E not a power of two,
    # fewer queries than a block, ranges with no valid key
    for bsz, nq, ctx, e, masked, splits in [(1, 32, 300, 64, False, 3), (2, 20, 257, 48, True, 4), (2, 5, 100, 24, True, 7)]:
        q, phi = torch.randn(bsz, nq, e), torch.randn(bsz, ctx, e)
        mask = None
        if masked:
            mask = torch.rand(bsz, ctx) > 0.3
            mask[1, : ctx // 2] = False
        for block_e in (16, 8):
            config = dict(absorbed_decode.default_config(e), BLOCK_E=block_e)
            acc, top, total = absorbed_decode.partials(q, phi, mask, splits, scale=0.5, config=config)
            want = torch_partials(0.5 * q, phi, mask, splits)
            for got, ref in zip((acc, top, total), want):
                torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
            out = absorbed_decode.fused_attention(q, phi, mask, scale=0.5, splits=splits, config=config)
            torch.testing.assert_close(out.double(), reference(0.5 * q, phi, mask), rtol=1e-4, atol=1e-4)
    # the blocked softmax of the two-matmul path: several blocks, a partial last one, masked
    # blocks, two batches sharing rows
    for bsz, rows, n, masked in [(1, 3, 200, False), (2, 4, 333, True)]:
        scores = torch.randn(bsz, rows, n) * 4
        mask = None
        if masked:
            mask = torch.rand(bsz, n) > 0.5
            mask[1, :150] = False  # whole blocks without a valid key
        probs = absorbed_decode.row_softmax(scores, 0.7, mask)
        want = (0.7 * scores.double()).masked_fill(~mask[:, None], float("-inf")) if masked else 0.7 * scores.double()
        torch.testing.assert_close(probs.double(), torch.softmax(want, -1), rtol=1e-5, atol=1e-6)
    print("ok")
    """
)


# The interpreter is the CPU stand-in; where a GPU is present the compiled kernel is tested below
# (Triton 3.6's interpreter also fails on numpy 2.5 before reaching the kernel's arithmetic).
@pytest.mark.skipif(not absorbed_decode.triton_available() or torch.cuda.is_available(),
                    reason="needs Triton and no GPU (the GPU tests cover the compiled kernel)")
def test_kernel_under_triton_interpreter_matches_reference():
    env = dict(os.environ, TRITON_INTERPRET="1", CEPE_FUSED_DECODE="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and absorbed_decode.triton_available()), reason="needs CUDA and Triton"
)


@needs_gpu
@pytest.mark.parametrize("enc_width", [1024, 576])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_decode_equals_matmul_path_on_gpu(enc_width, padded, monkeypatch):
    monkeypatch.setenv("CEPE_FUSED_DECODE", "1")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    norm = torch.nn.RMSNorm(512, eps=1e-5)
    layer = CepeCrossAttention(512, enc_width, num_heads=8, head_dim=64, norm=norm).to(dev, torch.bfloat16).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    hidden = torch.randn(3, 1, 512, device=dev, dtype=torch.bfloat16)
    phi = torch.randn(3, 20_000, enc_width, device=dev, dtype=torch.bfloat16)
    mask = None
    if padded:
        mask = torch.ones(3, 20_000, dtype=torch.bool, device=dev)
        mask[0, 7_000:] = False
        mask[2, :19_000] = False
    with torch.no_grad():
        fused = layer(hidden, phi, mask, form="absorbed")
        matmul = layer(hidden, phi, mask, form="absorbed_matmul")
        projected = layer(hidden, phi, mask, form="projected")
    torch.testing.assert_close(fused.float(), matmul.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused.float(), projected.float(), rtol=2e-2, atol=2e-2)
