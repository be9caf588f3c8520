"""`cepe use-profile NAME`."""

from __future__ import annotations

import click


@click.command("use-profile")
@click.argument("name")
@click.option("--root", default=".", type=click.Path(file_okay=False), help="Repository root holding params/.")
@click.option("--force", is_flag=True, help="Overwrite a params.yaml that no profile generates (a hand edit).")
def command_use_profile(name: str, root: str, force: bool) -> None:
    """Write params/base.yaml + params/NAME.yaml as params.yaml (profiles: cpu, tiny, gpu, paper)."""
    from pipeline.profiles import use_profile

    dest = use_profile(name, root, force=force)
    click.echo(f"{dest}: now profile {name!r}; run `dvc repro`")
