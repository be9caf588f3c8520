"""`cepe teacher-logits` and `cepe distill`: thin commands over pipeline.stages (CEPED, docs/method.md §2.4).

`--teacher NAME|PATH` takes a model directory or a short name (an unknown name fails with the
list of known ones); `cepe distill --teacher-mode online` runs the teacher in memory instead of
reading `cepe teacher-logits` shards. `--resume` and `--num-processes` work as for `cepe train`.
"""

from __future__ import annotations

import click

from cepe_cli.options import config_options
from cepe_cli.training import _run_stage, _runtime_options
from pipeline.stages.distill import DistillConfig
from pipeline.stages.teacher_logits import TeacherLogitsConfig


@click.command("teacher-logits")
@config_options(TeacherLogitsConfig, "teacher_logits")
def command_teacher_logits(config: TeacherLogitsConfig) -> None:
    """Precompute the teacher's top-k probabilities + tail mass on every decoder position."""
    from pipeline.stages.teacher_logits import run

    summary = run(config)
    rows = ", ".join(f"{s}={n}" for s, n in summary["rows"].items())
    ppl = ", ".join(f"{s}={v:.3f}" for s, v in summary["teacher_ppl"].items())
    click.echo(f"wrote {summary['output']}: teacher {summary['teacher']}, windows {rows}, "
               f"teacher ppl {ppl}, {summary['seconds']:.1f}s")


@click.command("distill")
@_runtime_options
@config_options(DistillConfig, "distill")
def command_distill(config: DistillConfig, resume: str | None, num_processes: int | None) -> None:
    """CEPED: train the student on CE + KL(teacher || student) over the teacher's top-k."""
    from pipeline.stages.distill import run

    _run_stage(run, config, resume, num_processes)
