"""`cepe results`: the documents of one `dvc repro` run, from its own outputs."""

from __future__ import annotations

import click

from cepe_cli.options import config_options
from pipeline.stages.results import ResultsConfig


@click.command("results")
@config_options(ResultsConfig, "results")
def command_results(config: ResultsConfig) -> None:
    """Gather a finished `dvc repro` run (stage metrics, evaluation metrics, the timestamped log of
    scripts/gpu_repro.sh) into <output-dir>/<name>.{json,md}, fidelity.{json,md}, training.md,
    distill.md and evaluation.md."""
    from pipeline.stages.results import run

    for name, path in run(config).items():
        click.echo(f"wrote {path}")
