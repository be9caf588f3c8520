"""`cepe serve`."""

from __future__ import annotations

import click

from cepe_cli.options import config_options
from pipeline.stages.serve import ServeConfig


@click.command("serve")
@config_options(ServeConfig, "serve")
def command_serve(config: ServeConfig) -> None:
    """Serve a trained CEPE model over HTTP, OpenAI-compatible, with documents encoded once.

    \b
    Examples:
      cepe serve --model runs/train/model --port 8000
      curl -s localhost:8000/v1/documents -d '{"text": "..."}'          # -> {"id": "doc-..."}
      curl -s localhost:8000/v1/completions -d '{"prompt": "Q: ...", "documents": ["doc-..."], "max_tokens": 32}'
    """
    from pipeline.stages.serve import run

    run(config)
