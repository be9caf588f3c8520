"""The projected form's head-grouped K/V (bounded memory without autograd) gives the same
cross-attention output as projecting all heads at once, and as the absorbed form."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.cross_attention import CepeCrossAttention


def _layer(seed: int = 0) -> CepeCrossAttention:
    torch.manual_seed(seed)
    layer = CepeCrossAttention(hidden_size=64, encoder_hidden_size=32, num_heads=4, head_dim=16, norm=torch.nn.RMSNorm(64))
    for proj in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj):
        torch.nn.init.normal_(proj.weight, std=0.2)
    return layer.eval()


@pytest.mark.parametrize("max_bytes, groups", [(2 * 2 * 50 * 16 * 4, 4), (2 * 2 * 2 * 50 * 16 * 4, 2), (10**12, 1)])
@pytest.mark.parametrize("padded", [False, True])
def test_grouped_projection_equals_one_projection_and_absorbed(monkeypatch, max_bytes, groups, padded):
    layer = _layer()
    hidden = torch.randn(2, 3, 64)
    phi = torch.randn(2, 50, 32)
    mask = None
    if padded:
        mask = torch.ones(2, 50, dtype=torch.bool)
        mask[1, 30:] = False
    with torch.enable_grad():  # with autograd, all heads at once (what training saves anyway)
        reference = layer(hidden, phi, mask, form="projected").detach()
    calls = []
    real = CepeCrossAttention._attend

    def counting(self, q, k, v, key_mask, scale):
        calls.append(q.shape[1])
        return real(self, q, k, v, key_mask, scale)

    monkeypatch.setattr(CepeCrossAttention, "PROJECTED_KV_MAX_BYTES", max_bytes)
    monkeypatch.setattr(CepeCrossAttention, "_attend", counting)
    with torch.no_grad():
        grouped = layer(hidden, phi, mask, form="projected")
        absorbed = layer(hidden, phi, mask, form="absorbed")
    assert len(calls) == groups and sum(calls) == 4  # the heads, split into `groups` groups
    torch.testing.assert_close(grouped, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(absorbed, reference, rtol=1e-4, atol=1e-5)
