"""`cepe index`."""

from __future__ import annotations

import json

import click

from cepe_cli.options import config_options
from pipeline.stages.index import IndexConfig


@click.command("index")
@config_options(IndexConfig, "index")
def command_index(config: IndexConfig) -> None:
    """Cut a corpus into encoder-chunk passages and index them (BM25, or a dense encoder) for `evaluate --task ralm`.

    \b
    Examples:
      cepe index --corpus embedded --tokenizer models/decoder --output data/index
      cepe index --corpus docs/ --retriever dense --dense-model contriever/ --output data/index-dense
    """
    from pipeline.stages.index import run

    click.echo(json.dumps(run(config), indent=2))
