"""What every evaluation run writes besides its per-example outputs: the run record
(`run.json`: model, task, data checksums, lengths, seed, wall time, resolved config),
`metrics.json` for `dvc metrics show/diff`, and TSV series for `dvc plots`."""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path
from typing import Any

from pipeline.io import atomic_write_json, atomic_write_text


class RunRecord:
    """Collects what a run must record; `finish()` adds the wall time."""

    def __init__(self, task: str, config: dict[str, Any]):
        self.start = time.time()
        self.data: dict[str, Any] = {
            "task": task,
            "model": config.get("model") or None,
            "seed": config.get("seed"),
            "config": config,
            "data": {},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": {"python": platform.python_version()},
        }

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value

    def add_data(self, name: str, sha256: str, **extra: Any) -> None:
        self.data["data"][name] = {"sha256": sha256, **extra}

    def finish(self) -> dict[str, Any]:
        import torch
        import transformers

        self.data["wall_time_s"] = round(time.time() - self.start, 3)
        self.data["host"].update(torch=torch.__version__, transformers=transformers.__version__,
                                 cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
        return self.data


def clean_numbers(obj: Any) -> Any:
    """NaN/inf -> None so metrics.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean_numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean_numbers(v) for v in obj]
    return obj


def write_outputs(out_dir: Path, metrics: dict[str, Any], record: RunRecord) -> dict[str, Any]:
    run = record.finish()
    metrics = clean_numbers(metrics)
    metrics["wall_time_s"] = run["wall_time_s"]
    atomic_write_json(out_dir / "metrics.json", metrics)
    atomic_write_json(out_dir / "run.json", clean_numbers(run))
    return metrics


def write_tsv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return ""
        return f"{v:.6g}" if isinstance(v, float) else str(v)

    lines = ["\t".join(header)] + ["\t".join(cell(v) for v in row) for row in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


class DataErrors:
    """Rows a task could not use, one line each naming file, line and field.

    Each is printed to stderr as it is found and written to `data_errors.txt` in the output
    folder; the row is left out and `metrics.json` counts them (`data_errors`), so nothing is
    dropped silently. A task with no usable row at all stops with a `CepeError`.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, path: Any, line: int, field: str, expected: str) -> None:
        import sys

        text = f"{path} line {line}: field {field!r}: {expected}"
        self.lines.append(text)
        print(f"data error: {text}", file=sys.stderr)

    def write(self, out_dir: Path) -> None:
        if self.lines:
            atomic_write_text(out_dir / "data_errors.txt", "\n".join(self.lines) + "\n")
