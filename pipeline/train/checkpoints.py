"""Checkpoint directories of a training run: which ones count, which one to resume, what to keep.

Layout: `<output>/checkpoints/step-N/` holds `trainable.safetensors` (the trainable weights),
`optimizer.*` (or `optimizer-<rank>.*` under FSDP) and `rng-<rank>.*` (`state_files`: safetensors
+ JSON, nothing is unpickled), and `state.json`: the step, samples and tokens consumed, the
bookkeeping that `steps.tsv`/`metrics.json` need to continue exactly (first/last/recent losses,
the last validation), the options the run was started with and the size of every file. A
checkpoint is complete when `state.json` exists and every file it lists has its recorded size.
The learning-rate schedule is not stored: it is a function of the step and the options, rebuilt
on resume.

Settings on resume (`settings_changes`), the same for `--resume auto` and `--resume PATH`:
- free keys (`FREE_KEYS`): how a run is logged, checkpointed, validated or exported; they may
  change on resume and are reported;
- `max_steps` may change too (a run is extended, or shortened to no less than the checkpoint's
  step), as the HF Trainer allows: the schedule is rebuilt over the new length, and the change
  is printed. lr, schedule shape and warm-up are not in this set: under `dvc exp run -S
  train.lr=...` (which resumes automatically) they would otherwise give a run whose params do
  not describe how it was trained;
- every other key defines the computation: a checkpoint of other values is not resumed.
  `--resume auto` then starts afresh, `--resume PATH` stops with one line naming the keys.

Nothing here deletes a checkpoint of a user's run, except the pruning to `keep_checkpoints` a
run asks for: starting afresh over earlier checkpoints moves them to
`checkpoints.superseded-<UTC time>/` beside them, and says so. What an interrupted run of the
same stage left (`.step-N.tmp` being written, `.step-N.pruning` being removed, a checkpoint
half removed by pruning) is removed at the next start, and said.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import CepeError

CHECKPOINT_PREFIX = "step-"
FORMAT_VERSION = 2
STATE = "state.json"
SUPERSEDED = "superseded"

# Options that change how a run is logged, checkpointed, validated or exported, not what it
# computes: they may differ on resume.
FREE_KEYS = frozenset({"output", "save_every", "keep_checkpoints", "log_every", "tensorboard", "num_workers",
                       "eval_every", "eval_windows", "eval_batch_size", "progress", "save_decoder",
                       "compare_windows", "compare_batch_size", "max_time_s"})
# Options that may change on resume with an effect on training: the run's length.
RESUMABLE_KEYS = frozenset({"max_steps"})

Log = Callable[[str], None]


def step_of(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def _is_step_dir(path: Path) -> bool:
    return path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and path.name[len(CHECKPOINT_PREFIX):].isdigit()


def read_state(path: Path) -> dict[str, Any] | None:
    """A checkpoint's state.json, or None when it is missing or unreadable."""
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return state if isinstance(state, dict) else None


def is_complete(path: Path) -> bool:
    """state.json readable and every file it lists present with its recorded size."""
    state = read_state(path)
    if state is None:
        return False
    files = state.get("files")
    if not isinstance(files, dict):
        return True  # an older checkpoint: `incompatibility` says why it is not resumed
    return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary and half-removed ones excluded)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _is_step_dir(p) and is_complete(p)), key=step_of)


def options_record(options: Any) -> dict[str, Any]:
    """The options as state.json records them (JSON values)."""
    return json.loads(json.dumps(dataclasses.asdict(options), default=str))


def settings_changes(recorded: dict[str, Any], options: Any) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """(changes that forbid resuming, changes allowed on resume), each {key: (recorded, now)}."""
    now = options_record(options)
    blocking, allowed = {}, {}
    for key in sorted(set(recorded) | set(now)):
        old, new = recorded.get(key), now.get(key)
        if old == new:
            continue
        if key in FREE_KEYS or key in RESUMABLE_KEYS:
            allowed[key] = (old, new)
        else:
            blocking[key] = (old, new)
    return blocking, allowed


def describe(changes: dict[str, tuple[Any, Any]], limit: int = 4) -> str:
    items = [f"{k} {old!r} -> {new!r}" for k, (old, new) in list(changes.items())[:limit]]
    more = len(changes) - limit
    return ", ".join(items) + (f" and {more} more" if more > 0 else "")


def incompatibility(path: Path, options: Any) -> str | None:
    """Why the checkpoint at `path` cannot continue a run of `options` (None: it can)."""
    state = read_state(path)
    if state is None:
        return f"{path / STATE} is missing or unreadable"
    if state.get("format") != FORMAT_VERSION:
        return (f"it was written in checkpoint format {state.get('format', 1)} (pickle files), "
                f"this version reads format {FORMAT_VERSION}")
    blocking, _ = settings_changes(state.get("config") or {}, options)
    if blocking:
        return f"it was written with other settings ({describe(blocking)})"
    if int(state.get("step", 0)) > options.max_steps:
        return f"its step {state.get('step')} is past max_steps {options.max_steps}"
    return None


def report_changes(path: Path, options: Any, log: Log) -> None:
    """Print what differs between the checkpoint's options and this run's (all allowed)."""
    state = read_state(path) or {}
    _, allowed = settings_changes(state.get("config") or {}, options)
    if "max_steps" in allowed:
        old, new = allowed["max_steps"]
        log(f"resume: max_steps {old} -> {new}; the learning-rate schedule now spans {new} steps")
    rest = {k: v for k, v in allowed.items() if k != "max_steps" and k != "output"}
    if rest:
        log(f"resume: changed {describe(rest, limit=len(rest))}")


def move_aside(root: Path, paths: list[Path], reason: str, log: Log) -> Path:
    """Move checkpoint directories to `<root>.superseded-<UTC time>/` and say so."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = root.with_name(f"{root.name}.{SUPERSEDED}-{stamp}")
    n = 2
    while target.exists():
        target = root.with_name(f"{root.name}.{SUPERSEDED}-{stamp}-{n}")
        n += 1
    target.mkdir(parents=True)
    for p in paths:
        os.replace(p, target / p.name)
    log(f"{reason}: moved {len(paths)} earlier checkpoint(s) ({', '.join(p.name for p in paths)}) to {target} "
        f"(nothing deleted; remove it when no longer needed)")
    return target


def resolve_resume(resume: str | None, root: Path, options: Any, log: Log) -> Path | None:
    """The checkpoint to continue from for `--resume auto|PATH` (None: start afresh).

    Starting afresh over earlier checkpoints moves them aside (`move_aside`); resuming from a
    checkpoint with newer ones beside it moves those aside (the run would write over them).

    Raises:
        CepeError: `--resume PATH` that is no complete checkpoint, or one of other settings.
    """
    existing = list_checkpoints(root)
    if resume and resume != "auto":
        path = Path(resume)
        if not (path / STATE).is_file():
            raise CepeError(f"--resume {resume}: not a checkpoint directory (no {STATE})")
        if not is_complete(path):
            raise CepeError(f"--resume {resume}: incomplete checkpoint (a file listed in {STATE} is missing or "
                            f"has another size); resume from another checkpoint")
        why = incompatibility(path, options)
        if why:
            raise CepeError(f"--resume {resume}: cannot continue this run: {why}; change those settings back or "
                            f"start afresh without --resume")
        inside = path.resolve().parent == root.resolve() if root.is_dir() else False
        later = [p for p in existing if step_of(p) > step_of(path)] if inside else existing
        if later:
            move_aside(root, later, f"resuming from {path}", log)
        report_changes(path, options, log)
        return path
    if not existing:
        return None
    newest = existing[-1]
    why = incompatibility(newest, options) if resume == "auto" else "the run was started without --resume"
    if why is None:
        report_changes(newest, options, log)
        return newest
    move_aside(root, existing, f"starting afresh ({newest.name}: {why})" if resume == "auto"
               else f"starting afresh ({why})", log)
    return None


def clean_leftovers(root: Path, log: Log) -> None:
    """Remove what an interrupted run of this stage left under `root`, and say so.

    Only the loop's own names: `.step-N.tmp` (a checkpoint being written), `.step-N.pruning`
    (one being removed) and `step-N/` directories that pruning had half removed (incomplete,
    and older than the newest complete checkpoint, which only pruning leaves behind).
    """
    if not root.is_dir():
        return
    complete = list_checkpoints(root)
    newest = step_of(complete[-1]) if complete else None
    for p in sorted(root.iterdir()):
        name = p.name
        own_temp = name.startswith(f".{CHECKPOINT_PREFIX}") and name.endswith((".tmp", ".pruning"))
        half_pruned = _is_step_dir(p) and not is_complete(p) and newest is not None and step_of(p) < newest
        if own_temp or half_pruned:
            shutil.rmtree(p, ignore_errors=True)
            log(f"removed {p}, left by an interrupted earlier run")
        elif _is_step_dir(p) and not is_complete(p):
            log(f"warning: {p} is an incomplete checkpoint; ignored (not resumed from, not removed)")


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints: each older one is renamed `.step-N.pruning` (atomic)
    before it is removed, so a kill mid-removal never leaves a half checkpoint named `step-N`."""
    for old in list_checkpoints(root)[:-keep]:
        doomed = old.with_name(f".{old.name}.pruning")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
