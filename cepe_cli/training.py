"""`cepe pretrain-encoder`, `cepe warmup`, `cepe train`: thin commands over pipeline.stages.

Each command resolves its stage config (params.yaml section, `-S key=value`, `--field` options)
and calls the stage's `run`. Two options are not config keys because they say how to run, not
what to compute:
- `--resume auto|PATH`: continue from the newest checkpoint under `<output>/checkpoints`
  (auto) or from the given one, after the same settings check (`pipeline.train.checkpoints`:
  max_steps and the logging/checkpoint/validation keys may change; otherwise auto starts afresh,
  moving earlier checkpoints aside, and PATH stops naming the keys);
- `--num-processes N`: re-launch this same command through `accelerate launch` with N
  processes (one per GPU; gloo CPU processes on a machine without CUDA). Already inside
  `accelerate launch`/`torchrun`, it is ignored.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Callable

import click

from cepe_cli.options import config_options
from pipeline.stages.pretrain_encoder import PretrainEncoderConfig
from pipeline.stages.train import TrainConfig
from pipeline.stages.warmup import WarmupConfig


def _inside_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def strip_num_processes(argv: list[str]) -> list[str]:
    """argv without `--num-processes N` / `--num-processes=N`."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--num-processes":
            skip = True
            continue
        if arg.startswith("--num-processes="):
            continue
        out.append(arg)
    return out


def launch_command(num_processes: int, argv: list[str]) -> list[str]:
    """The `accelerate launch` command line that runs `cepe <argv>` in `num_processes` processes.

    `--multi_gpu` selects accelerate's torchrun launcher; on a machine without CUDA the loop's
    `Accelerator(cpu=True)` then joins the processes in one gloo group (accelerate's own `--cpu`
    flag would start a single process).
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "0"]
    return cmd + ["-m", "cepe_cli.main", *strip_num_processes(argv)]


def _run_forwarding_signals(cmd: list[str]) -> int:
    """Run the launcher and wait for it. SIGTERM is passed on (the processes then checkpoint and
    stop); SIGINT from a terminal already reaches every process of the group, so here it is
    only kept from killing this parent before its children have saved."""
    import signal

    proc = subprocess.Popen(cmd)
    old_term = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)


def _run_stage(run: Callable[..., dict[str, Any]], config: Any, resume: str | None, num_processes: int | None) -> None:
    from pipeline.train.loop import TrainingInterrupted

    if num_processes is not None and num_processes < 1:
        raise click.BadParameter("expected an integer >= 1", param_hint="--num-processes")
    if num_processes and num_processes > 1 and not _inside_launcher():
        cmd = launch_command(num_processes, sys.argv[1:])
        click.echo("launching: " + " ".join(cmd[2:]), err=True)
        sys.exit(_run_forwarding_signals(cmd))
    try:
        metrics = run(config, resume=resume)
    except TrainingInterrupted as exc:
        from pipeline.train.loop import process_state

        if process_state().is_main_process:
            click.echo(f"stopped: {exc}", err=True)
        sys.exit(128 + exc.signum)
    from pipeline.train.loop import process_state

    if not process_state().is_main_process:
        return
    shown = {k: metrics.get(k) for k in ("loss", "val_loss", "val_ppl", "tokens_seen", "wall_time_s")}
    click.echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))


def _runtime_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--resume", default=None, metavar="auto|PATH",
                      help="Resume from the newest checkpoint (auto) or from PATH; both check the settings "
                           "(max_steps may change).")(fn)
    fn = click.option("--num-processes", "num_processes", type=int, default=None,
                      help="Re-launch through `accelerate launch` with N processes (DDP).")(fn)
    return fn


@click.command("pretrain-encoder")
@_runtime_options
@config_options(PretrainEncoderConfig, "pretrain_encoder")
def command_pretrain_encoder(config: PretrainEncoderConfig, resume: str | None, num_processes: int | None) -> None:
    """Masked-LM pretraining of the CEPE encoder (docs/method.md §2.1)."""
    from pipeline.stages.pretrain_encoder import run

    _run_stage(run, config, resume, num_processes)


@click.command("warmup")
@_runtime_options
@config_options(WarmupConfig, "warmup")
def command_warmup(config: WarmupConfig, resume: str | None, num_processes: int | None) -> None:
    """Warm-up: cross-attention learns to copy from the encoder on duplicate windows (2.2)."""
    from pipeline.stages.warmup import run

    _run_stage(run, config, resume, num_processes)


@click.command("train")
@_runtime_options
@config_options(TrainConfig, "train")
def command_train(config: TrainConfig, resume: str | None, num_processes: int | None) -> None:
    """Main CEPE training on prevdoc/concat windows with context masking (2.3)."""
    from pipeline.stages.train import run

    _run_stage(run, config, resume, num_processes)
