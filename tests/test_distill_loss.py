"""The CEPED KL loss (pipeline.train.distill): hand computations, modes, masking, temperature."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.errors import CepeError
from pipeline.train.distill import parse_kl_mode, topk_kl, topk_kl_per_token
from pipeline.train.teacher import topk_with_tail

# A 5-token vocabulary, one position: student logits and the teacher's top-2 (+ tail).
Z = [2.0, 1.0, 0.0, -1.0, -2.0]
T_PROBS, T_IDS, T_TAIL = [0.6, 0.3], [1, 0], 0.1


def _softmax(z: list[float], temperature: float = 1.0) -> list[float]:
    e = [math.exp(v / temperature) for v in z]
    return [v / sum(e) for v in e]


def _one(z=Z, probs=T_PROBS, ids=T_IDS, tail=T_TAIL):
    return (
        torch.tensor([[z]]),  # (1, 1, 5)
        torch.tensor([[probs]]),  # (1, 1, 2)
        torch.tensor([[ids]]),
        torch.tensor([[tail]]),
    )


def test_drop_mode_matches_hand_computation_on_5_token_vocabulary():
    ps = _softmax(Z)
    expected = 0.6 * math.log(0.6 / ps[1]) + 0.3 * math.log(0.3 / ps[0])
    logits, probs, ids, tail = _one()
    got = topk_kl(logits, probs, ids, tail, mode="drop")
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert got.item() == pytest.approx(0.339036, abs=1e-6)  # 0.6 ln(0.6/0.23412) + 0.3 ln(0.3/0.63640)


def test_smooth_mode_matches_hand_computation_on_5_token_vocabulary():
    delta = 0.01
    ps = _softmax(Z)
    student = [ps[1], ps[0], 1 - ps[1] - ps[0]]
    teacher = [0.6, 0.3, 0.1]
    smooth = lambda p: [(v + delta) / (1 + 3 * delta) for v in p]  # noqa: E731
    s, t = smooth(student), smooth(teacher)
    expected = sum(ti * math.log(ti / si) for ti, si in zip(t, s))
    logits, probs, ids, tail = _one()
    got = topk_kl(logits, probs, ids, tail, mode="smooth_0.01")
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # drop and smooth differ (the tail bucket counts in smooth mode)
    assert got.item() != pytest.approx(topk_kl(logits, probs, ids, tail, mode="drop").item(), rel=1e-3)


@pytest.mark.parametrize("mode", ["drop", "smooth_1e-6", "smooth"])
@pytest.mark.parametrize("k", [3, 50, 97])
def test_kl_is_zero_when_student_equals_teacher(mode, k):
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 97) * 3
    probs, ids, tail = topk_with_tail(logits, k)
    kl = topk_kl(logits, probs, ids, tail, mode=mode)
    assert abs(kl.item()) < 1e-6
    # and positive for any other student
    other = logits + torch.randn_like(logits)
    assert topk_kl(other, probs, ids, tail, mode=mode).item() > 1e-3


def test_drop_mode_equals_kldivloss_batchmean_on_flat_view():
    torch.manual_seed(1)
    B, n, V, k = 3, 5, 40, 6
    logits = torch.randn(B, n, V)
    probs, ids, tail = topk_with_tail(torch.randn(B, n, V) * 2, k)
    log_ps = torch.log_softmax(logits, -1).gather(-1, ids)
    reference = torch.nn.KLDivLoss(reduction="batchmean")(log_ps.reshape(B * n, k), probs.reshape(B * n, k))
    assert topk_kl(logits, probs, ids, tail, mode="drop").item() == pytest.approx(reference.item(), rel=1e-6)


def test_mask_averages_over_valid_positions_only():
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 30)
    probs, ids, tail = topk_with_tail(torch.randn(2, 4, 30), 5)
    per = topk_kl_per_token(logits, probs, ids, tail)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    expected = (per[0, :3].sum() + per[1, 0]) / 4
    assert topk_kl(logits, probs, ids, tail, mask=mask).item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradient_reaches_student_logits_only_through_the_gathered_ids():
    logits, probs, ids, tail = _one()
    logits.requires_grad_(True)
    topk_kl(logits, probs, ids, tail).backward()
    # d/dz of -sum_j p_j log softmax(z)_{id_j} = (sum_j p_j) * softmax(z) - p (at the ids)
    ps = torch.softmax(logits.detach(), -1)[0, 0]
    expected = 0.9 * ps
    expected[1] -= 0.6
    expected[0] -= 0.3
    assert torch.allclose(logits.grad[0, 0], expected, atol=1e-6)


def test_temperature_softens_the_student_and_scales_by_t_squared():
    T = 2.0
    ps = _softmax(Z, T)
    expected = T * T * (0.6 * math.log(0.6 / ps[1]) + 0.3 * math.log(0.3 / ps[0]))
    logits, probs, ids, tail = _one()
    assert topk_kl(logits, probs, ids, tail, temperature=T).item() == pytest.approx(expected, rel=1e-6)


def test_bf16_student_logits_are_scored_in_fp32():
    torch.manual_seed(3)
    logits = torch.randn(1, 3, 50)
    probs, ids, tail = topk_with_tail(torch.randn(1, 3, 50), 4)
    a = topk_kl(logits.bfloat16(), probs, ids, tail)
    b = topk_kl(logits.bfloat16().float(), probs, ids, tail)
    assert a.dtype == torch.float32 and a.item() == b.item()


@pytest.mark.parametrize("bad", ["hard", "smooth_0", "smooth_x", "smooth_-1", ""])
def test_unknown_kl_modes_are_rejected(bad):
    with pytest.raises(CepeError, match="kl_mode"):
        parse_kl_mode(bad)


def test_kl_modes_parse():
    assert parse_kl_mode("drop") == ("drop", 0.0)
    assert parse_kl_mode("smooth_1e-6") == ("smooth", 1e-6)
    assert parse_kl_mode("smooth") == ("smooth", 1e-6)


def test_drop_mode_minimum_is_the_renormalised_top_k():
    """Drop mode is not a divergence of normalised distributions: a student that puts all its
    mass on the teacher's top-k (renormalised) scores S log S < 0, S = the top-k's mass."""
    logits = torch.full((1, 1, 5), -1e4)
    logits[0, 0, 1] = math.log(0.6 / 0.9)
    logits[0, 0, 0] = math.log(0.3 / 0.9)
    _, probs, ids, tail = _one()
    assert topk_kl(logits, probs, ids, tail, mode="drop").item() == pytest.approx(0.9 * math.log(0.9), rel=1e-5)
