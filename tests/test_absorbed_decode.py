"""The one-pass absorbed decode kernel gives the same attention as the matmul path.

Both kernels (per-range partial sums, and their merge) run under Triton's interpreter (CPU) when
Triton is installed, and compiled on a GPU.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pipeline.errors import CepeError
from pipeline.fastdecode import absorbed_decode, settings, triton_support
from pipeline.model.cross_attention import CepeCrossAttention


def reference(q: torch.Tensor, phi: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scores = q.double() @ phi.double().transpose(1, 2)  # (B, M, S)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ phi.double()


def torch_ranges(q, phi, mask, splits):
    """Per context range: its own attention output (B, splits, M, E) and log2 of its softmax mass,
    log2 sum 2^(score log2 e) (B, splits, M); -inf mass where a range has no valid key."""
    bsz, nq, e = q.shape
    size = -(-phi.shape[1] // splits)
    out = torch.zeros(bsz, splits, nq, e, dtype=torch.float64)
    mass = torch.full((bsz, splits, nq), float("-inf"), dtype=torch.float64)
    for j in range(splits):
        part = phi[:, j * size : (j + 1) * size].double()
        scores = (q.double() @ part.transpose(1, 2)) * triton_support.LOG2E
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, j * size : (j + 1) * size], float("-inf"))
        has_key = torch.isfinite(scores).any(-1)  # (B, M)
        mass[:, j] = torch.where(has_key, torch.logsumexp(scores * math.log(2), -1) / math.log(2), mass[:, j])
        probs = torch.softmax(scores.masked_fill(~has_key[..., None], 0.0) * math.log(2), -1)
        out[:, j] = torch.where(has_key[..., None], probs @ part, 0.0)
    return out, mass


def check_partials(acc, offset, total, q, phi, mask, splits):
    """What the partial kernel writes, against `torch_ranges`: acc / total is the range's output,
    offset + log2(total) its mass; a range without a valid key sums to 0 with offset -1e30."""
    out, mass = torch_ranges(q, phi, mask, splits)
    has_key = torch.isfinite(mass)
    assert torch.all(total[~has_key] == 0) and torch.all(offset[~has_key] == -1.0e30)
    torch.testing.assert_close(acc.double()[has_key] / total.double()[has_key][:, None], out[has_key], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(offset.double()[has_key] + torch.log2(total.double()[has_key]), mass[has_key],
                               rtol=1e-4, atol=1e-4)


def test_kernel_is_used_where_it_applies_and_pays(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    long, short = absorbed_decode.FUSED_MIN_CONTEXT, absorbed_decode.FUSED_MIN_CONTEXT - 1
    monkeypatch.setattr(settings, "_CURRENT", settings.DecodeSettings())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not absorbed_decode.usable(cpu, 32, long)  # no GPU
    assert not absorbed_decode.usable(gpu, absorbed_decode.MAX_QUERIES + 1, long)  # many queries: matmuls
    assert not absorbed_decode.usable(gpu, 32, short)  # a short context: the matmuls are as fast
    with torch.enable_grad():
        assert not absorbed_decode.usable(gpu, 32, long, requires_grad=True)  # no backward in the kernel
    triton = triton_support.triton_available()
    assert absorbed_decode.usable(gpu, 32, long) == triton  # the default on a GPU over a long context
    with settings.using(fused="on"):
        assert absorbed_decode.usable(gpu, 32, short) == triton  # forced on
        assert not absorbed_decode.usable(cpu, 32, long)
    with settings.using(fused="off"):
        assert not absorbed_decode.usable(gpu, 32, long)  # forced off
    assert absorbed_decode.usable(gpu, 32, long) == triton  # restored after the block


def test_environment_sets_the_default_once():
    assert settings.from_environment({"CEPE_FUSED_DECODE": "1"}) == settings.DecodeSettings(fused="on")
    assert settings.from_environment({"CEPE_FUSED_DECODE": "0", "CEPE_DECODE_KERNELS": "0"}) == \
        settings.DecodeSettings(fused="off", kernels=False)
    assert settings.from_environment({"CEPE_FUSED_DECODE": "yes"}) == settings.DecodeSettings()
    with pytest.raises(CepeError, match="fused decode: expected one of auto, on, off"):
        settings.configure(fused="always")


INTERPRETED = textwrap.dedent(
    """
    import torch
    from pipeline.fastdecode import absorbed_decode
    from tests.test_absorbed_decode import check_partials, reference
    torch.manual_seed(0)
    # (B, M, S, E, masked, splits, rise): several ranges, a partial last tile, E not a power of two,
    # fewer queries than a block, ranges with no valid key or whose first tile has none; `rise`
    # lifts the scores past each range's first tiles far above their max (the range is redone)
    cases = [(1, 32, 300, 64, False, 3, 0.0), (2, 20, 257, 48, True, 4, 0.0), (2, 5, 100, 24, True, 7, 0.0),
             (1, 16, 200, 32, False, 2, 120.0)]
    for bsz, nq, ctx, e, masked, splits, rise in cases:
        q, phi = torch.randn(bsz, nq, e), torch.randn(bsz, ctx, e)
        if rise:
            late = (torch.arange(ctx) % -(-ctx // splits)) >= 40  # past the first tiles of each range
            phi[:, late] += rise / e ** 0.5 * q.mean(1, keepdim=True).sign()
        mask = None
        if masked:
            mask = torch.rand(bsz, ctx) > 0.3
            mask[1, : ctx // 2] = False
        for block_e in (16, 8):
            config = dict(absorbed_decode.default_config(e), BLOCK_E=block_e)
            acc, offset, total = absorbed_decode.partials(q, phi, mask, splits, scale=0.5, config=config)
            check_partials(acc, offset, total, 0.5 * q, phi, mask, splits)
            if rise:  # the scores rose by far more than the drift allowed: the offsets are the ranges' maxima
                assert (offset.max() > 64.0) and torch.isfinite(acc).all()
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
@pytest.mark.skipif(not triton_support.triton_available() or torch.cuda.is_available(),
                    reason="needs Triton and no GPU (the GPU tests cover the compiled kernel)")
def test_kernel_under_triton_interpreter_matches_reference():
    env = dict(os.environ, TRITON_INTERPRET="1", CEPE_FUSED_DECODE="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_support.triton_available()), reason="needs CUDA and Triton"
)


@needs_gpu
@pytest.mark.parametrize("enc_width", [1024, 576])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_decode_equals_matmul_path_on_gpu(enc_width, padded, monkeypatch):
    monkeypatch.setattr(settings, "_CURRENT", settings.DecodeSettings(fused="on"))
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
