"""The CEPED teacher (pipeline.train.teacher): names, input assembly, window check, top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.errors import CepeError
from pipeline.train import teacher as T


def tiny_llama(vocab: int = 64, max_positions: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


def test_short_names_resolve_to_hub_ids():
    ref = T.resolve_teacher("llama-2-7b-chat")
    assert ref.resolved == "meta-llama/Llama-2-7b-chat-hf" and not ref.is_local
    assert T.resolve_teacher("Llama-2-13b-chat").resolved == "meta-llama/Llama-2-13b-chat-hf"
    assert T.resolve_teacher("org/some-model").resolved == "org/some-model"


def test_unknown_short_name_lists_the_known_ones():
    with pytest.raises(CepeError, match="unknown teacher 'llama-9-chat'.*llama-2-7b-chat, llama-2-13b-chat"):
        T.resolve_teacher("llama-9-chat")


def test_local_directory_is_used_as_is(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "t")
    ref = T.resolve_teacher(str(tmp_path / "t"))
    assert ref.is_local and ref.resolved == str((tmp_path / "t").resolve())
    (tmp_path / "empty").mkdir()
    with pytest.raises(CepeError, match="without config.json"):
        T.resolve_teacher(str(tmp_path / "empty"))


def test_window_is_checked_against_max_positions():
    T.check_window(2048, 2048, 4096)
    with pytest.raises(CepeError, match="2048 \\+ 4096 = 6144 exceeds the teacher's max_position_embeddings 4096"):
        T.check_window(2048, 4096, 4096)


def test_teacher_row_is_last_context_then_first_decoder_tokens():
    ctx = np.arange(100, 112).reshape(3, 4)  # 3 chunks of 4, text order 100..111
    dec = np.arange(0, 6)
    row = T.teacher_row(dec, ctx, context_len=5, decoder_len=4)
    assert row.input_ids.tolist() == [107, 108, 109, 110, 111, 0, 1, 2, 3]
    assert row.attention_mask.tolist() == [1] * 9
    # padded context tokens are skipped and the row is left-padded to the same width
    mask = np.ones_like(ctx)
    mask[2, 1:] = 0  # the last chunk holds one real token (108)
    row = T.teacher_row(dec, ctx, context_len=5, decoder_len=4, encoder_attention_mask=mask, pad_token_id=-1)
    assert row.input_ids.tolist() == [104, 105, 106, 107, 108, 0, 1, 2, 3]
    short = T.teacher_row(dec, ctx[:1], context_len=5, decoder_len=4, pad_token_id=-1)
    assert short.input_ids.tolist() == [-1, 100, 101, 102, 103, 0, 1, 2, 3]
    assert short.attention_mask.tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert short.hash == T.row_hash(np.array([100, 101, 102, 103, 0, 1, 2, 3])) != row.hash
    with pytest.raises(CepeError, match="decoder_len: 7 exceeds the 6 decoder tokens"):
        T.teacher_row(dec, ctx, context_len=5, decoder_len=7)


def test_topk_with_tail_sums_to_one_and_is_sorted():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 40).bfloat16()
    probs, ids, tail = T.topk_with_tail(logits, 5)
    full = torch.softmax(logits.float(), -1)
    assert torch.allclose(probs.sum(-1) + tail, torch.ones(2, 3), atol=1e-6)
    assert torch.equal(full.gather(-1, ids), probs)
    assert (probs[..., :-1] >= probs[..., 1:]).all()
    assert float(full.topk(5).values.min()) == pytest.approx(float(probs[..., -1].min()))


def test_teacher_topk_positions_predict_the_next_decoder_token():
    """The stored distribution at decoder position t is the teacher's prediction of token t+1:
    the same logits a plain forward over the whole row gives at that position."""
    model = tiny_llama()
    rows = [T.teacher_row(np.arange(1, 9), np.arange(20, 36).reshape(2, 8), 6, 5),
            T.teacher_row(np.arange(2, 10), np.arange(40, 44).reshape(1, 4), 6, 5)]  # 4 < 6 context tokens
    ids = torch.from_numpy(np.stack([r.input_ids for r in rows]))
    mask = torch.from_numpy(np.stack([r.attention_mask for r in rows]))
    out = T.teacher_topk(model, ids, mask, decoder_len=5, k=3)
    assert out["topk_probs"].dtype == torch.float16 and out["topk_ids"].dtype == torch.int32
    assert out["topk_probs"].shape == (2, 5, 3) and out["tail"].shape == (2, 5)
    for b, r in enumerate(rows):
        real = torch.from_numpy(r.input_ids[r.attention_mask.astype(bool)])[None]
        logits = model(real).logits[0, -5:]
        probs, top_ids, _ = T.topk_with_tail(logits, 3)
        assert torch.equal(out["topk_ids"][b].long(), top_ids)
        assert torch.allclose(out["topk_probs"][b].float(), probs, atol=1e-3)
        nll = torch.nn.functional.cross_entropy(logits[:-1], real[0, -4:], reduction="sum")
        assert out["nll"][b].item() == pytest.approx(nll.item(), rel=1e-4)


def test_fingerprint_is_dtype_independent_and_ignores_cross_attention(tmp_path):
    model = tiny_llama(seed=0)
    fp = T.weights_fingerprint(model)
    assert T.weights_fingerprint(tiny_llama(seed=0).to(torch.bfloat16)) == fp
    assert T.weights_fingerprint(tiny_llama(seed=1)) != fp
    model.model.layers[0].add_module("cross_attn", torch.nn.Linear(3, 3))
    assert T.weights_fingerprint(model) == fp
