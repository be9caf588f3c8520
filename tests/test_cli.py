"""The `cepe` command group: every stage listed, version, and clear errors instead of tracebacks."""

from __future__ import annotations

from click.testing import CliRunner

from cepe_cli.main import COMMANDS, cli
from pipeline import __version__
from pipeline.stages import registry

STAGES = [stage.command for stage in registry.STAGES]


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


def test_use_profile_refuses_a_hand_edited_params_yaml_in_one_line(tmp_path):
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    shutil.copytree(root / "params", tmp_path / "params")
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.1\n")  # a user's own settings
    result = CliRunner().invoke(cli, ["use-profile", "tiny", "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {tmp_path / 'params.yaml'}: differs from what every profile generates (edited by hand?); "
        "`cepe use-profile tiny --force` overwrites it"]
    assert (tmp_path / "params.yaml").read_text() == "train:\n  lr: 0.1\n"
    result = CliRunner().invoke(cli, ["use-profile", "tiny", "--root", str(tmp_path), "--force"])
    assert result.exit_code == 0 and "now profile 'tiny'" in result.output
