"""The ppl evaluation's mismatched-context controls, bootstrap intervals and context use."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from eval_helpers import save_tiny_cepe, tiny_cepe

from cepe_cli.main import cli
from pipeline.evaluate import bootstrap, ppl


def docs3():
    rng = np.random.default_rng(0)
    tok = lambda n: rng.integers(0, 256, n).tolist()  # noqa: E731
    return [ppl.Doc("a1", tok(1100), "alpha"), ppl.Doc("a2", tok(1100), "alpha"),
            ppl.Doc("b1", tok(2400), "beta", True)]


def test_pairs_follow_the_rules_and_are_deterministic():
    docs = docs3()
    windows = ppl.make_windows(docs, 768, 128, None, None, 0)
    partners, counts = ppl.pair_windows(docs, windows, 768, "other-document", seed=3)
    assert (partners, counts) == ppl.pair_windows(docs, windows, 768, "other-document", seed=3)
    half = len(docs[2].tokens) // 2
    for j, k in enumerate(partners):
        (d, s) = windows[j]
        if docs[d].source == "alpha":
            assert k is not None and docs[windows[k][0]].source == "alpha" and windows[k][0] != d
        elif s + 768 <= half:  # beta has one document: first half pairs with the second half
            assert windows[k][0] == 2 and windows[k][1] >= half
        elif s >= half:
            assert windows[k][1] + 768 <= half
        else:
            assert k is None  # straddles the middle
    assert counts["same_source_other_document"] == sum(docs[d].source == "alpha" for d, _ in windows)
    assert counts["same_document_other_half"] > 0 and counts["other_source"] == 0
    assert sum(counts.values()) == len(windows)
    other, ocounts = ppl.pair_windows(docs, windows, 768, "other-source", seed=3)
    assert all(docs[windows[k][0]].source != docs[d].source for (d, _), k in zip(windows, other))
    assert ocounts["other_source"] == len(windows)


def test_a_control_reads_the_partner_context_and_its_own_decoder_tokens():
    model = tiny_cepe(max_positions=2048)
    docs = docs3()
    spec = ppl.LengthSpec(768, 512)
    windows = ppl.make_windows(docs, 768, 256, None, None, 0)[:3]
    context = [windows[2], windows[0], windows[1]]
    got = ppl.score_windows(model, docs, windows, spec, "cepe", 256, 256, 2, progress=False, context_windows=context)
    for (d, s), (cd, cs), x in zip(windows, context, got):
        enc = torch.tensor(docs[cd].tokens[cs : cs + 256]).reshape(1, 1, 256)
        dec = torch.tensor(docs[d].tokens[s + 256 : s + 768])[None]
        assert x == pytest.approx(float(ppl.window_nll(model, dec, 256, enc)[0]), abs=1e-5)


def test_bootstrap_is_seeded_and_covers_the_statistic():
    rng = np.random.default_rng(1)
    a, b = rng.normal(3.0, 0.5, 200), rng.normal(2.5, 0.5, 200)
    d = bootstrap.mean_difference(a, b, samples=500, seed=0)
    assert d == bootstrap.mean_difference(a, b, samples=500, seed=0)
    assert d["nll_ci"][0] < d["nll"] < d["nll_ci"][1] and d["nll_ci"][0] > 0.3
    assert d["ppl"] == pytest.approx(math.exp(a.mean()) - math.exp(b.mean()))
    own, control, alone, full = (rng.normal(m, 0.3, 300) for m in (2.0, 2.3, 2.6, 2.0))
    cu = bootstrap.ratio_of_mean_gains(own, control, alone, full, samples=500, seed=0)
    assert cu["value"] == pytest.approx((control.mean() - own.mean()) / (alone.mean() - full.mean()))
    assert cu["ci"][0] < cu["value"] < cu["ci"][1]
    assert bootstrap.bootstrap_interval([[1.0]], lambda x: x) is None


def test_cli_reports_controls_intervals_and_context_use(tmp_path):
    model_dir = save_tiny_cepe(tmp_path / "m", max_positions=1024)
    words = lambda k: " ".join(f"w{(i * k) % 89}" for i in range(260))  # noqa: E731  (~1K byte tokens)
    lines = [{"id": f"x{k}", "domain": "x", "text": words(k)} for k in (1, 2, 3)]
    lines += [{"id": "y1", "domain": "y", "text": words(5) + " " + words(7), "heldout_source": True}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [
        "evaluate", "--task", "ppl", "--model", str(model_dir), "--data", str(tmp_path / "docs.jsonl"),
        "--lengths", "768:512", "--min-doc-tokens", "768", "--max-windows", "40", "--output", str(out),
        "--baselines", "decoder-only,full-context,other-document,other-source", "--bootstrap-samples", "200",
        "--progress", "false"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["ppl"]["768"]) == {"cepe", "decoder-only", "full-context", "other-document", "other-source"}
    pairs = m["pairing"]["768"]["other-document"]["pairs"]
    assert pairs["same_source_other_document"] > 0 and pairs["same_document_other_half"] > 0
    assert m["ppl"]["768"]["other-document"]["n_windows"] == sum(v for k, v in pairs.items() if k != "unpaired")
    for variant in ("decoder-only", "full-context", "other-document", "other-source"):
        diff = m["differences"]["768"][variant]
        assert diff["nll_ci"][0] <= diff["nll"] <= diff["nll_ci"][1], variant
    assert m["heldout_sources"] == ["y"] and m["by_source"]["768"]["y"]["heldout_source"] is True
    # the context use, recomputed from the per-window NLLs of windows.jsonl
    rows = [json.loads(line) for line in (out / "windows.jsonl").read_text().splitlines()]
    nll = {}
    for r in rows:
        nll.setdefault(r["variant"], {})[(r["doc_id"], r["start"])] = r["nll"]
    keys = [k for k in nll["other-document"] if k in nll["full-context"]]
    mean = lambda v: sum(nll[v][k] for k in keys) / len(keys)  # noqa: E731
    expected = (mean("other-document") - mean("cepe")) / (mean("decoder-only") - mean("full-context"))
    cu = m["context_use"]["768"]
    assert cu["value"] == pytest.approx(expected, rel=2e-3)  # windows.jsonl rounds to 1e-6 and cu["n_windows"] == len(keys)
    assert set(m["by_source"]["768"]) == {"x", "y"}
    for src in ("x", "y"):
        assert m["by_source"]["768"][src]["context_use"]["n_windows"] > 0


def test_a_per_source_cap_keeps_every_source():
    docs = docs3()
    windows = ppl.make_windows(docs, 256, 64, None, None, 0, max_windows_per_source=5)
    by = {}
    for d, _ in windows:
        by[docs[d].source] = by.get(docs[d].source, 0) + 1
    assert by == {"alpha": 5, "beta": 5} and windows == sorted(windows)
    assert windows == ppl.make_windows(docs, 256, 64, None, None, 0, max_windows_per_source=5)
