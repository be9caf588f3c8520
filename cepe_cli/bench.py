"""`cepe bench`: memory and throughput of CEPE against full attention; `cepe bench --train`: the
training stages' step (section `bench_train`, its own options: `cepe bench --train --help`)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import click

from cepe_cli.options import config_options
from pipeline.stages.bench import BenchConfig, BenchTrainConfig
from pipeline.stages.bench_serve import BenchServeConfig


def _split_commas(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Let list options take `--lengths 4096,8192` as well as repeated `--lengths 4096`."""

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            for name in names:
                values = kwargs.get(name)
                if values:
                    kwargs[name] = tuple(v.strip() for value in values for v in value.split(",") if v.strip())
            return fn(**kwargs)

        return wrapper

    return decorator


TRAIN_FLAG = "--train"


class _BenchCommand(click.Command):
    """`cepe bench` whose `--train` flag hands the rest of the command line to the train mode's
    own command (options generated from `BenchTrainConfig`, params section `bench_train`)."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any):
        if TRAIN_FLAG in args:
            rest = [a for a in args if a != TRAIN_FLAG]
            return command_bench_train.make_context(info_name, rest, parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)


@click.command("bench", cls=_BenchCommand)
@click.option(TRAIN_FLAG, "train_mode", is_flag=True, default=False,
              help="Measure the training stages instead (section bench_train; see `cepe bench --train --help`).")
@_split_commas("lengths", "sides", "profile_lengths")
@config_options(BenchConfig, "bench")
def command_bench(config: BenchConfig, train_mode: bool = False) -> None:
    """Measure CEPE and full attention side by side: forward time, peak memory, context state,
    time per generated token (plain and static-cache/CUDA-graph loops), at batch 1 and at the
    largest batch that fits; writes bench.json and bench.md into --output-dir."""
    from pipeline.stages.bench import run

    report = run(config)
    click.echo(f"wrote {config.output_dir}/bench.json and bench.md ({'complete' if report.get('complete') else 'incomplete'})")


@click.command("bench-serve")
@_split_commas("clients")
@config_options(BenchServeConfig, "bench_serve")
def command_bench_serve(config: BenchServeConfig) -> None:
    """Serving benchmark through `cepe serve`'s engine: time to first token about a cached
    document against full attention's prefill, a cold document, memory per cached document,
    tokens/s with concurrent clients; writes serve.json and serve.md into --output-dir."""
    from pipeline.stages.bench_serve import run

    report = run(config)
    click.echo(f"wrote {config.output_dir}/serve.json and serve.md ({'complete' if report.get('complete') else 'incomplete'})")
@click.command("bench")
@_split_commas("stages", "checkpointing", "recipe_gpus")
@config_options(BenchTrainConfig, "bench_train")
def command_bench_train(config: BenchTrainConfig) -> None:
    """`cepe bench --train`: the warm-up, main stage and CEPED (online teacher, precomputed top-k)
    steps as the training loop runs them, at the paper's shapes with random weights: the largest
    micro-batch that fits, tokens/s, step time by part, peak memory and MFU against the measured
    matmul peak, with and without gradient checkpointing; the paper recipe's cost at that rate.
    Writes bench_train.json and bench_train.md into --output-dir."""
    from pipeline.stages.bench import run_train

    report = run_train(config)
    if config.scaling:
        click.echo(f"{report['strategy']} x {report['processes']}: {report['decoder_tokens_per_s']} decoder tokens/s "
                   f"(row of {config.output_dir}/scaling.json and scaling.md)")
        return
    click.echo(f"wrote {config.output_dir}/bench_train.json and bench_train.md "
               f"({'complete' if report.get('complete') else 'incomplete'})")
