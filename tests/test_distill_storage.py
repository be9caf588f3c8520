"""Teacher top-k shards: storage round trip, alignment checks, online == precomputed."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import TINY_VOCAB, tiny_cepe, tiny_decoder

from pipeline.errors import CepeError
from pipeline.train.ceped_data import CepedExamples
from pipeline.train.collate import collate_lm
from pipeline.train.distill import DistillLoss
from pipeline.train.teacher import LOGITS_FORMAT, OnlineTeacher, topk_with_tail
from pipeline.train.teacher_pass import compute_split
from pipeline.train.teacher_shards import TeacherLogits

CTX, DEC, K = 10, 8, 5
SHARDS = [("shard-00000.arrow", 4), ("shard-00001.arrow", 3)]


def windows(n=7, seed=0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(3, TINY_VOCAB, 12).astype(np.int32),
             "encoder_input_ids": rng.integers(3, TINY_VOCAB, (2, 8)).astype(np.int32)} for _ in range(n)]


def precompute(tmp_path, teacher, data, name="logits"):
    root = tmp_path / name
    entry = compute_split(teacher, data, SHARDS, root / "train", context_len=CTX, decoder_len=DEC, k=K,
                          batch_size=3, progress=False)
    manifest = {"format": LOGITS_FORMAT, "version": 1, "k": K, "decoder_len": DEC, "teacher_context_len": CTX,
                "temperature": 1.0, "splits": {"train": entry}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return TeacherLogits(root, "train"), entry


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    teacher = tiny_decoder("llama", attn_implementation="eager")
    data = windows()
    logits, entry = precompute(tmp, teacher, data)
    return teacher, data, logits, entry


def test_topk_storage_round_trip(setup):
    teacher, data, logits, entry = setup
    assert len(logits) == 7 and [s["rows"] for s in entry["shards"]] == [4, 3]
    for i in (0, 3, 4, 6):  # both shards, first and last rows
        ex = data[i]
        seq = np.concatenate([ex["encoder_input_ids"].reshape(-1)[-CTX:], ex["input_ids"][:DEC]])
        with torch.no_grad():
            full = teacher(torch.from_numpy(seq.astype(np.int64))[None]).logits[0, -DEC:]
        probs, ids, tail = topk_with_tail(full, K)
        row = logits[i]
        assert row["topk_probs"].dtype == np.float16 and row["topk_ids"].dtype == np.int32
        assert row["topk_probs"].shape == (DEC, K) and row["tail"].shape == (DEC,)
        assert np.array_equal(row["topk_ids"], ids.numpy())
        assert np.array_equal(row["topk_probs"], probs.numpy().astype(np.float16))
        assert np.allclose(row["tail"].astype(np.float32), tail.numpy(), atol=1e-3)
    assert entry["teacher_ppl"] > 1 and 0 < entry["mean_tail"] < 1


def _batch(dataset, rows):
    return collate_lm([dataset[i] for i in rows])


def test_online_and_precomputed_teacher_give_the_same_loss(setup):
    teacher, data, logits, _ = setup
    student = tiny_cepe(copy.deepcopy(teacher))
    with torch.no_grad():  # a student that differs from its decoder, so the KL is not trivial
        for layer in student.cross_attention_layers():
            layer.cross_attn.o_proj.weight.normal_(0, 0.2)
    rows = [0, 5, 2]
    stored = _batch(CepedExamples(data, CTX, DEC, logits=logits), rows)
    online_data = CepedExamples(data, CTX, DEC, with_teacher_rows=True)
    online = _batch(online_data, rows)
    assert stored["input_ids"].shape == (3, DEC) and torch.equal(stored["input_ids"], online["input_ids"])
    loss = DistillLoss(lm_weight=1.0, kl_weight=2.0)
    with torch.no_grad():
        l_pre, m_pre = loss(student, stored)
        l_on, m_on = DistillLoss(teacher=OnlineTeacher(teacher, CTX, DEC, K))(student, online)
        l_shared, m_shared = DistillLoss(teacher=OnlineTeacher(None, CTX, DEC, K))(student, online)
    assert m_pre["kl"].item() > 1e-3
    assert l_on.item() == pytest.approx(l_pre.item(), rel=1e-5)
    assert l_shared.item() == pytest.approx(l_pre.item(), rel=1e-5)
    assert l_pre.item() == pytest.approx(m_pre["ce"].item() + 2 * m_pre["kl"].item(), rel=1e-6)


def test_shards_of_other_windows_are_rejected(setup, tmp_path):
    teacher, data, logits, _ = setup
    other = windows(seed=1)
    with pytest.raises(CepeError, match="shard-00000.arrow row 1: the teacher logits were computed from other tokens"):
        CepedExamples(other, CTX, DEC, logits=logits)[1]
    # a reordered split (rows swapped across shards) fails at the first swapped row
    swapped = list(data)
    swapped[3], swapped[4] = swapped[4], swapped[3]
    examples = CepedExamples(swapped, CTX, DEC, logits=logits)
    examples[2]
    with pytest.raises(CepeError, match="shard-00000.arrow row 3"):
        examples[3]
    with pytest.raises(CepeError, match="holds 7 rows of teacher logits but the data split holds 6"):
        CepedExamples(data[:6], CTX, DEC, logits=logits)
    # the same windows read with another context split give other teacher tokens
    with pytest.raises(CepeError, match="computed from other tokens"):
        CepedExamples(data, CTX - 2, DEC, logits=logits)[0]
