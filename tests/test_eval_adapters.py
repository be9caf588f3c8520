"""Input policies and batched generation: CEPE's concat-truncate-left split, the encoder run
once per example, batching that does not change greedy outputs, and samsum's newline stop."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import byte_tokenizer, tiny_cepe, tiny_llama

from pipeline.errors import CepeError
from pipeline.evaluate import adapters


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_cepe_split_keeps_the_end_in_the_decoder_and_left_truncates_the_encoder(tok):
    wrap = adapters.make_wrapper("llama2", tok)
    policy = adapters.CepePolicy(tok, decoder_max_len=30, chunk_len=8, max_encoder_chunks=2, wrap=wrap)
    prompt = "A" * 10 + "B" * 10 + "C" * 10 + "question?"
    p = policy.prepare(adapters.Request(prompt, max_new_tokens=5))
    # budget = 30 - 5 - len("<s>[INST][/INST]") = 11 tokens: "CC" + "question?"
    assert tok.decode(p.input_ids) == "<s>[INST]CCquestion?[/INST]"
    # overflow "A"*10 + "B"*10 + "C"*8: the 2 chunks nearest the decoder text, the rest dropped
    assert [tok.decode(c) for c in p.encoder_chunks] == ["BBBBBBBB", "CCCCCCCC"]
    assert p.dropped_tokens == 12 and p.prompt_tokens == 39
    # chunks aligned to the end: only the oldest chunk may be short
    dec, chunks, dropped = policy.split(list(range(20)), 5)
    assert dec == list(range(15, 20)) and chunks == [[0, 1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13, 14]] and dropped == 0
    short = policy.prepare(adapters.Request("fits", 5, chat=False))
    assert tok.decode(short.input_ids) == "<s>fits" and short.encoder_chunks == []
    with pytest.raises(CepeError, match="leaves no room"):
        policy.prepare(adapters.Request(prompt, max_new_tokens=29))


def test_encoder_tensors_pad_chunks_with_a_mask():
    ids, mask = adapters.encoder_tensors([[[5, 6], [7, 8, 9]], [[1, 2, 3]]], 3, 0, "cpu")
    assert ids.shape == (2, 2, 3)
    assert ids[0].tolist() == [[5, 6, 0], [7, 8, 9]] and mask[0].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert mask[1].tolist() == [[1, 1, 1], [0, 0, 0]]


def test_cepe_generation_runs_the_encoder_once_and_uses_it(tok, monkeypatch):
    model = tiny_cepe(max_positions=1024)
    policy = adapters.CepePolicy(tok, 64, 16, 8, adapters.make_wrapper("none", tok))
    gen = adapters.Generator(model, tok, policy, batch_size=2, chunk_len=16, progress=False)
    calls = []
    original = model.encode

    def counting(enc_ids, enc_mask=None):
        calls.append(tuple(enc_ids.shape))
        return original(enc_ids, enc_mask)

    monkeypatch.setattr(model, "encode", counting)
    prompts = [adapters.Request("abcdefghij" * 12, 6), adapters.Request("0123456789" * 12, 6)]
    texts, prepared = gen.generate(prompts)
    assert calls == [(2, 4, 16)]  # one encoder pass for the batch, not one per new token
    assert all(len(p.encoder_chunks) == 4 for p in prepared)
    # the encoder matters: the same decoder text without the encoder chunks decodes differently
    vanilla = adapters.Generator(model, tok, adapters.VanillaPolicy(tok, 10_000, adapters.make_wrapper("none", tok)), progress=False)
    with torch.no_grad():
        enc_ids, enc_mask = adapters.encoder_tensors([prepared[0].encoder_chunks], 16, tok.pad_token_id, "cpu")
        ids = torch.tensor([prepared[0].input_ids])
        with_enc = model(ids, encoder_input_ids=enc_ids, encoder_attention_mask=enc_mask).logits[0, -1]
        without = model(ids).logits[0, -1]
    assert not torch.allclose(with_enc, without)
    assert isinstance(vanilla.generate(prompts[:1])[0][0], str)


def test_batched_greedy_equals_one_by_one(tok):
    model = tiny_llama(max_positions=1024, seed=3)
    policy = adapters.VanillaPolicy(tok, 500, adapters.make_wrapper("none", tok))
    requests = [adapters.Request("hello there " * k, 6) for k in (1, 3, 7, 2)]
    one, _ = adapters.Generator(model, tok, policy, batch_size=1, progress=False).generate(requests)
    many, _ = adapters.Generator(model, tok, policy, batch_size=4, progress=False).generate(requests)
    assert one == many


def test_stop_on_newline_and_at_least_one_token(tok):
    model = tiny_llama(max_positions=512, seed=0)
    nl = adapters.newline_id(tok)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():  # a head whose argmax is "\n" everywhere
        head.weight.zero_()
        head.bias.zero_()
        head.bias[nl] = 10.0
    model.lm_head = head
    policy = adapters.VanillaPolicy(tok, 500, adapters.make_wrapper("none", tok))
    gen = adapters.Generator(model, tok, policy, progress=False)
    out, _ = gen.generate([adapters.Request("dialogue", 8, stop_on_newline=True), adapters.Request("dialogue", 3)])
    # pred.py's samsum rule: min_length = context + 1 bans every stop id ("\n" too) at the first
    # step, so the first token is the best non-stop one ("!" = id 0 here); then "\n" stops it
    assert out[0] == "!\n"
    assert out[1] == "\n\n\n"  # without the rule it keeps going


def test_chat_wrappers(tok):
    assert adapters.make_wrapper("llama2", tok)("hi") == "[INST]hi[/INST]"
    assert adapters.make_wrapper("none", tok)("hi") == "hi"
    with pytest.raises(CepeError, match="has none"):
        adapters.make_wrapper("template", tok)
