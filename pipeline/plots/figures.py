"""Static figures of a pipeline's runs (matplotlib), readable without a browser or a network.

`dvc plots show` renders TSV tables through vega, loaded from a CDN, so offline its page is
blank; these figures are PNG and SVG files instead, which DVC shows as image plots and any
viewer opens. Each builder takes the runs (`pipeline/plots/tables.py`) and returns a
`matplotlib.figure.Figure` (no pyplot state), or None when no run has its data:

- `loss`: training loss by optimiser step, one line per stage;
- `validation`: held-out perplexity by step, one line per stage, every validation a marker;
- `ceped`: CEPED's CE and KL terms by step, each on its own axes (their scales differ);
- `ppl_by_length`: perplexity by window length, one line per variant (cepe, decoder-only, ...);
- `ruler_by_length`: RULER score by length, one line per task and the average.

A stage keeps its colour in every figure; step axes have integer ticks.
"""

from __future__ import annotations

from typing import Callable

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.plots.tables import Run

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
SIZE = (7.0, 4.2)
MANY_POINTS = 60  # training curves with more points than this are drawn without markers


def colours(names: list[str]) -> dict[str, str]:
    """One colour per series, in order (repeats only past ten series)."""
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(dict.fromkeys(names))}


def _figure(title: str, nrows: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(SIZE[0], SIZE[1] * (1 + 0.55 * (nrows - 1))), layout="constrained")
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0].tolist()
    fig.suptitle(title)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _integer_steps(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _training(runs: list[Run], file: str, y: str) -> list[tuple[Run, list[float], list[float]]]:
    out = []
    for run in runs:
        table = run.tables.get(file)
        if table is not None and table.has(y):
            xs, ys = table.series("step", y)
            if xs:
                out.append((run, xs, ys))
    return out


def loss_figure(runs: list[Run]) -> Figure | None:
    series = _training(runs, "steps.tsv", "loss")
    if not series:
        return None
    colour = colours([r.name for r in runs])
    fig, (ax,) = _figure("Training loss by step")
    for run, xs, ys in series:
        ax.plot(xs, ys, color=colour[run.name], label=run.name, marker="o" if len(xs) <= MANY_POINTS else None,
                markersize=3, linewidth=1.5)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss (nats/token)")
    _integer_steps(ax)
    ax.legend(title="stage")
    return fig


def validation_figure(runs: list[Run]) -> Figure | None:
    series = _training(runs, "validation.tsv", "val_ppl")
    if not series:
        return None
    colour = colours([r.name for r in runs])
    fig, (ax,) = _figure("Held-out perplexity by step")
    for run, xs, ys in series:
        ax.plot(xs, ys, color=colour[run.name], label=run.name, marker="o", markersize=6, linewidth=1.5)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("perplexity (held-out windows)")
    _integer_steps(ax)
    ax.legend(title="stage")
    return fig


def ceped_figure(runs: list[Run]) -> Figure | None:
    ce, kl = _training(runs, "steps.tsv", "ce"), _training(runs, "steps.tsv", "kl")
    if not ce and not kl:
        return None
    colour = colours([r.name for r in runs])
    fig, (ax_ce, ax_kl) = _figure("CEPED loss terms by step", nrows=2)
    for ax, series, label in ((ax_ce, ce, "CE (nats/token)"), (ax_kl, kl, "KL(teacher ‖ student)")):
        for run, xs, ys in series:
            ax.plot(xs, ys, color=colour[run.name], label=run.name, marker="o" if len(xs) <= MANY_POINTS else None,
                    markersize=3, linewidth=1.5)
        ax.set_ylabel(label)
        if series:
            ax.legend(title="stage")
    ax_kl.set_xlabel("optimiser step")
    _integer_steps(ax_kl)
    return fig


def _by_length(runs: list[Run], file: str, x: str, title: str, xlabel: str, ylabel: str,
               emphasise: str | None = None) -> Figure | None:
    tables = [(run, run.tables[file]) for run in runs if file in run.tables]
    if not tables:
        return None
    names = []
    for run, table in tables:
        prefix = f"{run.name}: " if len(tables) > 1 else ""
        names += [prefix + c for c in table.columns if c != x and table.has(c)]
    if not names:
        return None
    colour = colours(names)
    fig, (ax,) = _figure(title)
    for run, table in tables:
        prefix = f"{run.name}: " if len(tables) > 1 else ""
        for column in (c for c in table.columns if c != x and table.has(c)):
            xs, ys = table.series(x, column)
            bold = column == emphasise
            ax.plot(xs, ys, color=colour[prefix + column], label=prefix + column, marker="o", markersize=6,
                    linewidth=2.5 if bold else 1.5, linestyle="-" if bold or not emphasise else "--")
        xs = sorted({v for v in table.columns.get(x, []) if v is not None})
        if xs:
            ax.set_xticks(xs, [f"{v:g}" for v in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    return fig


def ppl_by_length_figure(runs: list[Run]) -> Figure | None:
    return _by_length(runs, "ppl_by_length.tsv", "total_len", "Perplexity by context length",
                      "tokens in the window (decoder + encoder)", "perplexity of the last tokens")


def ruler_by_length_figure(runs: list[Run]) -> Figure | None:
    return _by_length(runs, "ruler_by_length.tsv", "length", "RULER by length", "prompt length (tokens)",
                      "score (%)", emphasise="average")


# name -> builder, in the order the figures are written and shown.
FIGURES: dict[str, Callable[[list[Run]], Figure | None]] = {
    "loss": loss_figure,
    "validation": validation_figure,
    "ceped": ceped_figure,
    "ppl_by_length": ppl_by_length_figure,
    "ruler_by_length": ruler_by_length_figure,
}


def build_figures(runs: list[Run]) -> dict[str, Figure]:
    """Every figure some run has data for, by name."""
    out = {}
    for name, builder in FIGURES.items():
        fig = builder(runs)
        if fig is not None:
            out[name] = fig
    return out
