"""`cepe bench`: memory and throughput of CEPE against full attention."""

from __future__ import annotations

import functools
from typing import Any, Callable

import click

from cepe_cli.options import config_options
from pipeline.stages.bench import BenchConfig
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


@click.command("bench")
@_split_commas("lengths", "sides", "profile_lengths")
@config_options(BenchConfig, "bench")
def command_bench(config: BenchConfig) -> None:
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
