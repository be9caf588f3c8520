"""Per-step metrics for `dvc plots`, the final `metrics.json` for `dvc metrics`, TensorBoard.

Files, all under a stage's output directory and written by the main process only:
- `steps.tsv`: one row per logged optimiser step (step, loss, lr, grad_norm, tokens, tokens/s,
  elapsed seconds); `dvc plots show <output>/steps.tsv -x step -y loss` draws it.
- `validation.tsv`: one row per validation (step, val_loss, val_ppl).
- `metrics.json`: the final summary (`dvc metrics show`), written atomically.
- `tensorboard/`: the same scalars, when asked for (needs the `tensorboard` package).

On resume the TSV files are cut back to the checkpoint's step first, so a resumed run's curves
have no duplicated or orphaned rows.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from pipeline.errors import CepeError
from pipeline.io import atomic_write_json, atomic_write_text

STEP_COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s")
VAL_COLUMNS = ("step", "val_loss", "val_ppl")


def require_tensorboard() -> None:
    """Fail before any work when TensorBoard logging is asked for but not installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise CepeError("tensorboard: true needs the `tensorboard` package (pip install tensorboard)") from None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


class TsvLog:
    """An append-only TSV table, truncatable to a step on resume.

    Its columns are `base` plus any extra keys of the first row appended (e.g. the `ce` and
    `kl` terms a distillation loss reports); a resumed run keeps the header already on disk.
    """

    def __init__(self, path: Path, base: tuple[str, ...]):
        self.path = path
        self.base = base
        self.columns: list[str] | None = None

    def truncate_after(self, step: int) -> None:
        """Keep the header and the rows with `step <= step` (a fresh run passes 0)."""
        self.columns = None
        if not self.path.is_file():
            return
        with self.path.open(newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            rows = [r for r in reader if int(r["step"]) <= step]
            header = list(reader.fieldnames or [])
        if not rows:
            self.path.unlink()
            return
        self.columns = header
        lines = ["\t".join(header)] + ["\t".join(r.get(c) or "" for c in header) for r in rows]
        atomic_write_text(self.path, "\n".join(lines) + "\n")

    def append(self, row: dict[str, Any]) -> None:
        if self.columns is None:
            self.columns = list(self.base) + [k for k in row if k not in self.base]
            atomic_write_text(self.path, "\t".join(self.columns) + "\n")
        with self.path.open("a") as fh:
            fh.write("\t".join(_fmt(row.get(c, "")) for c in self.columns) + "\n")


class MetricsLogger:
    """Writes the step and validation tables, optionally TensorBoard; no-op off the main process."""

    def __init__(self, output: Path, *, enabled: bool, tensorboard: bool = False):
        self.enabled = enabled
        self.steps = TsvLog(output / "steps.tsv", STEP_COLUMNS)
        self.validation = TsvLog(output / "validation.tsv", VAL_COLUMNS)
        self.output = output
        self._tb = None
        if enabled and tensorboard:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(output / "tensorboard"))

    def start(self, resumed_step: int) -> None:
        if self.enabled:
            self.output.mkdir(parents=True, exist_ok=True)
            self.steps.truncate_after(resumed_step)
            self.validation.truncate_after(resumed_step)

    def log_step(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.steps.append(row)
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, row["step"])

    def log_validation(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.validation.append(row)
        if self._tb is not None:
            self._tb.add_scalar("val/loss", row["val_loss"], row["step"])
            self._tb.add_scalar("val/ppl", row["val_ppl"], row["step"])

    def write_summary(self, metrics: dict[str, Any]) -> None:
        if self.enabled:
            atomic_write_json(self.output / "metrics.json", metrics)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
