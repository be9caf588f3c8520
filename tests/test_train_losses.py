"""LM/MLM losses, MLM masking and the encoder-context robustness masking, against hand counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.train.collate import ContextMasking, MlmCollator, ZipDataset, collate_lm
from pipeline.train.losses import causal_nll, last_tokens_labels, mask_for_mlm, mlm_nll


def test_causal_nll_equals_shifted_cross_entropy_and_handles_kept_tail():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)
    ids = torch.randint(0, 11, (2, 7))
    nll, n = causal_nll(logits, ids)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1), reduction="sum")
    assert n == 12 and torch.allclose(nll, ref)

    labels = last_tokens_labels(ids, 3)  # score tokens 4, 5, 6 only
    tail_nll, tail_n = causal_nll(logits[:, -4:], labels)  # the logits of positions 3..6
    ref = F.cross_entropy(logits[:, 3:6].reshape(-1, 11), ids[:, 4:7].reshape(-1), reduction="sum")
    assert tail_n == 6 and torch.allclose(tail_nll, ref)
    with pytest.raises(ValueError, match="logits_to_keep"):
        causal_nll(logits[:, -2:], labels)


def test_mlm_masking_rate_mask_token_and_specials():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 100, size=20_000)
    ids[::50] = 1  # BOS
    ids[25::50] = 2  # EOS
    masked, labels = mask_for_mlm(ids, mask_token_id=100, special_ids=frozenset({1, 2}), probability=0.3, rng=rng)
    chosen = labels != -100
    assert not chosen[np.isin(ids, [1, 2])].any()  # specials never masked
    assert (masked[chosen] == 100).all()  # always [MASK], no 80/10/10
    assert (masked[~chosen] == ids[~chosen]).all() and (labels[chosen] == ids[chosen]).all()
    rate = chosen.sum() / (~np.isin(ids, [1, 2])).sum()
    assert abs(rate - 0.3) < 0.015


def test_mlm_always_masks_at_least_one_token_and_collator_is_reproducible():
    rng = np.random.default_rng(0)
    _, labels = mask_for_mlm(np.array([1, 5, 6, 2]), mask_token_id=9, special_ids=frozenset({1, 2}),
                             probability=0.0, rng=rng)
    assert (labels != -100).sum() == 1 and labels[0] == -100 and labels[3] == -100
    collate = MlmCollator(mask_token_id=100, special_ids=frozenset({1, 2}), probability=0.3, seed=7)
    ex = [{"input_ids": np.arange(3, 67), "_epoch": 0, "_index": i} for i in range(3)]
    a, b = collate(ex), collate(list(reversed(ex)))
    assert torch.equal(a["input_ids"], b["input_ids"].flip(0))  # masks depend on the example, not the batch
    other_epoch = collate([{**e, "_epoch": 1} for e in ex])
    assert not torch.equal(a["input_ids"], other_epoch["input_ids"])
    nll, n = mlm_nll(torch.zeros(3, 64, 101), a["labels"])
    assert n == (a["labels"] != -100).sum() and torch.allclose(nll, n * np.log(101))


def test_context_masking_rates_and_suffix_lengths():
    masking = ContextMasking(prob=0.3, full_prob=0.03, seed=0)
    full = suffix = kept = 0
    lengths = []
    for i in range(4000):
        m = masking.apply(np.ones((4, 16), dtype=np.int64), {"_epoch": 0, "_index": i})
        for row in m:
            zeros = int((row == 0).sum())
            if zeros == 16:
                full += 1
            elif zeros:
                suffix += 1
                lengths.append(zeros)
                assert (row[16 - zeros:] == 0).all() and (row[:16 - zeros] == 1).all()  # a suffix
            else:
                kept += 1
    total = full + suffix + kept
    assert abs(full / total - 0.03) < 0.006
    assert abs(suffix / total - 0.27) < 0.015
    assert min(lengths) == 1 and max(lengths) == 15  # n ~ U{1..L-1}
    again = masking.apply(np.ones((4, 16), dtype=np.int64), {"_epoch": 0, "_index": 5})
    assert np.array_equal(again, masking.apply(np.ones((4, 16), dtype=np.int64), {"_epoch": 0, "_index": 5}))


def test_collate_lm_shapes_eval_window_extra_columns_and_decoder_only():
    ex = [{"input_ids": np.arange(8), "encoder_input_ids": np.arange(12).reshape(3, 4), "domain": "x",
           "topk_ids": np.ones((8, 5), dtype=np.int32), "_epoch": 0, "_index": i} for i in range(2)]
    batch = collate_lm(ex, eval_last=3)
    assert batch["input_ids"].shape == (2, 8) and batch["encoder_input_ids"].shape == (2, 3, 4)
    assert batch["encoder_attention_mask"].shape == (2, 3, 4) and bool(batch["encoder_attention_mask"].all())
    assert (batch["labels"][:, :5] == -100).all() and torch.equal(batch["labels"][:, 5:], batch["input_ids"][:, 5:])
    assert batch["topk_ids"].shape == (2, 8, 5) and "domain" not in batch and "_index" not in batch
    alone = collate_lm(ex, use_encoder=False)
    assert "encoder_input_ids" not in alone


def test_zip_dataset_joins_index_aligned_examples():
    z = ZipDataset([{"input_ids": [1]}, {"input_ids": [2]}], [{"teacher": 10}, {"teacher": 20}])
    assert z[1] == {"input_ids": [2], "teacher": 20} and len(z) == 2
    with pytest.raises(ValueError, match="index-aligned"):
        ZipDataset([{}], [{}, {}])
