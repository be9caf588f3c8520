"""scripts/gpu_training.py: the mismatched-context control (pairing rule, dataset swap) and the
generated reading of the numbers. No training here: pure functions on small inputs."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gt():
    spec = importlib.util.spec_from_file_location("gpu_training_script", ROOT / "scripts" / "gpu_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_doc_span_and_parse(gt):
    starts, index = np.array([0, 10, 25]), np.array([3, 11, 19])
    assert gt.doc_span(starts, index, 0, 10) == (3, 3)
    assert gt.doc_span(starts, index, 5, 26) == (3, 19)
    assert gt.doc_span(starts, index, 10, 25) == (11, 11)
    assert gt.parse_doc_span("kjv:validation:4:docs11-19") == (11, 19)
    assert gt.parse_doc_span("kjv:validation:4") is None


def test_write_shards_records_documents(gt, tmp_path):
    from pipeline.data.shards import ShardDataset

    held = {"a": np.arange(40, dtype=np.int32), "b": np.arange(40, dtype=np.int32)}
    docs = {"validation": {"a": (np.array([0, 12]), np.array([3, 11])), "b": (np.array([0]), np.array([3]))}}
    root = gt.write_shards(tmp_path / "concat", "concat", {"validation": held}, decoder_len=4, n_chunks=2, chunk_len=4,
                           tok_info={}, limits={}, docs=docs)
    ds = ShardDataset(root, "validation")
    ids = [ds[i]["doc_id"] for i in range(len(ds))]
    assert ids[0] == "a:validation:0:docs3-3"  # tokens 0..11: document 3 only (11 starts at 12)
    assert ids[1] == "b:validation:0:docs3-3"
    assert "a:validation:1:docs3-11" in ids and "a:validation:3:docs11-11" in ids


def rows_two_sources():
    # source a: documents 3 (windows 0-3) and 11 (windows 4-7); source b: one document
    rows = []
    for i in range(8):
        rows.append(("a", f"a:validation:{i}:docs{3 if i < 4 else 11}-{3 if i < 4 else 11}"))
        rows.append(("b", f"b:validation:{i}:docs3-3"))
    return rows


def test_partners_prefer_same_source_other_document(gt):
    rows = rows_two_sources()
    partners, kinds = gt.mismatched_partners(rows, n_eval=len(rows), min_gap=2, prefer="same_source")
    for j, k in enumerate(partners):
        assert k != j
        if rows[j][0] == "a":  # a has two documents: same source, the other document
            assert rows[k][0] == "a" and gt.parse_doc_span(rows[k][1]) != gt.parse_doc_span(rows[j][1])
        else:  # b has one document: another source
            assert rows[k][0] == "a"
    assert kinds == {"same_source_other_document": 8, "other_source": 8, "same_source_apart": 0}


def test_partners_prefer_other_source_and_fallback(gt):
    rows = rows_two_sources()
    partners, kinds = gt.mismatched_partners(rows, n_eval=4, min_gap=2, prefer="other_source")
    assert len(partners) == 4 and all(rows[k][0] != rows[j][0] for j, k in enumerate(partners))
    assert kinds["other_source"] == 4
    # one source, one document, unknown spans: only windows far enough apart
    single = [("a", f"a:validation:{i}") for i in range(6)]
    partners, kinds = gt.mismatched_partners(single, n_eval=6, min_gap=3)
    assert all(abs(k - j) >= 3 for j, k in enumerate(partners)) and kinds["same_source_apart"] == 6
    with pytest.raises(ValueError):
        gt.mismatched_partners(single[:2], n_eval=2, min_gap=3)


def test_mismatched_context_swaps_only_the_encoder(gt):
    data = [{"input_ids": np.full(4, i), "encoder_input_ids": np.full((2, 2), 10 + i), "domain": "a", "doc_id": str(i)}
            for i in range(5)]
    ds = gt.MismatchedContext(data, [3, 0])
    assert len(ds) == 2
    assert (ds[0]["input_ids"] == 0).all() and (ds[0]["encoder_input_ids"] == 13).all()
    assert (ds[1]["input_ids"] == 1).all() and (ds[1]["encoder_input_ids"] == 10).all()
    assert (data[0]["encoder_input_ids"] == 10).all()  # the source rows are not changed
    head = gt.Head(data, 3)
    assert len(head) == 3 and head[2]["doc_id"] == "2"
    with pytest.raises(IndexError):
        head[3]


def test_ppl_difference_ci(gt):
    nll, tok = [1.0, 2.0, 1.5, 0.5], [1.0, 1.0, 1.0, 1.0]
    assert gt.ppl_difference_ci((nll, tok), (nll, tok)) == [0.0, 0.0]
    lo, hi = gt.ppl_difference_ci(([x + 1 for x in nll], tok), (nll, tok))
    assert 0 < lo <= hi


def fake_run(gt, with_ctx: float, mismatched: float, alone: float = 15.0, ceiling: float = 13.0):
    args = argparse.Namespace(n_chunks=8, chunk_len=256, decoder_len=512, budget_s=100.0)
    stage = {"loss_first": 3.0, "loss": 0.3, "steps": 10, "tokens_seen": 1e6}
    results = {"decoder-layers": {"warmup": stage, "train": stage,
                                  "params": {"trainable": 9e7, "cross_attention": 4e7, "encoder": 5e7}}}
    ppl = {"decoder_only": {"val_ppl": alone}, "ceiling": {"val_ppl": ceiling},
           "cepe_decoder-layers": {"val_ppl": with_ctx}, "mismatched_decoder-layers": {"val_ppl": mismatched}}
    summary = {"best_encoder": "decoder-layers", "scored_tokens": 65536}
    return gt.reading_section(args, results, ppl, {"pairs": {"same_source_other_document": 3}}, summary)


def test_reading_is_computed_from_the_numbers(gt):
    text = "\n".join(fake_run(gt, with_ctx=11.0, mismatched=11.0))
    assert "no measurable use of the context" in text and "does not come from reading this document" in text
    assert "below" in text  # 11 < ceiling 13
    text = "\n".join(fake_run(gt, with_ctx=11.0, mismatched=15.0))
    assert "CEPE uses it" in text and "needs this document's context" in text and "100% comes from the right context" in text
    assert "Not trained in this run: the mlm" in text
    assert "was not run" not in text


def test_scaling_section_follows_the_results(gt, tmp_path):
    args = argparse.Namespace(results=str(tmp_path))
    (tmp_path / "training.md").write_text("# T\n\n## Scaling\n\nold\n\n## After\n\nkept\n")
    run = {"device": "cpu", "steps": 5, "per_gpu_batch": 2, "global_batch": 2, "step_seconds": 1.0,
           "tokens_per_s": 100.0, "peak_memory_gb": 1.0, "val_ppl": 9.0, "command": "python x"}
    gt.write_scaling(args, [{**run, "processes": 1}])
    md = (tmp_path / "training.md").read_text()
    assert "Only 1-process run(s) completed" in md and "old" not in md and "## After\n\nkept" in md
    assert "Only the 1-process run is here" in (tmp_path / "training_scaling.md").read_text()
    gt.write_scaling(args, [{**run, "processes": 1}, {**run, "processes": 2, "global_batch": 4, "tokens_per_s": 180.0}])
    table = json.loads((tmp_path / "training_scaling.json").read_text())
    assert table["2"]["speedup"] == pytest.approx(1.8)
    assert "speedup 1.80" in (tmp_path / "training.md").read_text()
