"""`cepe prepare-data`: build a shard directory, or check one with `--verify DIR`."""

from __future__ import annotations

import json

import click

from cepe_cli.options import config_options
from pipeline.stages.prepare_data import PrepareConfig


@click.command("prepare-data")
@config_options(PrepareConfig, "prepare")
@click.option("--verify", "verify", type=click.Path(file_okay=False), default=None, metavar="DIR",
              help="Check DIR (shards, sizes, sha256, rows, fingerprint) against its manifest.json and exit.")
def command_prepare_data(config: PrepareConfig, verify: str | None) -> None:
    """Filter, tokenize and window raw text into Arrow shards (one layout or a mix per output)."""
    if verify:
        from pipeline.data.shards import verify_shards

        summary = verify_shards(verify)
        click.echo(json.dumps({"ok": True, **summary}, indent=2))
        return
    from pipeline.stages.prepare_data import run

    click.echo(json.dumps(run(config), indent=2))
