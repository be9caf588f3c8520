"""`cepe results`: the stage wall times from the repro log, and the documents built from a run's files."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import CepeError
from pipeline.stages.results import ResultsConfig, _targets, read_log


def test_stage_times_come_from_the_timestamped_log(tmp_path):
    log = tmp_path / "repro.log"
    log.write_text("\n".join([
        "1000 $ dvc repro --pull",
        "1001 Running stage 'convert':",
        "1002 > cepe convert-decoder --section convert",
        "1031 Stage 'prepare' didn't change, skipping",
        "1031 Running stage 'warmup':",
        "1100 step 10 loss 3.1\rstep 20 loss 2.9",
        "1271 Running stage 'evaluate@ppl':",
        "1390 Updating lock file 'dvc.lock'",
    ]) + "\n")
    command, seconds = read_log(log)
    assert command == "dvc repro --pull"
    assert seconds == {"convert": 30.0, "warmup": 240.0, "evaluate@ppl": 119.0}
    with pytest.raises(CepeError, match="log: .*missing"):
        read_log(tmp_path / "nope.log")


def _fidelity(**kw):
    f = {"context_use_2k": {"value": 0.97}, "heldout_source": {"name": "books", "context_use": 0.85},
         "ppl_by_context": {"2048": {"cepe": 10.0, "other_document": 11.0}, "4096": {"cepe": 9.8, "other_document": 11.1},
                            "8192": {"cepe": 9.7, "other_document": 11.2}},
         "ruler": {"niah_single_1": {"2048": 40, "4096": 95, "8192": 92}, "niah_single_2": {"4096": 90, "8192": 91},
                   "niah_multikey_1": {"4096": 70, "8192": 55}},
         "warmup_copy_loss": 0.19, "ceped_kl_ratio": 0.41}
    f.update(kw)
    return f


def test_targets_are_judged_on_the_numbers():
    t = _targets(_fidelity())
    assert t["context_use_2k"]["met"] is True and t["heldout_source"]["met"] is False
    assert t["length_generalisation"]["met"] is True  # falls 10 > 9.8 > 9.7, gain 1.5 >= 1.0
    assert t["ruler_niah_single"]["met"] is True  # the 2K score is not a target
    assert t["ruler_niah_multikey_1"]["met"] is False and t["warmup_copy_loss"]["met"] is True
    assert t["ceped_kl_ratio"]["met"] is False
    flat = _targets(_fidelity(ppl_by_context={"2048": {"cepe": 10.0, "other_document": 11.0},
                                              "4096": {"cepe": 10.0, "other_document": 11.0}}))
    assert flat["length_generalisation"]["met"] is False  # not strictly falling
    unknown = _targets(_fidelity(heldout_source=None, ceped_kl_ratio=None))
    assert unknown["heldout_source"]["met"] is None and unknown["ceped_kl_ratio"]["met"] is None


def test_a_missing_run_file_is_named(tmp_path):
    from pipeline.stages.results import run

    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({s: {"output": str(tmp_path / s)} for s in
                                  ("pretrain_encoder", "warmup", "train", "distill", "evaluate_ppl",
                                   "evaluate_ppl_long", "evaluate_ruler")}))
    with pytest.raises(CepeError, match=r"pretrain_encoder/metrics.json: missing"):
        run(ResultsConfig(run_params=str(params), log="", output_dir=str(tmp_path / "docs")))
    assert not (tmp_path / "docs").exists()
