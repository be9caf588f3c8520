"""The CEPE model's contract: equivalences with the plain decoder, freezing, chunk independence,
generation with cache, save/load round trips, backends and cross-attention forms."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ENCODER, TINY_VOCAB, tiny_cepe, tiny_decoder
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.model import CepeEncoder, CepeEncoderForMaskedLM, CepeForCausalLM, build_encoder_config, encoder_from_decoder_layers


def _inputs(batch=2, t=12, n=3, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY_VOCAB, (batch, t), generator=g)
    enc = torch.randint(3, TINY_VOCAB, (batch, n, length), generator=g)
    return ids, enc


def _perturb_o_proj(model, scale=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.cross_attention_layers():
            w = layer.cross_attn.o_proj.weight
            w.copy_(torch.randn(w.shape, generator=g) * scale / w.shape[1] ** 0.5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_zero_init_and_no_encoder_give_decoder_logits(family):
    decoder = tiny_decoder(family)
    ids, enc = _inputs()
    with torch.no_grad():
        reference = decoder(ids).logits.clone()
        model = tiny_cepe(decoder)
        assert torch.equal(model(ids, encoder_input_ids=enc).logits, reference)
        _perturb_o_proj(model)
        assert not torch.allclose(model(ids, encoder_input_ids=enc).logits, reference)
        assert torch.equal(model(ids).logits, reference)  # no encoder input at all


def test_init_copies_self_attention_and_expands_gqa():
    decoder = tiny_decoder("qwen2")  # 4 query heads, 2 kv heads
    model = tiny_cepe(decoder, init_mode="copy")
    layer = model.cross_attention_layers()[0]
    cross, attn = layer.cross_attn, layer.self_attn
    e, d = TINY_ENCODER["hidden_size"], 16
    assert torch.equal(cross.q_proj.weight, attn.q_proj.weight)
    assert torch.equal(cross.o_proj.weight, attn.o_proj.weight)
    assert torch.equal(cross.norm.weight, layer.post_attention_layernorm.weight)
    k = cross.k_proj.weight.view(4, d, e)
    src = attn.k_proj.weight[:, :e].view(2, d, e)
    for head in range(4):
        assert torch.equal(k[head], src[head // 2])
    zero = tiny_cepe(tiny_decoder("qwen2"), init_mode="zero")
    assert all(float(l.cross_attn.o_proj.weight.detach().abs().sum()) == 0 for l in zero.cross_attention_layers())


def test_cross_attention_only_in_last_n_layers():
    model = tiny_cepe(tiny_decoder(num_hidden_layers=3), num_cross_attn_layers=1)
    layers = model.decoder.model.layers
    assert [hasattr(l, "cross_attn") for l in layers] == [False, False, True]


def test_frozen_decoder_gets_no_gradient():
    model = tiny_cepe()
    _perturb_o_proj(model)
    ids, enc = _inputs()
    model.train()
    model(ids, labels=ids, encoder_input_ids=enc).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("decoder.") and ".cross_attn." not in name:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    counts = model.parameter_counts()
    assert counts["trainable"] == counts["cross_attention"] + counts["encoder"]
    assert counts["frozen"] == counts["decoder"]


def test_frozen_encoder_flag():
    model = tiny_cepe(train_encoder=False)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for l in model.cross_attention_layers() for p in l.cross_attn.parameters())


def test_chunks_are_encoded_independently():
    model = tiny_cepe()
    _, enc = _inputs(batch=1, n=4)
    changed = enc.clone()
    changed[0, 2] = torch.randint(3, TINY_VOCAB, (enc.shape[-1],))
    with torch.no_grad():
        a, _ = model.encode(enc)
        b, _ = model.encode(changed)
    length = enc.shape[-1]
    for chunk in range(4):
        same = torch.equal(a[0, chunk * length : (chunk + 1) * length], b[0, chunk * length : (chunk + 1) * length])
        assert same == (chunk != 2)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_inside_a_chunk_does_not_change_real_tokens(attn):
    model = tiny_cepe(tiny_decoder(attn_implementation=attn))
    g = torch.Generator().manual_seed(3)
    real = torch.randint(3, TINY_VOCAB, (1, 1, 5), generator=g)
    padded = torch.cat([real, torch.full((1, 1, 3), 0)], dim=-1)  # right padding, pad id 0
    padded_other = torch.cat([real, torch.full((1, 1, 3), 7)], dim=-1)  # other padding ids
    mask = torch.tensor([[[1, 1, 1, 1, 1, 0, 0, 0]]])
    with torch.no_grad():
        alone, _ = model.encode(real)
        p1, m1 = model.encode(padded, mask)
        p2, _ = model.encode(padded_other, mask)
    torch.testing.assert_close(p1[:, :5], alone, rtol=1e-5, atol=1e-5)
    assert torch.equal(p1[:, :5], p2[:, :5])
    assert m1.tolist() == [[True] * 5 + [False] * 3]
    # and the decoder output ignores what the padded positions hold
    _perturb_o_proj(model)
    ids = torch.randint(3, TINY_VOCAB, (1, 6), generator=g)
    with torch.no_grad():
        out1 = model(ids, encoder_input_ids=padded, encoder_attention_mask=mask).logits
        out2 = model(ids, encoder_input_ids=padded_other, encoder_attention_mask=mask).logits
        out3 = model(ids, encoder_input_ids=real).logits
    torch.testing.assert_close(out1, out2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out1, out3, rtol=1e-5, atol=1e-5)


def test_fully_padded_context_equals_no_context_and_stays_finite():
    model = tiny_cepe()
    _perturb_o_proj(model)
    ids, enc = _inputs(batch=2)
    mask = torch.ones(enc.shape, dtype=torch.long)
    mask[1] = 0  # the second example has no context at all
    model.train()
    out = model(ids, labels=ids, encoder_input_ids=enc, encoder_attention_mask=mask)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        model.eval()
        plain = model(ids[1:]).logits
        got = model(ids, encoder_input_ids=enc, encoder_attention_mask=mask).logits[1:]
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


def test_encoder_is_bidirectional():
    model = tiny_cepe()
    _, enc = _inputs(batch=1, n=1)
    changed = enc.clone()
    changed[0, 0, -1] = (changed[0, 0, -1] + 1) % TINY_VOCAB
    with torch.no_grad():
        a, _ = model.encode(enc)
        b, _ = model.encode(changed)
    assert not torch.equal(a[0, 0], b[0, 0])  # the first token sees the last one


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sdpa_and_eager_agree(family):
    ids, enc = _inputs()
    mask = torch.ones(enc.shape, dtype=torch.long)
    mask[0, 1, 5:] = 0
    outs = []
    for attn in ("sdpa", "eager"):
        model = tiny_cepe(tiny_decoder(family, attn_implementation=attn))
        _perturb_o_proj(model)
        with torch.no_grad():
            outs.append(model(ids, encoder_input_ids=enc, encoder_attention_mask=mask).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("direct_scores", [True, False])
def test_projected_and_absorbed_forms_agree(attn, direct_scores, monkeypatch):
    from pipeline.model.cross_attention import CepeCrossAttention

    if not direct_scores:  # force the attention-kernel path used for many queries
        monkeypatch.setattr(CepeCrossAttention, "ABSORBED_DIRECT_MAX_SCORES", 0)
    model = tiny_cepe(tiny_decoder(attn_implementation=attn))
    _perturb_o_proj(model)
    ids, enc = _inputs()
    mask = torch.ones(enc.shape, dtype=torch.long)
    mask[1, 2, 3:] = 0
    with torch.no_grad():
        a = model(ids, encoder_input_ids=enc, encoder_attention_mask=mask, cross_attn_form="projected").logits
        b = model(ids, encoder_input_ids=enc, encoder_attention_mask=mask, cross_attn_form="absorbed").logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_auto_form_choice():
    cross = tiny_cepe().cross_attention_layers()[0].cross_attn
    cross.absorbed_min_context = 100
    assert cross.choose_form(1, 4096) == "absorbed"
    assert cross.choose_form(1, 50) == "projected"  # short context
    assert cross.choose_form(4096, 4096) == "projected"  # many queries share the projection


def test_greedy_generation_with_cache_equals_full_recompute():
    model = tiny_cepe()
    _perturb_o_proj(model, scale=2.0)
    ids, enc = _inputs(batch=2, t=6)
    calls = []
    handle = model.encoder.register_forward_hook(lambda *a: calls.append(1))
    out = model.generate(ids, encoder_input_ids=enc, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    handle.remove()
    assert len(calls) == 1  # the encoder ran once for the whole generation
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            logits = model(seq, encoder_input_ids=enc, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_static_cache_generation_equals_dynamic_cache_generation():
    """`generate(..., cache_implementation="static")`, the fixed-shape cache that CUDA graphs and
    torch.compile need, continues exactly as the default dynamic cache."""
    model = tiny_cepe()
    _perturb_o_proj(model, scale=2.0)
    ids, enc = _inputs(batch=2, t=6)
    dynamic = model.generate(ids, encoder_input_ids=enc, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    static = model.generate(ids, encoder_input_ids=enc, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                            cache_implementation="static")
    assert torch.equal(dynamic, static)


def test_generation_context_changes_output():
    model = tiny_cepe()
    _perturb_o_proj(model, scale=4.0)
    ids, enc = _inputs(batch=1, t=4)
    with_ctx = model.generate(ids, encoder_input_ids=enc, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    without = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert not torch.equal(with_ctx, without)


@pytest.mark.parametrize("save_decoder", [True, False])
def test_save_load_round_trip(tmp_path, save_decoder):
    decoder = tiny_decoder("qwen2", tie_word_embeddings=True)
    decoder_dir = tmp_path / "decoder"
    decoder.save_pretrained(decoder_dir)
    model = CepeForCausalLM.from_decoder(str(decoder_dir), encoder_config=dict(TINY_ENCODER), save_decoder=save_decoder).eval()
    _perturb_o_proj(model)
    ids, enc = _inputs()
    with torch.no_grad():
        expected = model(ids, encoder_input_ids=enc).logits
    model.save_pretrained(tmp_path / "cepe")
    files = {p.name for p in (tmp_path / "cepe").iterdir()}
    assert "config.json" in files and "model.safetensors" in files
    from safetensors import safe_open

    with safe_open(tmp_path / "cepe" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert any(".cross_attn." in k for k in keys)
    assert ("decoder.model.layers.0.self_attn.q_proj.weight" in keys) == save_decoder
    for loader in (CepeForCausalLM, AutoModelForCausalLM):
        loaded = loader.from_pretrained(tmp_path / "cepe").eval()
        assert type(loaded) is CepeForCausalLM
        with torch.no_grad():
            assert torch.equal(loaded(ids, encoder_input_ids=enc).logits, expected)
        assert not any(p.requires_grad for n, p in loaded.decoder.named_parameters() if ".cross_attn." not in n)
    assert AutoConfig.from_pretrained(tmp_path / "cepe").model_type == "cepe"


def test_original_decoder_keys_are_preserved():
    decoder = tiny_decoder()
    model = tiny_cepe(decoder)
    original = set(tiny_decoder().state_dict())
    wrapped = {k[len("decoder."):] for k in model.state_dict() if k.startswith("decoder.") and ".cross_attn." not in k}
    assert original == wrapped


def test_mlm_encoder_round_trip_into_cepe(tmp_path):
    config = build_encoder_config(TINY_VOCAB, **TINY_ENCODER)
    assert config.vocab_size == TINY_VOCAB + 1 and config.mask_token_id == TINY_VOCAB
    mlm = CepeEncoderForMaskedLM(config).eval()
    ids = torch.randint(3, TINY_VOCAB, (2, 10))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    masked = ids.clone()
    masked[:, 3] = config.mask_token_id
    out = mlm(masked, labels=labels)
    assert out.logits.shape == (2, 10, TINY_VOCAB + 1) and torch.isfinite(out.loss)
    assert mlm.mlm_head.decoder.weight.data_ptr() == mlm.model.embed_tokens.weight.data_ptr()  # tied
    mlm.save_pretrained(tmp_path / "mlm")
    model = CepeForCausalLM.from_decoder(tiny_decoder(), encoder=tmp_path / "mlm")
    with torch.no_grad():
        a, _ = model.encode(ids[:, None])
        b = mlm.model(ids).last_hidden_state
    torch.testing.assert_close(a, b)


def test_encoder_from_decoder_layers():
    decoder = tiny_decoder("qwen2")
    encoder = encoder_from_decoder_layers(decoder, 1)
    assert isinstance(encoder, CepeEncoder) and encoder.config.hidden_size == decoder.config.hidden_size
    assert torch.equal(encoder.layers[0].mlp.up_proj.weight, decoder.model.layers[0].mlp.up_proj.weight)
    model = CepeForCausalLM.from_decoder(decoder, encoder=encoder, init_mode="copy")
    ids, enc = _inputs()
    assert torch.isfinite(model(ids, encoder_input_ids=enc).logits).all()


def test_encoder_spec_states_the_paper_shape_and_names_the_users_option():
    from pipeline.model import PAPER_ENCODER, EncoderSpec

    values = EncoderSpec().config_values()
    assert values == {k: PAPER_ENCODER[k] for k in values}
    names = {"layers": "encoder_layers", "hidden_size": "encoder_hidden_size", "heads": "encoder_heads"}
    assert EncoderSpec(hidden_size=10, heads=3).problem(names) == "encoder_heads: 3 does not divide encoder_hidden_size 10"
    assert EncoderSpec(hidden_size=10, heads=3).problem(names, divisible=False) is None
    assert EncoderSpec(layers=0).problem(names) == "encoder_layers: expected an integer >= 1, got 0"


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_supported_families_have_the_pre_norm_layer_form(family):
    from pipeline.decoders import check_pre_norm_layers

    decoder = tiny_decoder(family)
    check_pre_norm_layers(decoder)  # no error: the form CEPE's layer forward runs
    model = tiny_cepe(decoder)
    check_pre_norm_layers(model)  # the wrapped layers too (their cross_attn aside)
    ids = torch.randint(3, 100, (1, 7))
    with torch.no_grad():  # zero init: the wrapped layer forward is the family's own
        torch.testing.assert_close(model(ids, encoder_input_ids=torch.randint(3, 100, (1, 2, 8))).logits,
                                   decoder(ids).logits, rtol=1e-5, atol=1e-5)


def test_a_decoder_with_other_layer_norms_is_refused_in_one_line():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from pipeline.errors import CepeError

    gemma2 = Gemma2ForCausalLM(Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    with pytest.raises(CepeError) as err:
        tiny_cepe(gemma2)
    message = str(err.value)
    assert "\n" not in message
    assert message == ("decoder: gemma2 layers are not the pre-norm attention/MLP form CEPE wraps (input_layernorm, "
                       "self_attn, post_attention_layernorm, mlp): layer 0 has post_feedforward_layernorm, "
                       "pre_feedforward_layernorm")
    assert not any(hasattr(layer, "cross_attn") for layer in gemma2.model.layers)  # refused before any change


def test_cross_attention_form_auto_passed_per_call_is_the_automatic_choice():
    from pipeline.model.cross_attention import CepeCrossAttention

    torch.manual_seed(0)
    layer = CepeCrossAttention(32, 48, num_heads=4, head_dim=8, norm=torch.nn.RMSNorm(32), absorbed_min_context=16).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    h, phi = torch.randn(1, 1, 32), torch.randn(1, 40, 48)
    assert layer.choose_form(1, 40) == "absorbed"
    with torch.no_grad():
        assert torch.equal(layer(h, phi, form="auto"), layer(h, phi, form="absorbed"))
        assert torch.equal(layer(h, phi), layer(h, phi, form="absorbed"))
