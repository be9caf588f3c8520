"""`cepe generate`."""

from __future__ import annotations

import click

from cepe_cli.options import config_options
from pipeline.stages.generate import GenerateConfig


@click.command("generate")
@config_options(GenerateConfig, "generate")
def command_generate(config: GenerateConfig) -> None:
    """Ask a trained CEPE model about long text; the answer streams to stdout.

    \b
    Examples:
      cepe generate --model runs/train/model --context book.txt --prompt "Who is Emma?" --max-new-tokens 64
      echo "Summarise the chapter." | cepe generate --model runs/distill/model --context ch1.txt --chat
    """
    from pipeline.stages.generate import run

    result = run(config)
    click.echo(f"[{len(result['tokens'])} tokens, {result['finish_reason']}; decoder read {result['decoder_tokens']} "
               f"tokens, encoder {result['context_tokens']}"
               + (f", {result['dropped_tokens']} context tokens dropped (max_encoder_chunks)" if result["dropped_tokens"] else "")
               + "]", err=True)
