"""`cepe plots`."""

from __future__ import annotations

import json

import click

from cepe_cli.options import config_options
from pipeline.stages.plots import PlotsConfig


@click.command("plots")
@config_options(PlotsConfig, "plots")
@click.argument("dirs", nargs=-1, type=click.Path(file_okay=False))
def command_plots(config: PlotsConfig, dirs: tuple[str, ...]) -> None:
    """PNG + SVG figures (and a static index.html) of training and evaluation runs, offline.

    \b
    Examples:
      cepe plots                                   # params `plots`: every stage of dvc.yaml -> reports/plots
      cepe plots runs/warmup runs/train --output figs
      cepe plots reports/evaluate/ppl --formats png
    """
    from pipeline.stages.plots import run

    if dirs:
        config.runs = list(dirs)
    summary = run(config)
    click.echo(json.dumps(summary, indent=2))
