"""The tables `cepe plots` draws, read from a run directory.

A training stage's output (`pipeline/train/logging.py`) holds `steps.tsv` (step, loss, lr, ...,
plus extra loss terms such as CEPED's `ce` and `kl`) and `validation.tsv` (step, val_loss,
val_ppl); an evaluation's output (`pipeline/evaluate/report.py`) holds `ppl_by_length.tsv` or
`ruler_by_length.tsv`. Empty cells and `nan` are missing values (None), never zeros.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import CepeError

TRAINING_FILES = ("steps.tsv", "validation.tsv")
BY_LENGTH_FILES = ("ppl_by_length.tsv", "ruler_by_length.tsv")


@dataclass
class Table:
    """Columns of one TSV file, numbers or None, in file order."""

    path: Path
    columns: dict[str, list[float | None]]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()), []))

    def series(self, x: str, y: str) -> tuple[list[float], list[float]]:
        """(xs, ys) of the rows where both are present."""
        pairs = [(a, b) for a, b in zip(self.columns.get(x, []), self.columns.get(y, [])) if a is not None and b is not None]
        return [a for a, _ in pairs], [b for _, b in pairs]

    def has(self, y: str) -> bool:
        return any(v is not None for v in self.columns.get(y, []))


@dataclass
class Run:
    """One directory given to `cepe plots`: its name in legends and the tables found in it."""

    path: Path
    name: str
    tables: dict[str, Table] = field(default_factory=dict)  # file name -> table


def _number(text: str, path: Path, line: int, column: str) -> float | None:
    text = text.strip()
    if text == "" or text.lower() in ("nan", "none", "null"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise CepeError(f"{path} line {line}: column {column!r} holds {text!r}, expected a number") from None
    return value if math.isfinite(value) else None


def read_tsv(path: Path) -> Table:
    """A TSV table with a header row.

    Raises:
        CepeError: a file without a header, a row of another width or a non-number, naming the line.
    """
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t"))
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise CepeError(f"{path}: empty file, expected a header row (e.g. step, loss)")
    header = [h.strip() for h in rows[0]]
    columns: dict[str, list[float | None]] = {h: [] for h in header}
    for line, row in enumerate(rows[1:], 2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise CepeError(f"{path} line {line}: {len(row)} cells, the header has {len(header)}")
        for name, cell in zip(header, row):
            columns[name].append(_number(cell, path, line, name))
    return Table(path, columns)


def legend_names(paths: list[Path]) -> list[str]:
    """A run's stage name is its directory's name (`runs/warmup` -> warmup); names that would
    repeat get their parent's too (`a/train`, `b/train`)."""
    names = [p.name or str(p) for p in paths]
    return [f"{p.parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


def read_runs(dirs: list[str], option: str = "runs") -> list[Run]:
    """Every directory's tables.

    Raises:
        CepeError: a missing directory, or one with none of the files `cepe plots` draws.
    """
    paths = [Path(d) for d in dirs]
    runs = []
    for path, name in zip(paths, legend_names(paths)):
        if not path.is_dir():
            raise CepeError(f"{option}: no such directory: {path}")
        run = Run(path, name)
        for file in TRAINING_FILES + BY_LENGTH_FILES:
            if (path / file).is_file():
                run.tables[file] = read_tsv(path / file)
        if not run.tables:
            raise CepeError(f"{option}: {path} holds none of {', '.join(TRAINING_FILES + BY_LENGTH_FILES)} "
                            f"(expected a training stage's or an evaluation's output directory)")
        runs.append(run)
    return runs
