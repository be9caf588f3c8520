"""Seeded percentile bootstrap over evaluation windows (numpy).

Every statistic the ppl evaluation reports with an interval is a function of per-window column
means (a difference of mean NLLs, a difference of perplexities, a ratio of mean NLL gains), so
one helper resamples the windows once and hands the statistic the resampled means: the columns
are resampled together (paired), as the windows are scored on the same tokens.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

LEVEL = 0.95


def bootstrap_interval(columns: Sequence[Sequence[float]], statistic: Callable[..., np.ndarray], *,
                       samples: int = 1000, seed: int = 0, level: float = LEVEL) -> list[float] | None:
    """`[low, high]`: the `level` percentile interval of `statistic(*means)` over `samples`
    resamplings (with replacement) of the windows.

    columns: k per-window series of equal length n (window i is row i of each);
    statistic: called with k arrays of shape (samples,) (each column's mean in every resample),
    returns an array of shape (samples,). None when there are fewer than 2 windows.
    """
    data = np.asarray(columns, dtype=np.float64)  # (k, n)
    if data.ndim != 2 or data.shape[1] < 2:
        return None
    n = data.shape[1]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(samples, n))  # (samples, n) window indices
    means = data[:, idx].mean(axis=-1)  # (k, samples)
    values = np.asarray(statistic(*means), dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return [float(lo), float(hi)]


def mean_difference(a: Sequence[float], b: Sequence[float], **kw) -> dict[str, object]:
    """mean(a) - mean(b) of paired per-window NLLs and exp(mean a) - exp(mean b) (the perplexity
    difference), each with its interval."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return {
        "nll": float(x.mean() - y.mean()),
        "nll_ci": bootstrap_interval([x, y], lambda p, q: p - q, **kw),
        "ppl": float(np.exp(x.mean()) - np.exp(y.mean())),
        "ppl_ci": bootstrap_interval([x, y], lambda p, q: np.exp(p) - np.exp(q), **kw),
        "n_windows": int(len(x)),
    }


def ratio_of_mean_gains(own: Sequence[float], control: Sequence[float], alone: Sequence[float],
                        full: Sequence[float], **kw) -> dict[str, object]:
    """(mean control - mean own) / (mean alone - mean full), with its interval: the context use."""
    cols = [np.asarray(c, np.float64) for c in (own, control, alone, full)]

    def ratio(o, c, a, f):
        with np.errstate(divide="ignore", invalid="ignore"):
            return (c - o) / (a - f)

    value = ratio(*(c.mean() for c in cols))
    return {"value": float(value) if np.isfinite(value) else None,
            "ci": bootstrap_interval(cols, ratio, **kw), "n_windows": int(len(cols[0]))}
