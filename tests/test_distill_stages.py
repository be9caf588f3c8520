"""`cepe teacher-logits` + `cepe distill` end to end on tiny models and shard directories."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from _train_helpers import write_shards
from conftest import tiny_cepe, tiny_decoder

from pipeline.config import ConfigError
from pipeline.errors import CepeError
from pipeline.stages.distill import DistillConfig
from pipeline.stages.distill import run as run_distill
from pipeline.stages.teacher_logits import TeacherLogitsConfig
from pipeline.stages.teacher_logits import run as run_logits
from pipeline.train.teacher_shards import TeacherLogits

GEOM = dict(decoder_len=16, n_chunks=2, chunk_len=8)
CTX, DEC, K = 16, 12, 5


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Teacher directory, a student CEPE model around the same weights, prevdoc shards, logits."""
    root = tmp_path_factory.mktemp("ceped")
    teacher = tiny_decoder()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10)
    teacher.save_pretrained(root / "teacher")
    from transformers import AutoModelForCausalLM

    student = tiny_cepe(AutoModelForCausalLM.from_pretrained(root / "teacher"))
    student.save_pretrained(root / "student")
    data = write_shards(root / "prev", "prevdoc", n_train=24, n_val=4, **GEOM)
    logits_cfg = TeacherLogitsConfig(data=str(data), output=str(root / "logits"), teacher=str(root / "teacher"),
                                     splits=["train"], k=K, teacher_context_len=CTX, decoder_len=DEC, batch_size=5,
                                     progress=False)
    summary = run_logits(logits_cfg)
    return {"root": root, "teacher": root / "teacher", "student": root / "student", "data": data,
            "logits": root / "logits", "summary": summary}


def distill_config(world, tmp_path, **kw):
    values = dict(data=[str(world["data"])], logits=[str(world["logits"])], output=str(tmp_path / "run"),
                  model=str(world["student"]), teacher=str(world["teacher"]), teacher_context_len=CTX,
                  decoder_len=DEC, k=K, max_steps=6, batch_size=4, lr=1e-2, warmup_ratio=0.1, eval_windows=4,
                  eval_last_tokens=8, compare_windows=4, compare_batch_size=2, progress=False, seed=0, grad_accum=1)
    values.update(kw)
    return DistillConfig(**values)


def test_teacher_logits_manifest_records_teacher_data_and_structure(world):
    manifest = json.loads((world["logits"] / "manifest.json").read_text())
    data_manifest = json.loads((world["data"] / "manifest.json").read_text())
    assert manifest["k"] == K and manifest["teacher_context_len"] == CTX and manifest["decoder_len"] == DEC
    assert manifest["teacher"]["resolved"] == str(world["teacher"].resolve())
    assert len(manifest["teacher"]["fingerprint"]) == 16
    assert manifest["data"]["fingerprint"] == data_manifest["fingerprint"]
    assert manifest["dtypes"] == {"topk_probs": "float16", "topk_ids": "int32", "tail": "float16", "row_hash": "int64"}
    data_shards = data_manifest["splits"]["train"]["shards"]
    assert [(s["file"], s["rows"]) for s in manifest["splits"]["train"]["shards"]] == \
        [(p["path"].split("/")[-1], p["rows"]) for p in data_shards]
    logits = TeacherLogits(world["logits"], "train")
    assert len(logits) == 24 and logits[23]["topk_probs"].shape == (DEC, K)
    assert world["summary"]["teacher_ppl"]["train"] > 1


def test_distill_precomputed_and_online_train_the_same_and_report_the_comparison(world, tmp_path):
    pre = run_distill(distill_config(world, tmp_path, output=str(tmp_path / "pre")))
    online = run_distill(distill_config(world, tmp_path, output=str(tmp_path / "online"), teacher_mode="online"))
    for key in ("kl_first", "kl_last", "loss_first", "loss_last", "val_ppl_student", "val_kl_student"):
        assert online[key] == pytest.approx(pre[key], rel=1e-4), key
    for key in ("val_ppl_student", "val_ppl_decoder_only", "val_ppl_teacher", "val_kl_student",
                "val_kl_decoder_only", "val_kl_full_student", "val_kl_full_decoder_only"):
        assert np.isfinite(pre[key]), key
    written = json.loads((tmp_path / "pre" / "metrics.json").read_text())
    assert written["kl_first"] == pre["kl_first"] and written["teacher_mode"] == "precomputed"
    header = (tmp_path / "pre" / "steps.tsv").read_text().splitlines()[0].split("\t")
    assert {"ce", "kl"} <= set(header)


def test_kl_falls_when_distilling(world, tmp_path):
    """With the KL alone the student moves towards the teacher's top-k (drop mode: towards the
    renormalised top-k, the optimum of the un-renormalised objective)."""
    metrics = run_distill(distill_config(world, tmp_path, lm_weight=0.0, kl_weight=1.0, max_steps=20, batch_size=8,
                                         lr=3e-3, compare_windows=0))
    assert metrics["kl_last"] < 0.25 * metrics["kl_first"], metrics


def test_prefix_of_windows(world, tmp_path):
    """teacher_logits.max_windows covers the first rows only; distill trains on those."""
    cfg = TeacherLogitsConfig(data=str(world["data"]), output=str(tmp_path / "logits10"), teacher=str(world["teacher"]),
                              splits=["train"], k=K, teacher_context_len=CTX, decoder_len=DEC, max_windows=15,
                              progress=False)
    run_logits(cfg)
    logits = TeacherLogits(tmp_path / "logits10", "train")
    assert logits.rows == [12, 3] and len(logits) == 15
    metrics = run_distill(distill_config(world, tmp_path, logits=[str(tmp_path / "logits10")], max_steps=2,
                                         compare_windows=0))
    assert metrics["steps"] == 2


def _other_build(world, tmp_path, **kw):
    return write_shards(tmp_path / "other", "prevdoc", n_train=24, n_val=4, seed=kw.pop("seed", 1), **GEOM)


def test_misaligned_logits_are_rejected_before_training(world, tmp_path):
    other = _other_build(world, tmp_path)
    with pytest.raises(CepeError, match="computed for another data build"):
        run_distill(distill_config(world, tmp_path, data=[str(other)]))
    assert not (tmp_path / "run" / "steps.tsv").exists()
    # another tokenizer recorded by the data
    manifest = json.loads((world["data"] / "manifest.json").read_text())
    manifest["tokenizer"] = {**manifest["tokenizer"], "name": "other", "sha256": "f" * 64}
    retok = tmp_path / "retok"
    shutil.copytree(world["data"], retok)
    (retok / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CepeError, match="tokenized with .* but .* was tokenized with other"):
        run_distill(distill_config(world, tmp_path, data=[str(retok)]))
    # another split: logits of the validation split presented as the training split's
    val_logits = tmp_path / "val-logits"
    run_logits(TeacherLogitsConfig(data=str(world["data"]), output=str(val_logits), teacher=str(world["teacher"]),
                                   splits=["validation"], k=K, teacher_context_len=CTX, decoder_len=DEC, progress=False))
    m = json.loads((val_logits / "manifest.json").read_text())
    m["splits"]["train"] = m["splits"].pop("validation")
    (val_logits / "manifest.json").write_text(json.dumps(m))
    (val_logits / "validation").rename(val_logits / "train")
    with pytest.raises(CepeError, match="holds 2 rows but the data shard holds 12"):
        run_distill(distill_config(world, tmp_path, logits=[str(val_logits)]))
    # another window split than the logits were computed with
    with pytest.raises(CepeError, match="teacher_context_len is 16 but this run uses teacher_context_len=8"):
        run_distill(distill_config(world, tmp_path, teacher_context_len=8))
    assert not (tmp_path / "run" / "steps.tsv").exists()


def test_config_checks():
    with pytest.warns(UserWarning, match="kl_weight is 0 with teacher"):
        DistillConfig(kl_weight=0)
    with pytest.raises(ConfigError, match="kl_mode"):
        DistillConfig(kl_mode="hard")
    with pytest.raises(ConfigError, match="both are 0"):
        DistillConfig(kl_weight=0, lm_weight=0)
    with pytest.raises(ConfigError, match="one teacher-logits directory per data directory"):
        DistillConfig(data=["a", "b"], logits=["x"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DistillConfig()  # the defaults are the paper's: kl_weight 2, no warning


def test_cli_unknown_teacher_lists_known_names(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cepe_cli.main import cli

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["teacher-logits", "--teacher", "llama-9-chat"])
    assert result.exit_code == 2
    assert "unknown teacher 'llama-9-chat'" in result.output and "llama-2-7b-chat" in result.output
    result = CliRunner().invoke(cli, ["distill", "--teacher-mode", "sometimes"])
    assert result.exit_code == 2 and "sometimes" in result.output


def test_teacher_with_another_tokenizer_is_refused(world, tmp_path):
    from pipeline.data.tokenize import load_tokenizer, tokenizer_hash
    from pipeline.train.teacher_setup import check_tokenizer
    from pipeline.train.teacher import resolve_teacher

    teacher_dir = tmp_path / "teacher"
    shutil.copytree(world["teacher"], teacher_dir)
    tok = load_tokenizer("embedded")
    tok.save_pretrained(teacher_dir)
    ref = resolve_teacher(str(teacher_dir))
    check_tokenizer(None, {"tokenizer": {"name": "embedded", "sha256": tokenizer_hash(tok)}}, ref)
    with pytest.raises(CepeError, match="has another tokenizer .* than the windows in data"):
        check_tokenizer(None, {"tokenizer": {"name": "llama-2", "sha256": "0" * 64}}, ref)


@pytest.mark.parametrize("section,cls", [("teacher_logits", TeacherLogitsConfig), ("distill", DistillConfig)])
def test_params_yaml_sections_load_key_for_key(section, cls):
    import dataclasses
    from pathlib import Path

    import yaml

    from pipeline.config import load_config
    from pipeline.stages.train import TrainConfig

    params_file = Path(__file__).resolve().parent.parent / "params.yaml"
    values = yaml.safe_load(params_file.read_text())[section]
    config = load_config(cls, section, params_file)
    for key, value in values.items():
        assert getattr(config, key) == value, key
    fields = {f.name for f in dataclasses.fields(cls)}
    own = fields - {f.name for f in dataclasses.fields(TrainConfig)} if cls is DistillConfig else fields
    assert set(values) <= fields
    assert own <= set(values)  # every CEPED key is spelled out (dvc tracks exactly what runs)


def test_online_teacher_is_the_students_decoder_when_the_weights_match(world, tmp_path):
    from pipeline.model import CepeForCausalLM
    from pipeline.stages.distill import build_teacher
    from pipeline.train.teacher import weights_fingerprint

    student = CepeForCausalLM.from_pretrained(world["student"])
    fp = weights_fingerprint(student.decoder)
    shutil.copytree(world["teacher"], tmp_path / "copy")  # same weights, another path: shared after a check
    fn, separate = build_teacher(distill_config(world, tmp_path, teacher=str(tmp_path / "copy"), teacher_mode="online"),
                                 student, fp, log=lambda m: None)
    assert fn.model is None and separate is None
    tiny_decoder(seed=5).save_pretrained(tmp_path / "other")  # another model: held apart, with a warning
    said = []
    fn, separate = build_teacher(distill_config(world, tmp_path, teacher=str(tmp_path / "other"), teacher_mode="online"),
                                 student, fp, log=said.append)
    assert fn.model is separate and separate is not None and "not the student's frozen decoder" in said[0]
