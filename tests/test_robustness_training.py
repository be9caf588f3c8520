"""Failure paths of the training and data stages (issue 17): nothing silently wrong, nothing lost,
nothing run from a file. Each test reproduces one case on tiny models (CPU, seconds)."""

from __future__ import annotations

import csv
import errno
import json
import os
import pickle
import shutil
import signal

import numpy as np
import pytest
import torch

from _train_helpers import pattern_corpus, write_shards
from conftest import tiny_cepe, tiny_decoder
from pipeline.config import ConfigError
from pipeline.errors import CepeError
from pipeline.train.collate import LmCollator
from pipeline.train.loop import (LoopOptions, TrainingDiverged, TrainingInterrupted, TrainTask, _Trainer,
                                 list_checkpoints, run_training)
from pipeline.train.losses import causal_lm_loss, eval_last_tokens_nll

GEOM = dict(decoder_len=16, n_chunks=2, chunk_len=8)
TIMING_COLUMNS = {"tokens_per_s", "elapsed_s"}
TIMING_METRICS = {"wall_time_s", "tokens_per_s", "peak_memory_gb", "decoder_tokens_per_s", "encoder_tokens_per_s",
                  "model_flops_per_s", "mfu"}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# the loop on a tiny plain decoder

TRAIN = pattern_corpus(48, 33, seed=0)
VAL = pattern_corpus(8, 33, seed=1)


def make_model(seed: int = 0):
    model = tiny_decoder(seed=seed)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(("model.embed_tokens.", "model.layers.0.")))
    return model


def make_task(model=None, compute_loss=causal_lm_loss):
    return TrainTask(model=model if model is not None else make_model(), train_data=TRAIN, collate=LmCollator(),
                     compute_loss=compute_loss, val_data=VAL, val_collate=LmCollator(eval_last=16),
                     eval_nll=eval_last_tokens_nll)


def options(out, **kw):
    values = dict(output=str(out), max_steps=10, batch_size=4, lr=3e-3, warmup_ratio=0.1, progress=False, seed=3,
                  eval_every=4, save_every=4, keep_checkpoints=2)
    values.update(kw)
    return LoopOptions(**values)


def tables(out):
    """steps.tsv and validation.tsv without timing columns, metrics.json without timings."""
    def read(name):
        with open(out / name, newline="") as fh:
            return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(fh, delimiter="\t")]

    metrics = json.loads((out / "metrics.json").read_text())
    return read("steps.tsv"), read("validation.tsv"), {k: v for k, v in metrics.items() if k not in TIMING_METRICS}


class Killed(BaseException):
    """Stands for kill -9: nothing of the loop catches it."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    run_training(make_task(), options(out))
    return tables(out)


def _kill_after_save_at(step):
    real = _Trainer.save_checkpoint

    def save(self):
        path = real(self)
        if self.state["step"] == step:
            raise Killed
        return path
    return save


def _kill_after_validation_at(step):
    real = _Trainer._validate

    def validate(self, logger):
        res = real(self, logger)
        if self.state["step"] == step:
            raise Killed
        return res
    return validate


@pytest.mark.parametrize("kill", ["checkpoint-4-appears", "validation-8-written", "mid-step-6",
                                  "final-checkpoint", "sigterm-at-8"])
def test_kill_and_resume_gives_the_uninterrupted_tables(kill, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    task = make_task()
    if kill == "checkpoint-4-appears":  # the case: killed the moment step-N appears
        monkeypatch.setattr(_Trainer, "save_checkpoint", _kill_after_save_at(4))
    elif kill == "validation-8-written":  # its row written, its checkpoint not yet
        monkeypatch.setattr(_Trainer, "_validate", _kill_after_validation_at(8))
    elif kill == "final-checkpoint":  # the last checkpoint written, model/ and metrics.json not
        monkeypatch.setattr(_Trainer, "save_checkpoint", _kill_after_save_at(10))
    elif kill == "mid-step-6":
        calls = {"n": 0}

        def crashing(model, batch):
            calls["n"] += 1
            if calls["n"] == 6:
                raise Killed
            return causal_lm_loss(model, batch)
        task = make_task(compute_loss=crashing)
    else:  # a signal at a validation step: its checkpoint is written before the validation
        calls = {"n": 0}

        def signalling(model, batch):
            calls["n"] += 1
            if calls["n"] == 8:
                os.kill(os.getpid(), signal.SIGTERM)
            return causal_lm_loss(model, batch)
        task = make_task(compute_loss=signalling)
    with pytest.raises((Killed, TrainingInterrupted)):
        run_training(task, options(out))
    monkeypatch.undo()
    metrics = run_training(make_task(), options(out), resume="auto")
    steps, validation, summary = tables(out)
    ref_steps, ref_validation, ref_summary = reference
    assert [r["step"] for r in validation] == ["4", "8", "10"]
    assert validation == ref_validation
    assert steps == ref_steps
    assert summary == ref_summary
    assert metrics["loss"] is not None and metrics["loss_last"] is not None


# ---------------------------------------------------------------------------------------------
# 4: non-finite loss, strict JSON


def test_lr_inf_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="lr: expected a finite number, got inf"):
        LoopOptions(lr=float("inf"))
    from click.testing import CliRunner

    from cepe_cli.main import cli

    res = CliRunner().invoke(cli, ["train", "--lr", "inf", "--output", "/nonexistent/x"])
    assert res.exit_code == 2 and res.output.strip().count("\n") == 0 and "lr" in res.output


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def diverging(model, batch):
        calls["n"] += 1
        loss, metrics = causal_lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] == 4 else loss), metrics

    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"step 4: loss nan.*diverged.*step-3, is kept") as info:
        run_training(make_task(compute_loss=diverging), options(out, save_every=1, eval_every=0))
    assert "\n" not in str(info.value)
    kept = list_checkpoints(out / "checkpoints")
    assert [p.name for p in kept] == ["step-2", "step-3"]
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(kept[-1] / "trainable.safetensors").values())
    assert not (out / "metrics.json").exists()


def test_metrics_files_are_strict_json(tmp_path):
    from pipeline.io import atomic_write_json

    atomic_write_json(tmp_path / "m.json", {"loss": float("nan"), "ppl": [float("inf"), 1.5], "n": 3})

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse) == {"loss": None, "ppl": [None, 1.5], "n": 3}
    task = make_task()
    task.val_data = []  # no validation at all: val_loss stays null
    run_training(task, options(tmp_path / "run", max_steps=2, save_every=0, eval_every=0))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text(), parse_constant=refuse)
    assert metrics["val_loss"] is None and metrics["loss"] is not None


# ---------------------------------------------------------------------------------------------
# 5, 6: resume settings, checkpoints never deleted


def test_resume_path_applies_the_settings_check(tmp_path):
    out = tmp_path / "run"
    run_training(make_task(), options(out, max_steps=4))
    with pytest.raises(CepeError, match=r"--resume .*step-4: cannot continue this run: .*lr 0.003 -> 0.001"):
        run_training(make_task(), options(out, max_steps=4, lr=1e-3), resume=str(out / "checkpoints" / "step-4"))


def test_max_steps_may_grow_on_resume_and_the_change_is_printed(tmp_path, capsys):
    out = tmp_path / "run"
    run_training(make_task(), options(out, max_steps=4))
    capsys.readouterr()
    metrics = run_training(make_task(), options(out, max_steps=8), resume=str(out / "checkpoints" / "step-4"))
    printed = capsys.readouterr()
    assert "max_steps 4 -> 8" in printed.out + printed.err
    assert metrics["steps"] == 8 and metrics["samples_seen"] == 32
    steps, validation, _ = tables(out)
    assert [r["step"] for r in steps] == [str(i) for i in range(1, 9)]
    assert [r["step"] for r in validation] == ["4", "8"]  # step 4's row once


@pytest.mark.parametrize("resume", [None, "auto"])
def test_earlier_checkpoints_are_moved_aside_never_deleted(resume, tmp_path, capsys):
    out = tmp_path / "run"
    run_training(make_task(), options(out, max_steps=4, save_every=2))
    before = {p.name: (p / "trainable.safetensors").read_bytes() for p in list_checkpoints(out / "checkpoints")}
    capsys.readouterr()
    metrics = run_training(make_task(), options(out, max_steps=4, save_every=2, lr=1e-3), resume=resume)
    printed = capsys.readouterr()
    assert metrics["samples_seen"] == 16  # trained from step 0
    aside = sorted(tmp_path.glob("run/checkpoints.superseded-*"))
    assert len(aside) == 1 and f"to {aside[0]}" in printed.out + printed.err
    assert {p.name: (p / "trainable.safetensors").read_bytes() for p in aside[0].iterdir()} == before


# ---------------------------------------------------------------------------------------------
# 8: leftovers and a full disk


def test_the_next_run_cleans_what_a_killed_run_left(tmp_path, capsys):
    out = tmp_path / "run"
    run_training(make_task(), options(out, max_steps=4, save_every=2))  # step-2, step-4
    ck = out / "checkpoints"
    (ck / ".step-6.tmp").mkdir()  # a checkpoint being written (a full disk, a kill)
    (ck / ".step-6.tmp" / "trainable.safetensors").write_bytes(b"x" * 100)
    (ck / ".step-0.pruning").mkdir()  # one being pruned
    half = ck / "step-1"  # half removed by pruning: its state.json already gone
    half.mkdir()
    (half / "optimizer.safetensors").write_bytes(b"x")
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (out / f".model.{dead}.abcd1234.tmp").mkdir()  # a kill during the final save
    (out / f".metrics.json.{dead}.abcd1234.tmp").write_text("{")
    capsys.readouterr()
    run_training(make_task(), options(out, max_steps=6, save_every=2), resume="auto")
    printed = capsys.readouterr()
    text = printed.out + printed.err
    for name in (".step-6.tmp", ".step-0.pruning", "step-1"):
        assert not (ck / name).exists() and f"removed {ck / name}" in text
    assert not list(out.glob(".model.*.tmp")) and not list(out.glob(".metrics.json.*.tmp"))
    assert sorted(p.name for p in ck.iterdir()) == ["step-4", "step-6"]


def test_prepare_data_style_directory_leftovers_are_cleaned(tmp_path, capsys):
    from pipeline.io import atomic_directory

    out = tmp_path / "shards"
    dead = 2**22 + 12345
    (tmp_path / f".shards.{dead}.k2j3h4g5.tmp").mkdir()  # a killed prepare-data
    (tmp_path / ".shards.q8w7e6r5.tmp").mkdir()  # the same from an earlier version (no pid)
    (tmp_path / f".other.{dead}.aaaa.tmp").mkdir()  # not this output's: kept
    with atomic_directory(out) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.{dead}.aaaa.tmp", "shards"]
    assert capsys.readouterr().err.count("left by an interrupted earlier run") == 2


def test_a_full_disk_is_one_line_and_leaves_no_temporary_checkpoint(tmp_path, monkeypatch):
    import pipeline.train.loop as loop

    out = tmp_path / "run"

    def full_disk(tensors, path):
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    real = loop.save_tensors
    calls = {"n": 0}

    def sometimes_full(tensors, path):
        calls["n"] += 1
        return real(tensors, path) if calls["n"] == 1 else full_disk(tensors, path)
    monkeypatch.setattr(loop, "save_tensors", sometimes_full)
    with pytest.raises(CepeError, match=r"trainable.safetensors: no space left on device .*step-2, is kept") as info:
        run_training(make_task(), options(out, max_steps=6, save_every=2))
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]


# ---------------------------------------------------------------------------------------------
# 9: nothing is unpickled


class _Trap:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling calls open(marker, "w"): creates the file
        return (open, (self.marker, "w"))


def test_a_crafted_pickle_in_a_checkpoint_runs_nothing(tmp_path):
    out = tmp_path / "run"
    run_training(make_task(), options(out, max_steps=4, save_every=2))
    marker = tmp_path / "pwned"
    step = out / "checkpoints" / "step-2"
    for name in ("scheduler.pt", "optimizer.pt", "rng-0.pt", "trainable.pt"):
        (step / name).write_bytes(pickle.dumps(_Trap(str(marker))))
    metrics = run_training(make_task(), options(out, max_steps=4, save_every=2), resume=str(step))
    assert not marker.exists() and metrics["steps"] == 4
    # a checkpoint of the earlier pickle format is not loaded at all: set aside, training from 0
    old = out / "checkpoints" / "step-4"
    state = json.loads((old / "state.json").read_text())
    state.pop("format")
    (old / "state.json").write_text(json.dumps(state))
    with pytest.raises(CepeError, match="checkpoint format 1"):
        run_training(make_task(), options(out, max_steps=4, save_every=2), resume=str(old))
    metrics = run_training(make_task(), options(out, max_steps=4, save_every=2), resume="auto")
    assert not marker.exists() and metrics["samples_seen"] == 16


def test_state_files_round_trip_types(tmp_path):
    import random

    from pipeline.train.state_files import load_state, save_state

    obj = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "opt": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"betas": (0.9, 0.99), "lr": float("inf")}]}}
    save_state(obj, tmp_path, "s")
    back = load_state(tmp_path, "s")
    assert back["python"] == obj["python"]
    random.setstate(back["python"])
    np.random.set_state(back["numpy"])
    assert back["numpy"][1].dtype == np.uint32 and np.array_equal(back["numpy"][1], obj["numpy"][1])
    assert torch.equal(back["torch"], obj["torch"])
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.99) and 0 in back["opt"]["state"]


# ---------------------------------------------------------------------------------------------
# stages: tokenizer, shard content, manifest paths, wrong model directories, config.yaml


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    decoder = tiny_decoder()
    decoder.save_pretrained(root / "decoder")
    from transformers import AutoModelForCausalLM

    student = tiny_cepe(AutoModelForCausalLM.from_pretrained(root / "decoder"))
    student.config.decoder_name_or_path = str(root / "decoder")
    student.save_pretrained(root / "student")
    data = write_shards(root / "prev", "prevdoc", n_train=16, n_val=4, **GEOM)
    return {"root": root, "decoder": root / "decoder", "student": root / "student", "data": data}


def train_config(world, tmp_path, **kw):
    from pipeline.stages.train import TrainConfig

    values = dict(data=[str(world["data"])], model=str(world["student"]), output=str(tmp_path / "train"),
                  max_steps=2, batch_size=2, grad_accum=1, progress=False, eval_windows=2, eval_last_tokens=8)
    values.update(kw)
    return TrainConfig(**values)


def _copy_data(world, tmp_path, edit_manifest=None):
    root = tmp_path / "data"
    shutil.copytree(world["data"], root)
    if edit_manifest:
        m = json.loads((root / "manifest.json").read_text())
        edit_manifest(m)
        (root / "manifest.json").write_text(json.dumps(m))
    return root


def test_train_refuses_shards_of_another_tokenizer(world, tmp_path):
    from pipeline.data.tokenize import load_tokenizer, tokenizer_hash
    from pipeline.stages.train import run

    # the model's tokenizer is known (its decoder directory holds one): hashes compared
    tok = load_tokenizer("embedded")
    student = tmp_path / "student"
    shutil.copytree(world["student"], student)
    tok.save_pretrained(student)
    data = _copy_data(world, tmp_path, lambda m: m["tokenizer"].update(name="other-800", sha256="e" * 64, vocab_size=800))
    with pytest.raises(CepeError, match=r"model: .*student has another tokenizer .* than the windows in .*other-800"):
        run(train_config(world, tmp_path, data=[str(data)], model=str(student)))
    assert not (tmp_path / "train" / "config.yaml").exists()  # 11: a failed run claims nothing
    m = json.loads((data / "manifest.json").read_text())
    m["tokenizer"]["sha256"] = tokenizer_hash(tok)
    (data / "manifest.json").write_text(json.dumps(m))
    from pipeline.data.shards import check_tokenizer

    check_tokenizer(m["tokenizer"], key="d", tokenizer_dirs=[student], vocab_size=128, model="model")
    # no tokenizer anywhere: the vocabulary bound is what is left
    with pytest.raises(CepeError, match=r"model: a 128-token vocabulary, but the windows .* 800-token tokenizer"):
        run(train_config(world, tmp_path, data=[str(data)]))


@pytest.mark.parametrize("fill", [0x00, 0xFF])
def test_a_damaged_shard_stops_the_stage_naming_it(fill, world, tmp_path):
    from pipeline.data.shards import ShardDataset
    from pipeline.stages.train import run

    data = _copy_data(world, tmp_path)
    shard = data / "train" / "shard-00001.arrow"
    shard.write_bytes(bytes([fill]) * shard.stat().st_size)
    with pytest.raises(CepeError, match=r"train/shard-00001.arrow: sha256 .* does not match") as info:
        run(train_config(world, tmp_path, data=[str(data)]))
    assert "\n" not in str(info.value)
    with pytest.raises(CepeError, match="shard-00001.arrow: sha256"):
        ShardDataset(data, "train")


@pytest.mark.parametrize("bad", ["../../prev/train/shard-00000.arrow", "/etc/passwd", "train/../../x.arrow"])
def test_manifest_paths_must_stay_inside_the_shard_directory(bad, world, tmp_path):
    from pipeline.data.shards import ShardDataset, verify_shards

    data = _copy_data(world, tmp_path, lambda m: m["splits"]["train"]["shards"][0].update(path=bad))
    for open_ in (lambda: ShardDataset(data, "train"), lambda: verify_shards(data)):
        with pytest.raises(CepeError, match=rf"manifest.json: shard path .* leaves the shard directory"):
            open_()


def test_logits_manifest_file_names_stay_inside(tmp_path):
    from pipeline.train.teacher import LOGITS_FORMAT
    from pipeline.train.teacher_shards import LOGITS_VERSION, TeacherLogits

    (tmp_path / "manifest.json").write_text(json.dumps({
        "format": LOGITS_FORMAT, "version": LOGITS_VERSION, "decoder_len": 4, "k": 2,
        "splits": {"train": {"shards": [{"file": "../../secret.arrow", "rows": 1}]}}}))
    with pytest.raises(CepeError, match="is not a file name inside"):
        TeacherLogits(tmp_path, "train")


def test_wrong_model_directories_and_truncated_weights_are_one_line(world, tmp_path):
    from pipeline.stages.train import run

    with pytest.raises(CepeError, match=r"model: .*decoder holds a plain llama decoder, expected a CEPE model"):
        run(train_config(world, tmp_path, model=str(world["decoder"])))
    from pipeline.model import CepeEncoderForMaskedLM, build_encoder_config

    enc = CepeEncoderForMaskedLM(build_encoder_config(128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=4, num_key_value_heads=4))
    enc.save_pretrained(tmp_path / "encoder")
    with pytest.raises(CepeError, match=r"holds a CEPE encoder .*, expected a CEPE model"):
        run(train_config(world, tmp_path, model=str(tmp_path / "encoder")))
    cut = tmp_path / "cut"
    shutil.copytree(world["student"], cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CepeError, match=r"model: .*model.safetensors is unreadable .*truncated"):
        run(train_config(world, tmp_path, model=str(cut)))
    assert not (tmp_path / "train" / "config.yaml").exists()


def test_a_truncated_checkpoint_file_on_resume_is_one_line(tmp_path):
    out = tmp_path / "run"
    run_training(make_task(), options(out, max_steps=4, save_every=2))
    step = out / "checkpoints" / "step-4"
    weights = step / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CepeError, match="incomplete checkpoint"):
        run_training(make_task(), options(out, max_steps=4, save_every=2), resume=str(step))
    state = json.loads((step / "state.json").read_text())  # the same bytes, sizes recorded to match
    state["files"]["trainable.safetensors"] = 1000
    (step / "state.json").write_text(json.dumps(state))
    with pytest.raises(CepeError, match=r"trainable.safetensors: unreadable .*truncated or corrupt") as info:
        run_training(make_task(), options(out, max_steps=4, save_every=2), resume=str(step))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# 1: the teacher asked for is the teacher that computed the logits


def test_distill_refuses_logits_of_another_teacher(world, tmp_path):
    from pipeline.stages.distill import DistillConfig
    from pipeline.stages.distill import run as run_distill
    from pipeline.stages.teacher_logits import TeacherLogitsConfig
    from pipeline.stages.teacher_logits import run as run_logits
    from pipeline.train.teacher import resolve_teacher, same_teacher

    logits = tmp_path / "logits"
    run_logits(TeacherLogitsConfig(data=str(world["data"]), output=str(logits), teacher=str(world["decoder"]),
                                   splits=["train"], k=3, teacher_context_len=8, decoder_len=8, progress=False))
    config = DistillConfig(data=[str(world["data"])], logits=[str(logits)], output=str(tmp_path / "run"),
                           model=str(world["student"]), teacher="llama-2-7b-chat", teacher_context_len=8,
                           decoder_len=8, k=3, max_steps=1, batch_size=2, progress=False, compare_windows=0,
                           eval_windows=2, eval_last_tokens=4, grad_accum=1)
    with pytest.raises(CepeError, match=r"computed by teacher .*decoder.* but this run's teacher is "
                                        r"'llama-2-7b-chat' \(meta-llama/Llama-2-7b-chat-hf\)"):
        run_distill(config)
    assert not (tmp_path / "run" / "metrics.json").exists()
    recorded = json.loads((logits / "manifest.json").read_text())["teacher"]
    assert same_teacher(resolve_teacher(str(world["decoder"])), recorded)
    copy = tmp_path / "copy"
    shutil.copytree(world["decoder"], copy)
    assert not same_teacher(resolve_teacher(str(copy)), recorded)  # another directory is another teacher


def test_evaluate_refuses_shards_of_another_tokenizer(world, tmp_path):
    from click.testing import CliRunner

    from cepe_cli.main import cli
    from eval_helpers import save_tiny_cepe

    model_dir = save_tiny_cepe(tmp_path / "m", max_positions=1024)
    data = _copy_data(world, tmp_path, lambda m: m["tokenizer"].update(name="other", sha256="e" * 64))
    res = CliRunner().invoke(cli, ["evaluate", "--task", "ppl", "--model", str(model_dir), "--data", str(data),
                                   "--shard-split", "validation", "--output", str(tmp_path / "out"),
                                   "--progress", "false"])
    assert res.exit_code == 2, res.output
    assert res.output.strip().count("\n") == 0 and "is not the one of the windows in" in res.output
