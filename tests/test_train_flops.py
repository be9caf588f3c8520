"""Analytic FLOPs of a training example, checked against counts made by hand."""

from __future__ import annotations

import pytest

from conftest import tiny_cepe
from pipeline.train.flops import PEAK_BF16_FLOPS, Stack, cepe_example_flops, cepe_model_flops, mlm_example_flops

DEC = Stack(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16)
ENC = Stack(layers=1, hidden=4, heads=1, kv_heads=1, head_dim=4, intermediate=8)


def test_cepe_window_by_hand():
    # decoder layer weights: q 64 + o 64 + k 32 + v 32 + MLP 384 = 576; T = 3, S = 2 x 2 = 4
    # layer 0 (below the cross-attention, forward only): 2*576*3 + causal 4*3*3*8/2 = 3456 + 144
    # layer 1 (gradient flows through): 2 x 3456 + 3 x 144; lm_head 2 x (2*8*10*3)
    decoder = 3600 + (6912 + 432) + 960
    # cross-attention (trained, 3x): q/o 2*128*3 + k/v 2*64*4 + attention 4*3*4*8
    cross = 3 * (768 + 512 + 384)
    # encoder (trained, 3x): weights 160 over 4 tokens (1280) + two 2-token chunks 2 x 4*2*2*4
    encoder = 3 * (1280 + 128)
    got = cepe_example_flops(DEC, 10, ENC, 1, decoder_len=3, n_chunks=2, chunk_len=2, train_encoder=True)
    assert got == decoder + cross + encoder == 21120
    frozen = cepe_example_flops(DEC, 10, ENC, 1, decoder_len=3, n_chunks=2, chunk_len=2, train_encoder=False)
    assert got - frozen == 2 * (1280 + 128)  # a frozen encoder runs forward only


def test_mlm_sequence_by_hand():
    # weights 160 over 5 tokens (1600) + bidirectional 4*5*5*4 (400) + head 2*4*10*5 (400), all trained
    assert mlm_example_flops(ENC, 10, 5) == 3 * (1600 + 400 + 400)


def test_model_flops_reads_the_model():
    model = tiny_cepe()
    cfg = model.config
    direct = cepe_example_flops(Stack.from_config(cfg.decoder_config), cfg.decoder_config.vocab_size,
                                Stack.from_config(cfg.encoder_config), len(model.cross_attention_layers()),
                                decoder_len=16, n_chunks=2, chunk_len=8, train_encoder=True)
    assert cepe_model_flops(model, decoder_len=16, n_chunks=2, chunk_len=8) == pytest.approx(direct)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    assert cepe_model_flops(model, decoder_len=16, n_chunks=2, chunk_len=8) < direct


def test_peak_table_names_the_specific_card_first():
    names = [k for k, _ in PEAK_BF16_FLOPS]
    assert names.index("H100 PCIe") < names.index("H100")
    assert dict(PEAK_BF16_FLOPS)["H200"] == pytest.approx(989.4e12)
