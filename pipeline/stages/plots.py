"""`cepe plots`: PNG and SVG figures of a pipeline's runs, and a static page showing them.

`dvc plots show` draws the TSV tables with vega from a CDN, so offline its page is blank. This
stage draws them with matplotlib instead (pipeline/plots/figures.py says which figures and why)
into `output`, plus `index.html`, a page of plain `<img>` tags that needs no script or network.
`dvc.yaml`'s `plots:` section lists the images, so `dvc plots show` renders them offline too.
The output folder is replaced only when every figure is written.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, field

FORMATS = ("png", "svg")


@dataclass
class PlotsConfig:
    runs: list[str] = field(
        default_factory=lambda: ["runs/encoder", "runs/warmup", "runs/train", "runs/distill",
                                 "reports/evaluate/ppl", "reports/evaluate/ruler"],
        help="Run directories to draw: training stage outputs (steps.tsv, validation.tsv) and evaluation "
        "outputs (ppl_by_length.tsv, ruler_by_length.tsv); a directory's name labels its series.")
    output: str = field("reports/plots", help="Folder to write (replaced): <figure>.png, <figure>.svg, index.html.")
    formats: list[str] = field(default_factory=lambda: list(FORMATS), help="Image formats: png, svg.")
    dpi: int = field(110, help="Resolution of the PNG images (dots per inch; a figure is 7 x 4.2 inches).")

    def __post_init__(self) -> None:
        self.formats = [f.strip().lower() for item in self.formats for f in str(item).split(",") if f.strip()]
        if not self.runs:
            raise ConfigError("runs: expected at least one run directory (e.g. runs/warmup)")
        if not self.formats or any(f not in FORMATS for f in self.formats):
            raise ConfigError(f"formats: expected some of {', '.join(FORMATS)}, got {self.formats}")
        if not 30 <= self.dpi <= 600:
            raise ConfigError(f"dpi: expected 30 to 600, got {self.dpi}")
        if not self.output:
            raise ConfigError("output: expected a folder")


def image_bytes(fig: Any, fmt: str, dpi: int) -> bytes:
    """The figure as PNG or SVG bytes, the same bytes for the same data (no dates, fixed ids)."""
    import matplotlib

    buf = io.BytesIO()
    metadata = {"Date": None} if fmt == "svg" else {"Software": None}
    with matplotlib.rc_context({"svg.hashsalt": "cepe-plots", "svg.fonttype": "path"}):
        fig.savefig(buf, format=fmt, dpi=dpi, metadata=metadata)
    return buf.getvalue()


def index_html(names: list[str], fmt: str) -> str:
    """A static page of the figures: plain <img> tags, no script, nothing fetched."""
    items = "\n".join(f'<figure><img src="{html.escape(n)}.{fmt}" alt="{html.escape(n)}" width="770">'
                      f"<figcaption>{html.escape(n)}</figcaption></figure>" for n in names)
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>cepe plots</title>\n"
            "<style>body{font-family:sans-serif;background:#fff;margin:16px} figure{margin:0 0 24px}</style>"
            f"</head>\n<body>\n{items}\n</body></html>\n")


def run(config: PlotsConfig) -> dict[str, Any]:
    """Write every figure some run has data for; returns what was drawn from which directories."""
    from pipeline.errors import CepeError
    from pipeline.io import atomic_directory, atomic_write_bytes, atomic_write_text, disk_full_as_error
    from pipeline.plots.figures import build_figures
    from pipeline.plots.tables import read_runs

    runs = read_runs(config.runs)
    figures = build_figures(runs)
    if not figures:
        raise CepeError(f"runs: nothing to draw in {', '.join(config.runs)} (their tables have no rows yet)")
    out = Path(config.output)
    with disk_full_as_error(out), atomic_directory(out) as tmp:
        for name, fig in figures.items():
            for fmt in config.formats:
                atomic_write_bytes(Path(tmp) / f"{name}.{fmt}", image_bytes(fig, fmt, config.dpi))
        atomic_write_text(Path(tmp) / "index.html", index_html(list(figures), "svg" if "svg" in config.formats else "png"))
    return {
        "output": str(out),
        "figures": {name: [f"{out / name}.{fmt}" for fmt in config.formats] for name in figures},
        "series": {name: [line.get_label() for ax in fig.axes for line in ax.get_lines()] for name, fig in figures.items()},
        "runs": {run.name: sorted(run.tables) for run in runs},
    }
