"""ICL with many demonstrations: all eleven PCW sets, the official balanced sampling and calibrated
NLL scoring, data errors, and `evaluate --task icl` with a CEPE model and a plain decoder."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from eval_helpers import save_tiny, save_tiny_cepe, tiny_cepe, tiny_llama

from cepe_cli.main import cli
from pipeline.evaluate import icl
from pipeline.evaluate.report import DataErrors

FIXTURES = Path(__file__).parent / "fixtures" / "icl"
OFFICIAL = "sst2,sst5,mr,ag_news,trec-coarse,trec-fine,dbpedia,nlu_scenario,nlu_intent,banking77,clinic150"


def test_all_eleven_sets():
    # the official eval_icl.yaml lists these eleven; its ten demo/test file entries make zip drop the last
    assert list(icl.SETS) == OFFICIAL.split(",") and len(icl.SETS) == 11
    assert icl.select_sets([]) == list(icl.SETS)
    assert len(icl.SETS["trec-fine"].options) == 50 and len(icl.SETS["dbpedia"].options) == 14
    assert len(icl.SETS["nlu_scenario"].options) == 18
    assert icl.SETS["sst2"].render("great", " positive") == "Sentence: great\nSentiment: positive"


def test_balanced_sampling():
    by_class = [[icl.Item(f"n{i}", 0) for i in range(3)], [icl.Item(f"p{i}", 1) for i in range(5)]]
    demos = icl.sample_demos(by_class, 6, random.Random(0))
    assert Counter(d.label for d in demos) == {0: 3, 1: 3}
    assert len({d.text for d in demos}) == 6  # no repeat while a class has unused items
    demos = icl.sample_demos(by_class, 8, random.Random(0))  # 4 per class: the 3-item class repeats one
    assert Counter(d.label for d in demos) == {0: 4, 1: 4}
    assert icl.sample_demos(by_class, 3, random.Random(1)) == icl.sample_demos(by_class, 3, random.Random(1))


def test_calibrated_predictions_by_hand():
    scores, lengths = [-2.0, -3.0, -9.0], [1, 2, 6]
    calibration = [-1.0, -2.5, -6.0]  # content-free scores: option 0 is favoured a priori
    picks = icl.predictions(scores, lengths, calibration)
    # raw: argmax -2 -> 0; per token: -2, -1.5, -1.5 -> 1; calibrated: -1, -0.5, -3 -> 1; per token: -1, -0.25, -0.5 -> 1
    assert picks == {"acc": 0, "acc_norm": 1, "acc_calibrated": 1, "acc_calibrated_norm": 1}


def test_option_scores_match_a_full_forward():
    model = tiny_llama()
    prefix, options = [256, 40, 41, 42], [[50], [51, 52, 53], [54, 55]]
    got = icl.option_scores(model, prefix, options)
    for o, s in zip(options, got):
        ids = torch.tensor([prefix + o])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        ref = sum(float(logp[len(prefix) - 1 + t, tok]) for t, tok in enumerate(o))
        assert s == pytest.approx(ref, abs=1e-4)


def test_option_scores_with_encoder_states_match_a_full_forward():
    model = tiny_cepe()
    prefix, options = [256, 40, 41, 42, 43], [[50, 51], [52], [53, 54, 55]]
    enc = torch.randint(3, 250, (1, 2, 16))
    mask = torch.ones_like(enc)
    mask[0, 1, 10:] = 0
    with torch.no_grad():
        states = model.encode(enc, mask)
    got = icl.option_scores(model, prefix, options, states)
    for o, s in zip(options, got):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prefix + o]), encoder_input_ids=enc, encoder_attention_mask=mask).logits
        logp = torch.log_softmax(logits[0].float(), -1)
        assert s == pytest.approx(sum(float(logp[len(prefix) - 1 + t, tok]) for t, tok in enumerate(o)), abs=1e-4)
    assert got != icl.option_scores(model, prefix, options)  # the encoder states reach the scores


def test_labels_and_data_errors():
    errors = DataErrors()
    train, test, options, _ = icl.load_set(str(FIXTURES), "sst2", errors)
    assert options == [" negative", " positive"] and [t.label for t in test] == [1, 0, 1]  # "positive" by name
    path = FIXTURES / "sst2" / "test.jsonl"
    assert errors.lines == [f"{path} line 3: field 'label': unknown label 'neutral' (not one of sst2's 2 options)",
                            f"{path} line 4: field 'sentence': expected a non-empty string"]
    _, test, options, _ = icl.load_set(str(FIXTURES), "banking77", DataErrors())
    assert options == [" balance", " lost or stolen card", " card arrival"] and test[0].label == 1  # labels.json
    _, _, options, _ = icl.load_set(str(FIXTURES), "nlu_intent", DataErrors())
    assert options == [" alarm set", " weather query"]  # names met in train.jsonl


def _icl(model, out, *extra):
    return CliRunner().invoke(cli, ["evaluate", "--task", "icl", "--progress", "false", "--model", str(model),
                                    "--data", str(FIXTURES), "--demos", "1", "--icl-encoder-demos", "3",
                                    "--icl-decoder-demos", "1", "--icl-decoder-demos", "4", "--icl-seeds", "42",
                                    "--icl-seeds", "43", "--output", str(out), *extra])


def test_icl_runs_every_set_with_a_cepe_model_and_a_plain_decoder(tmp_path):
    result = _icl(save_tiny_cepe(tmp_path / "cepe", max_positions=1024), tmp_path / "c")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert list(metrics["icl"]) == OFFICIAL.split(",")
    assert list(metrics["icl"]["sst2"]) == ["cepe-1+3", "decoder-1", "decoder-4"]
    row = metrics["icl"]["sst2"]["cepe-1+3"]
    assert row["n"] == 3 and [s["seed"] for s in row["seeds"]] == [42, 43]
    assert all(0 <= row[m] <= 100 for m in icl.METRICS)
    assert metrics["data_errors"] == 3  # two in sst2, clinic150's label 7
    preds = [json.loads(l) for l in (tmp_path / "c" / "pred" / "clinic150" / "cepe-1+3" / "seed42.jsonl").read_text().splitlines()]
    assert preds[0]["label"] == "book flight" and preds[0]["encoder_demos"] == 3
    assert len((tmp_path / "c" / "icl_by_demos.tsv").read_text().splitlines()) == 1 + 11 * 3

    result = _icl(save_tiny(tmp_path / "plain", max_positions=1024), tmp_path / "p", "--subtasks", "sst2,mr")
    assert result.exit_code == 0, result.output
    plain = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert list(plain["icl"]["mr"]) == ["decoder-1", "decoder-4"]
    # the CEPE model wraps this decoder: without encoder input it picks the same options
    assert plain["icl"]["sst2"]["decoder-4"] == metrics["icl"]["sst2"]["decoder-4"]


def test_icl_missing_set_file(tmp_path):
    result = _icl(tmp_path / "no-model", tmp_path / "o", "--data", str(tmp_path), "--subtasks", "mr")
    assert result.exit_code == 2 and "mr/train.jsonl does not exist" in result.output
    result = _icl(tmp_path / "no-model", tmp_path / "o", "--subtasks", "imdb")
    assert result.exit_code == 2 and "unknown ICL set 'imdb'" in result.output
