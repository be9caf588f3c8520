"""The `cepe` command group: every stage listed, version, and clear errors instead of tracebacks."""

from __future__ import annotations

from click.testing import CliRunner

from cepe_cli.main import COMMANDS, cli
from pipeline import __version__

STAGES = ["prepare-data", "pretrain-encoder", "warmup", "train", "teacher-logits", "distill", "evaluate", "bench"]


def test_help_lists_every_stage():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for stage in STAGES:
        assert stage in result.output
    assert set(STAGES) <= set(COMMANDS)


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_every_stage_has_help():
    for stage in COMMANDS:
        result = CliRunner().invoke(cli, [stage, "--help"])
        assert result.exit_code == 0, (stage, result.output)


def test_config_error_is_one_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(cli, ["convert-decoder", "--dtype", "int3", "--output", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: convert.dtype: expected one of float32, bfloat16, float16, got 'int3'"]
    assert not (tmp_path / "x").exists()


def test_unknown_override_key(tmp_path):
    result = CliRunner().invoke(cli, ["convert-decoder", "-S", "convert.dtipe=float32"])
    assert result.exit_code == 2 and "convert.dtipe: unknown key" in result.output
