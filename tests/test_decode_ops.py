"""Decoding's packed projections and kernels give the same model.

- Packing (`decode_packing`) keeps every family's logits and cached steps, and unpacking restores
  the state dict exactly (CPU, always run).
- Off a GPU every `decode_ops` entry point is the plain torch computation it replaces.
- The kernels (GEMV, gated GEMV, per-head products, split-KV attention) match float64 references
  under Triton's interpreter (CPU with Triton) and compiled on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from pipeline.fastdecode import decode_ops, settings, triton_support
from pipeline.fastdecode.decode_packing import DecodeLinear, pack_for_decoding, unpack_for_decoding
from pipeline.model.cepe import CACHE_KW
from tests.conftest import tiny_cepe, tiny_decoder


def _cache(out):
    return getattr(out, "cache", None) or out.past_key_values


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_packing_keeps_logits_and_restores_the_state_dict(family):
    model = tiny_decoder(family)
    for p in model.parameters():  # qwen2's q/k/v biases are zero at init: make them count
        if p.dim() == 1:
            torch.nn.init.normal_(p, std=0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, 100, (2, 11))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        step = model(ids[:, :1], **{CACHE_KW: _cache(out)})
        assert pack_for_decoding(model) == {"attention": 2, "mlp": 2}
        assert pack_for_decoding(model) == {"attention": 0, "mlp": 0}  # idempotent
        packed = model(ids, use_cache=True)
        packed_step = model(ids[:, :1], **{CACHE_KW: _cache(packed)})
    torch.testing.assert_close(packed.logits, out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_step.logits, step.logits, rtol=1e-5, atol=1e-5)
    keys = model.state_dict().keys()
    assert "model.layers.0.self_attn.qkv_proj.weight" in keys and "model.layers.0.mlp.gate_up_proj.weight" in keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    assert type(model.model.layers[0].self_attn.o_proj) is DecodeLinear
    unpack_for_decoding(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert type(model.model.layers[0].self_attn.o_proj) is torch.nn.Linear
    assert type(model.model.layers[0].self_attn).__name__ == type(model.model.layers[1].self_attn).__name__
    assert not type(model.model.layers[0].self_attn).__name__.startswith("Packed")


def test_packing_a_cepe_model_keeps_its_logits():
    model = tiny_cepe(init_mode="copy")
    ids = torch.randint(3, 100, (2, 9))
    ctx = torch.randint(3, 100, (2, 2, 16))  # 2 chunks of 16 context tokens per sequence
    with torch.no_grad():
        want = model(input_ids=ids, encoder_input_ids=ctx).logits
        counts = pack_for_decoding(model)
        got = model(input_ids=ids, encoder_input_ids=ctx).logits
    assert counts == {"attention": 2, "mlp": 2}
    layer = model.decoder.model.layers[-1]
    assert type(layer.cross_attn.q_proj) is DecodeLinear and type(layer.cross_attn.o_proj) is DecodeLinear
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_off_a_gpu_every_entry_point_is_the_torch_computation(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    x, w = torch.randn(1, 1, 48), torch.randn(20, 48)
    assert not decode_ops.gemv_usable(x, w)
    assert torch.equal(decode_ops.linear(x, w), F.linear(x, w))
    gate_up, down = torch.randn(1, 1, 96), torch.randn(20, 48)
    act = torch.nn.SiLU()
    assert torch.equal(decode_ops.gated_linear(gate_up, down, act), F.linear(act(gate_up[..., :48]) * gate_up[..., 48:], down))
    q, w_k, ctx = torch.randn(1, 4, 1, 8), torch.randn(4, 8, 24), torch.randn(1, 4, 1, 24)
    assert torch.equal(decode_ops.absorbed_query(q, w_k), torch.einsum("bhtd,hde->bhte", q, w_k))
    assert torch.equal(decode_ops.absorbed_value(ctx, w_k), torch.einsum("bhte,hde->bhtd", ctx, w_k))
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = tiny_decoder().model.layers[0].self_attn
    query, key, value = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 30, 16), torch.randn(2, 4, 30, 16)
    mask = torch.rand(2, 1, 1, 30) > 0.2
    mask[..., 0] = True
    got, _ = decode_ops.attention_forward(module, query, key, value, mask, scaling=0.25)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert torch.equal(got, want)
    with settings.using(kernels=False):
        assert not decode_ops.enabled()
    assert decode_ops.enabled()


def test_cepe_decode_attention_generates_as_sdpa():
    model = tiny_decoder("mistral")
    ids = torch.randint(3, 100, (1, 12))
    want = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.set_attn_implementation(decode_ops.register_attention())
    assert model.config._attn_implementation == "cepe_decode"
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0), want)


KERNELS = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from pipeline.fastdecode import decode_ops
    torch.manual_seed(0)

    def close(got, want, tol=1e-4):
        assert got.shape == want.shape, (got.shape, want.shape)
        err = float((got.double() - want).norm() / want.norm())
        assert err < tol, err

    # GEMV: rows not a multiple of the block, K not a multiple of the step; gated (SwiGLU) form
    x, w = torch.randn(1, 1, 300), torch.randn(37, 300)
    assert decode_ops.gemv_usable(x, w)
    close(decode_ops.linear(x, w), x.double() @ w.double().T)
    gate_up, down = torch.randn(1, 1, 2 * 70), torch.randn(33, 70)
    silu = torch.nn.SiLU()
    close(decode_ops.gated_linear(gate_up, down, silu),
          F.linear(F.silu(gate_up[..., :70].double()) * gate_up[..., 70:].double(), down.double()), 1e-3)
    # per-head products of the absorbed cross-attention
    q, w_k, ctx = torch.randn(1, 4, 1, 20), torch.randn(4, 20, 72), torch.randn(1, 4, 1, 72)
    close(decode_ops.absorbed_query(q, w_k), torch.einsum("bhtd,hde->bhte", q.double(), w_k.double()))
    close(decode_ops.absorbed_value(ctx, w_k), torch.einsum("bhte,hde->bhtd", ctx.double(), w_k.double()))
    # split-KV attention: grouped heads, a mask with whole ranges masked out, several range counts
    for bsz, heads, kv_heads, length, masked in [(2, 4, 2, 300, True), (1, 4, 4, 77, False), (2, 8, 1, 200, True)]:
        query = torch.randn(bsz, heads, 1, 32)
        key, value = torch.randn(bsz, kv_heads, length, 32), torch.randn(bsz, kv_heads, length, 32)
        mask = None
        if masked:
            mask = torch.rand(bsz, length) > 0.3
            mask[-1, length // 2:] = False
        rep = heads // kv_heads
        want = F.scaled_dot_product_attention(query.double(), key.double().repeat_interleave(rep, 1),
                                              value.double().repeat_interleave(rep, 1),
                                              attn_mask=None if mask is None else mask[:, None, None], scale=0.3)
        for splits in (1, 3, 7):
            close(decode_ops.kv_attention(query, key, value, mask, 0.3, splits=splits), want.transpose(1, 2))
    print("ok")
    """
)


@pytest.mark.skipif(not triton_support.triton_available() or torch.cuda.is_available(),
                    reason="needs Triton and no GPU (the GPU test covers the compiled kernels)")
def test_kernels_under_triton_interpreter_match_references():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", KERNELS], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and triton_support.triton_available()), reason="needs CUDA and Triton")


@needs_gpu
def test_kernels_match_torch_on_gpu():
    torch.manual_seed(0)
    dev, dt = torch.device("cuda"), torch.bfloat16
    x, w = torch.randn(1, 1, 4096, device=dev, dtype=dt), torch.randn(11008, 4096, device=dev, dtype=dt) * 0.02
    torch.testing.assert_close(decode_ops.linear(x, w).float(), F.linear(x.float(), w.float()), rtol=2e-2, atol=2e-2)
    gate_up, down = torch.randn(1, 1, 2 * 11008, device=dev, dtype=dt), torch.randn(4096, 11008, device=dev, dtype=dt) * 0.02
    want = F.linear(F.silu(gate_up[..., :11008].float()) * gate_up[..., 11008:].float(), down.float())
    torch.testing.assert_close(decode_ops.gated_linear(gate_up, down, torch.nn.SiLU()).float(), want, rtol=3e-2, atol=3e-2)
    for heads, kv_heads, length in [(32, 32, 4352), (32, 8, 20_000)]:
        query = torch.randn(2, heads, 1, 128, device=dev, dtype=dt)
        key = torch.randn(2, kv_heads, length, 128, device=dev, dtype=dt)
        value = torch.randn(2, kv_heads, length, 128, device=dev, dtype=dt)
        mask = torch.ones(2, length, dtype=torch.bool, device=dev)
        mask[0, length - 300:] = False
        mask[1, : length // 2] = False
        rep = heads // kv_heads
        want = F.scaled_dot_product_attention(query.float(), key.float().repeat_interleave(rep, 1),
                                              value.float().repeat_interleave(rep, 1), attn_mask=mask[:, None, None], scale=128**-0.5)
        got = decode_ops.kv_attention(query, key, value, mask, 128**-0.5)
        torch.testing.assert_close(got.float(), want.transpose(1, 2), rtol=2e-2, atol=2e-2)


@needs_gpu
def test_packed_model_with_cepe_decode_matches_on_gpu():
    """One cached decode step of a packed model with the split-KV attention against the unpacked
    model with sdpa (bf16: the products sum in another order)."""
    model = tiny_decoder("mistral", hidden_size=256, intermediate_size=512, num_attention_heads=8,
                         num_key_value_heads=4).to("cuda", torch.bfloat16)
    ids = torch.randint(3, 100, (1, 300), device="cuda")
    kw = CACHE_KW
    with torch.no_grad():
        out = model(ids, use_cache=True)
        want = model(ids[:, -1:], **{kw: _cache(out)}).logits
        pack_for_decoding(model)
        model.set_attn_implementation(decode_ops.register_attention())
        out = model(ids, use_cache=True)
        got = model(ids[:, -1:], **{kw: _cache(out)}).logits
    torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)
