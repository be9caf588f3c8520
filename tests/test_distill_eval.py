"""Held-out comparison of CEPED student, decoder alone and teacher (pipeline.train.ceped_eval)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_VOCAB, tiny_cepe, tiny_decoder

from pipeline.train.ceped_eval import compare_with_teacher


def windows(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(3, TINY_VOCAB, 12), "encoder_input_ids": rng.integers(3, TINY_VOCAB, (2, 8))}
            for _ in range(n)]


def test_zero_init_student_equals_decoder_and_teacher_without_context_equals_both():
    student = tiny_cepe(tiny_decoder(attn_implementation="eager"))
    data = windows()
    # teacher = the student's own decoder reading no context: every KL is 0, every ppl equal
    same = compare_with_teacher(student, student.decoder, data, context_len=0, decoder_len=10, k=5, batch_size=2, last=4)
    assert same["val_kl_full_decoder_only"] == pytest.approx(0, abs=1e-6)
    assert same["val_kl_full_student"] == pytest.approx(0, abs=1e-6)
    assert same["val_ppl_teacher"] == pytest.approx(same["val_ppl_decoder_only"], rel=1e-6)
    assert same["val_ppl_student"] == pytest.approx(same["val_ppl_decoder_only"], rel=1e-6)
    assert same["val_tokens"] == 5 * 9 and same["val_positions"] == 5 * 10
    # with context the teacher differs; the zero-init student still equals the decoder alone
    ctx = compare_with_teacher(student, student.decoder, data, context_len=16, decoder_len=10, k=5, batch_size=3)
    assert ctx["val_kl_full_decoder_only"] > 1e-4
    assert ctx["val_kl_student"] == pytest.approx(ctx["val_kl_decoder_only"], rel=1e-6)
    # a batch size does not change the numbers
    other = compare_with_teacher(student, student.decoder, data, context_len=16, decoder_len=10, k=5, batch_size=5)
    for key, value in ctx.items():
        assert other[key] == pytest.approx(value, rel=1e-5), key
