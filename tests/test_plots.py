"""`cepe plots`: the figures hold the runs' series (checked on the matplotlib objects), the files
are written whole, bad input is one line, and a real headless browser shows the page non-blank."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("matplotlib")

from cepe_cli.main import cli  # noqa: E402
from pipeline.errors import CepeError  # noqa: E402
from pipeline.plots.figures import PALETTE, build_figures  # noqa: E402
from pipeline.plots.tables import read_runs  # noqa: E402
from pipeline.stages.plots import PlotsConfig, run  # noqa: E402

STEP_HEADER = ["step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"]


def _tsv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(str(c) for c in r) + "\n" for r in rows))


def _runs(root: Path) -> list[str]:
    """Run directories as the stages write them (pipeline/train/logging.py, pipeline/evaluate/report.py)."""
    for name, n in (("encoder", 8), ("warmup", 20), ("train", 3)):
        _tsv(root / "runs" / name / "steps.tsv", STEP_HEADER,
             [[s, round(4 - 0.05 * s - 0.2 * len(name), 4), 1e-4, 1.0, 512 * s, 400, s] for s in range(1, n + 1)])
        _tsv(root / "runs" / name / "validation.tsv", ["step", "val_loss", "val_ppl"],
             [[s, 3 - 0.01 * s, round(math.exp(3 - 0.01 * s), 4)] for s in range(5, n + 1, 5)] or [[n, 3.0, 20.09]])
    _tsv(root / "runs" / "distill" / "steps.tsv", STEP_HEADER + ["ce", "kl"],
         [[s, 3.7, 1e-4, 1.0, 512 * s, 400, s, 3 - 0.1 * s, 0.3 - 0.06 * s] for s in (1, 2, 3)])
    _tsv(root / "runs" / "distill" / "validation.tsv", ["step", "val_loss", "val_ppl"], [[3, 3.3, 27.83]])
    _tsv(root / "reports" / "ppl" / "ppl_by_length.tsv", ["total_len", "cepe", "decoder-only", "full-context"],
         [[1024, 12.41, 13.23, 12.83], [2560, 26.45, 28.95, ""]])  # full-context skipped at 2560: no point
    _tsv(root / "reports" / "ruler" / "ruler_by_length.tsv", ["length", "niah_single_1", "vt", "average"],
         [[1024, 66.67, 6.67, 36.67], [2048, 33.33, 0, 16.66]])
    return [str(root / p) for p in ("runs/encoder", "runs/warmup", "runs/train", "runs/distill", "reports/ppl", "reports/ruler")]


def _lines(ax) -> dict[str, object]:
    return {line.get_label(): line for line in ax.get_lines()}


def test_figures_hold_each_runs_series(tmp_path):
    figures = build_figures(read_runs(_runs(tmp_path)))
    assert list(figures) == ["loss", "validation", "ceped", "ppl_by_length", "ruler_by_length"]

    (ax,) = figures["loss"].axes
    lines = _lines(ax)
    assert list(lines) == ["encoder", "warmup", "train", "distill"]  # stage names, in run order
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(lines)
    assert list(lines["warmup"].get_xdata()) == list(range(1, 21))
    assert lines["train"].get_ydata()[0] == pytest.approx(4 - 0.05 - 0.2 * 5)
    assert len({line.get_color() for line in lines.values()}) == 4  # one colour per series
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)  # integer step ticks

    (ax,) = figures["validation"].axes
    lines = _lines(ax)
    assert list(lines) == ["encoder", "warmup", "train", "distill"]
    assert list(lines["warmup"].get_xdata()) == [5, 10, 15, 20]
    assert all(line.get_marker() == "o" and line.get_markersize() >= 5 for line in lines.values())  # points visible
    # a stage keeps its colour from figure to figure
    loss_colours = {k: v.get_color() for k, v in _lines(figures["loss"].axes[0]).items()}
    assert {k: v.get_color() for k, v in lines.items()} == loss_colours

    ce_ax, kl_ax = figures["ceped"].axes  # CE and KL on their own axes
    assert "CE" in ce_ax.get_ylabel() and "KL" in kl_ax.get_ylabel()
    assert list(_lines(ce_ax)["distill"].get_ydata()) == pytest.approx([2.9, 2.8, 2.7])
    assert list(_lines(kl_ax)["distill"].get_ydata()) == pytest.approx([0.24, 0.18, 0.12])

    (ax,) = figures["ppl_by_length"].axes
    lines = _lines(ax)
    assert list(lines) == ["cepe", "decoder-only", "full-context"]
    assert list(lines["full-context"].get_xdata()) == [1024]  # the missing cell is no point, not a zero
    assert list(lines["cepe"].get_ydata()) == [12.41, 26.45]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1024", "2560"]

    (ax,) = figures["ruler_by_length"].axes
    lines = _lines(ax)
    assert list(lines) == ["niah_single_1", "vt", "average"]
    assert lines["average"].get_linewidth() > lines["vt"].get_linewidth()


def test_figures_skip_what_no_run_has(tmp_path):
    dirs = _runs(tmp_path)
    figures = build_figures(read_runs(dirs[1:3]))  # warmup and train only: no CEPED terms, no evaluation
    assert list(figures) == ["loss", "validation"]
    assert list(_lines(figures["loss"].axes[0])) == ["warmup", "train"]
    assert _lines(figures["loss"].axes[0])["warmup"].get_color() == PALETTE[0]


def test_run_writes_png_svg_and_a_static_page(tmp_path):
    dirs = _runs(tmp_path)
    out = tmp_path / "plots"
    summary = run(PlotsConfig(runs=dirs, output=str(out), dpi=40))
    names = ["loss", "validation", "ceped", "ppl_by_length", "ruler_by_length"]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.{f}" for n in names for f in ("png", "svg")] + ["index.html"])
    for n in names:
        assert (out / f"{n}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        svg = ET.parse(out / f"{n}.svg").getroot()
        assert svg.tag.endswith("svg")
    page = (out / "index.html").read_text()
    assert "<script" not in page and "http" not in page and all(f'src="{n}.svg"' in page for n in names)
    assert summary["series"]["loss"] == ["encoder", "warmup", "train", "distill"]
    # the same tables and settings give the same bytes (no dates, fixed ids)
    again = tmp_path / "again"
    run(PlotsConfig(runs=dirs[-1:], output=str(again), dpi=40))
    first = {p.name: p.read_bytes() for p in again.iterdir()}
    run(PlotsConfig(runs=dirs[-1:], output=str(again), dpi=40))
    assert {p.name: p.read_bytes() for p in again.iterdir()} == first


def test_cli_takes_directories_and_fails_in_one_line(tmp_path):
    dirs = _runs(tmp_path)
    result = CliRunner().invoke(cli, ["plots", dirs[1], dirs[3], "--output", str(tmp_path / "o"), "--formats", "png"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["series"]["loss"] == ["warmup", "distill"] and sorted(summary["figures"]) == ["ceped", "loss", "validation"]
    assert not list((tmp_path / "o").glob("*.svg"))

    def one_line(args, text):
        result = CliRunner().invoke(cli, ["plots", *args, "--output", str(tmp_path / "bad")])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and text in lines[0], result.output
        assert not (tmp_path / "bad").exists()

    one_line([str(tmp_path / "nothing")], f"runs: no such directory: {tmp_path / 'nothing'}")
    (tmp_path / "empty").mkdir()
    one_line([str(tmp_path / "empty")], "holds none of steps.tsv, validation.tsv")
    _tsv(tmp_path / "broken" / "steps.tsv", ["step", "loss"], [[1, 2.0], [2, "x"]])
    one_line([str(tmp_path / "broken")], "steps.tsv line 3: column 'loss' holds 'x', expected a number")
    _tsv(tmp_path / "header" / "steps.tsv", ["step", "loss"], [])
    one_line([str(tmp_path / "header")], "nothing to draw")
    one_line([dirs[0], "--formats", "gif"], "formats: expected some of png, svg")


# --- a real browser ---------------------------------------------------------------------------


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _screenshot(browser: str, page: Path, shot: Path) -> None:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=820,1000",
           f"--screenshot={shot}", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if not shot.is_file():
        pytest.skip(f"{browser} could not take a screenshot here: {proc.stderr.strip()[-300:]}")


def _ink(shot: Path) -> tuple[float, float]:
    """(share of non-white pixels, share of pixels in the first series' blue)."""
    import numpy as np
    from matplotlib.image import imread

    rgb = imread(str(shot))[..., :3]
    ink = (rgb < 0.9).any(axis=-1).mean()
    blue = np.array([int(PALETTE[0][i:i + 2], 16) / 255 for i in (1, 3, 5)])
    series = (np.abs(rgb - blue) < 0.08).all(axis=-1).mean()
    return float(ink), float(series)


def test_page_renders_in_a_headless_browser(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium/chrome on this machine")
    out = tmp_path / "plots"
    run(PlotsConfig(runs=_runs(tmp_path), output=str(out), formats=["svg"]))
    _screenshot(browser, out / "index.html", tmp_path / "shot.png")
    ink, blue = _ink(tmp_path / "shot.png")
    assert ink > 0.03 and blue > 0.0005, (ink, blue)  # axes, text and the curves were drawn
    # the check can fail: the same page with its images gone is blank
    for p in out.glob("*.svg"):
        p.unlink()
    _screenshot(browser, out / "index.html", tmp_path / "blank.png")
    ink_blank, blue_blank = _ink(tmp_path / "blank.png")
    assert blue_blank == 0 and ink_blank < ink / 3, (ink_blank, ink)
