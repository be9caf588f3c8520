"""`cepe`: one subcommand per pipeline stage.

Commands are imported lazily (`cepe --help` does not import torch). Each lives in the module
named in `COMMANDS`, as a click command `command_<name_with_underscores>`; a stage whose module does not
exist yet is listed and fails with "not implemented yet" instead of pretending to work.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from pipeline import __version__
from pipeline.errors import CepeError

# name -> (module, one-line help), in pipeline order.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-data": ("cepe_cli.prepare_data", "Filter, tokenize and chunk raw text into Arrow shards."),
    "pretrain-encoder": ("cepe_cli.training", "Masked-LM pretraining of the CEPE encoder."),
    "warmup": ("cepe_cli.training", "Warm-up: teach cross-attention to copy (duplicate inputs)."),
    "train": ("cepe_cli.training", "Main CEPE training on prevdoc/concat windows."),
    "teacher-logits": ("cepe_cli.distill", "Precompute the teacher's top-k probabilities (CEPED)."),
    "distill": ("cepe_cli.distill", "CEPED: CE + KL(teacher || student) distillation."),
    "index": ("cepe_cli.index", "Index a corpus's passages (BM25 or dense) for retrieval-augmented evaluation."),
    "evaluate": ("cepe_cli.evaluate", "Evaluate a model: ppl, longbench, zeroscrolls, ruler, qa, icl, ralm."),
    "bench": ("cepe_cli.bench", "Memory and speed of CEPE against full attention."),
    "convert-decoder": ("cepe_cli.convert", "Convert a decoder (e.g. the packaged SmolLM2 GGUF) to safetensors."),
    "use-profile": ("cepe_cli.profiles", "Switch params.yaml to a profile: cpu, tiny, gpu, paper."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, help_text = COMMANDS[name]
        attr = "command_" + name.replace("-", "_")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            return _not_implemented(name, help_text)
        cmd = getattr(module, attr, None)
        return cmd if cmd is not None else _not_implemented(name, help_text)


def _not_implemented(name: str, help_text: str) -> click.Command:
    @click.command(name=name, help=help_text + " [not implemented yet]",
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def stub() -> None:
        raise CepeError(f"`cepe {name}` is not implemented yet")

    return stub


class CepeCLI(LazyGroup):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CepeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=CepeCLI, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cepe")
def cli() -> None:
    """CEPE: long context for any Llama-family decoder, stage by stage.

    Every stage reads its section of params.yaml (or --params FILE) and accepts the same keys as
    options; see `cepe COMMAND --help`.
    """


if __name__ == "__main__":
    cli()
