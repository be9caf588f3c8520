"""`cepe use-profile NAME`."""

from __future__ import annotations

import click


@click.command("use-profile")
@click.argument("name")
@click.option("--root", default=".", type=click.Path(file_okay=False), help="Repository root holding params/.")
def command_use_profile(name: str, root: str) -> None:
    """Copy params/NAME.yaml over params.yaml (profiles: cpu, tiny, gpu, paper)."""
    from pipeline.stages.profiles import use_profile

    dest = use_profile(name, root)
    click.echo(f"{dest}: now profile {name!r}; run `dvc repro`")
