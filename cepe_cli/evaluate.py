"""`cepe evaluate`."""

from __future__ import annotations

import json

import click

from cepe_cli.options import config_options
from pipeline.stages.evaluate import EvaluateConfig


@click.command("evaluate")
@config_options(EvaluateConfig, "evaluate")
def command_evaluate(config: EvaluateConfig) -> None:
    """Evaluate a CEPE model or a plain decoder: ppl, longbench, longbench-e, zeroscrolls, ruler, qa, icl, ralm.

    \b
    Examples:
      cepe evaluate --task ppl --model runs/cepe --data embedded
      cepe evaluate --task ruler --model runs/cepe --ruler-lengths 2048 --ruler-lengths 4096
      cepe evaluate --task longbench --model runs/cepe --data LongBench/ --subtasks qasper
      cepe evaluate --task longbench --predictions pred/llama2-7b-chat-4k --output OUT
      cepe evaluate --task qa --model runs/cepe --data nq-open.jsonl --passages-encoder 10
      cepe evaluate --task icl --model runs/cepe --data pcw/ --subtasks sst2,banking77
      cepe evaluate --task ralm --model runs/cepe --index data/index --data held-out.jsonl.gz
    """
    from pipeline.stages.evaluate import run

    metrics = run(config)
    click.echo(json.dumps(metrics, indent=2))
    click.echo(f"wrote {config.output_dir}", err=True)
