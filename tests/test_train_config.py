"""Training-stage configs: params.yaml sections, rejected keys and contradictions, the CLI commands."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from cepe_cli.main import cli
from cepe_cli.training import launch_command, strip_num_processes
from pipeline.config import ConfigError, load_config
from pipeline.stages.pretrain_encoder import PretrainEncoderConfig
from pipeline.stages.train import TrainConfig
from pipeline.stages.warmup import WarmupConfig

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = {"pretrain_encoder": PretrainEncoderConfig, "warmup": WarmupConfig, "train": TrainConfig}


@pytest.mark.parametrize("section", SECTIONS)
def test_every_params_yaml_key_is_accepted(section):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    values = params[section]
    config = load_config(SECTIONS[section], section, ROOT / "params.yaml")
    for key, value in values.items():
        got = getattr(config, key)
        assert got == value or (isinstance(value, float) and got == pytest.approx(value)), key
    # the params section is the resolved config, key for key (dvc tracks exactly what runs)
    assert set(values) <= {f.name for f in dataclasses.fields(SECTIONS[section])}


@pytest.mark.parametrize("section", SECTIONS)
def test_unknown_key_is_rejected_with_its_name(section, tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({section: {"lr": 1e-4, "learning_rate": 1e-4}}))
    with pytest.raises(ConfigError, match=rf"^{section}\.learning_rate: unknown key"):
        load_config(SECTIONS[section], section, p)


@pytest.mark.parametrize("cls, values, key", [
    (TrainConfig, {"context_mask_prob": 0.1, "context_mask_full_prob": 0.2}, "context_mask_full_prob"),
    (TrainConfig, {"data": []}, "data"),
    (TrainConfig, {"warmup_ratio": 1.5}, "warmup_ratio"),
    (TrainConfig, {"batch_size": 0}, "batch_size"),
    (TrainConfig, {"min_lr_ratio": 0.1, "lr_schedule": "linear"}, "min_lr_ratio"),
    (TrainConfig, {"eval_last_tokens": 0}, "eval_last_tokens"),
    (TrainConfig, {"mixed_precision": "fp8"}, "mixed_precision"),
    (TrainConfig, {"max_steps": "many"}, "max_steps"),
    (WarmupConfig, {"init_mode": "none"}, "init_mode"),
    (WarmupConfig, {"encoder": "random", "encoder_hidden_size": 30, "encoder_heads": 4}, "encoder_heads"),
    (WarmupConfig, {"num_cross_attn_layers": -1}, "num_cross_attn_layers"),
    (PretrainEncoderConfig, {"init": "decoder-layers", "decoder": ""}, "decoder"),
    (PretrainEncoderConfig, {"mlm_probability": 1.0}, "mlm_probability"),
    (PretrainEncoderConfig, {"keep_checkpoints": 0}, "keep_checkpoints"),
])
def test_invalid_or_contradictory_settings_name_the_key(cls, values, key):
    section = {TrainConfig: "train", WarmupConfig: "warmup", PretrainEncoderConfig: "pretrain_encoder"}[cls]
    with pytest.raises(ConfigError, match=rf"^{section}\.{key}: "):
        load_config(cls, section, None, values)


def test_tensorboard_without_the_package_fails_before_work():
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"^train\.tensorboard: .*tensorboard"):
            load_config(TrainConfig, "train", None, {"tensorboard": True})
    else:
        assert load_config(TrainConfig, "train", None, {"tensorboard": True}).tensorboard


def test_relaunch_command_line():
    argv = ["train", "--num-processes", "2", "-S", "lr=1e-4", "--num-processes=2", "--resume", "auto"]
    assert strip_num_processes(argv) == ["train", "-S", "lr=1e-4", "--resume", "auto"]
    cmd = launch_command(2, argv)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" in cmd
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[-6:] == ["cepe_cli.main", "train", "-S", "lr=1e-4", "--resume", "auto"]


def test_cli_help_and_missing_data_error(tmp_path, monkeypatch):
    runner = CliRunner()
    help_text = runner.invoke(cli, ["train", "--help"]).output
    for option in ("--resume", "--num-processes", "--context-mask-prob", "--lr", "--params", "--set"):
        assert option in help_text
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(cli, ["train", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "error: data: " in result.output and "no manifest.json" in result.output
    result = runner.invoke(cli, ["warmup", "-S", "lr=-1"])
    assert result.exit_code == 2 and "warmup.lr: expected a positive number" in result.output


def test_cli_warmup_runs_writes_resolved_config_and_resumes(tmp_path, monkeypatch):
    from _train_helpers import write_shards
    from conftest import tiny_decoder

    torch.set_num_threads(1)
    tiny_decoder().save_pretrained(tmp_path / "decoder")
    write_shards(tmp_path / "dup", "duplicate", n_train=16, n_val=4, decoder_len=16, n_chunks=2, chunk_len=8)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"warmup": {
        "data": str(tmp_path / "dup"), "output": str(tmp_path / "warm"), "decoder": str(tmp_path / "decoder"),
        "encoder": "random", "encoder_layers": 1, "encoder_hidden_size": 32, "encoder_intermediate_size": 64,
        "encoder_heads": 4, "max_steps": 4, "batch_size": 2, "grad_accum": 1, "save_every": 2, "progress": False}}))
    runner = CliRunner()
    result = runner.invoke(cli, ["warmup", "--params", str(params), "--lr", "1e-3"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((tmp_path / "warm" / "config.yaml").read_text())
    assert resolved["lr"] == 1e-3 and resolved["max_steps"] == 4 and resolved["init_mode"] == "zero"
    assert (tmp_path / "warm" / "model" / "config.json").is_file()
    # a finished run resumed: nothing left to train, the same outputs again
    result = runner.invoke(cli, ["warmup", "--params", str(params), "--lr", "1e-3", "--resume", "auto"])
    assert result.exit_code == 0, result.output
    steps = (tmp_path / "warm" / "steps.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in steps[1:]] == ["1", "2", "3", "4"]
