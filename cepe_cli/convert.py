"""`cepe convert-decoder`."""

from __future__ import annotations

import json

import click

from cepe_cli.options import config_options
from pipeline.stages.convert_decoder import ConvertConfig


@click.command("convert-decoder")
@config_options(ConvertConfig, "convert")
def command_convert_decoder(config: ConvertConfig) -> None:
    """Write a decoder (default: the packaged SmolLM2-135M-Instruct GGUF) as plain safetensors."""
    from pipeline.stages.convert_decoder import run

    click.echo(json.dumps(run(config), indent=2))
