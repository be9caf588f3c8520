"""`cepe evaluate` on bad input (one-line errors, exit 2) and ZeroSCROLLS end to end."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from eval_helpers import byte_tokenizer, save_tiny

from cepe_cli.main import cli
from pipeline.config import ConfigError, load_config
from pipeline.errors import CepeError
from pipeline.evaluate import adapters
from pipeline.evaluate import zeroscrolls as zs
from pipeline.stages.evaluate import EvaluateConfig


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs without --output write under ./reports: keep them out of the repo


def _run(*args):
    return CliRunner().invoke(cli, ["evaluate", "--progress", "false", *args])


def _one_line_error(result, text):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and text in lines[0], result.output
    assert "Traceback" not in result.output


def test_unknown_task_lists_the_known_ones():
    known = "ppl, longbench, longbench-e, zeroscrolls, ruler, qa, icl, ralm"
    with pytest.raises(ConfigError, match=rf"task: unknown task 'lonbench' \(known: {known}\)"):
        load_config(EvaluateConfig, "evaluate", None, {"task": "lonbench"})
    _one_line_error(_run("--task", "lonbench"), f"known: {known}")


def test_model_that_cannot_be_loaded(tmp_path):
    _one_line_error(_run("--task", "ruler", "--model", str(tmp_path / "missing")), f"model: no such directory: {tmp_path / 'missing'}")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    _one_line_error(_run("--task", "ruler", "--model", str(tmp_path / "broken")), "cannot be loaded")
    _one_line_error(_run("--task", "ppl"), "model: a model directory or name is required")


def test_other_bad_input(tmp_path):
    _one_line_error(_run("--task", "ruler", "--predictions", str(tmp_path)), "only the longbench and longbench-e tasks")
    _one_line_error(_run("--task", "longbench", "--subtasks", "qasperx", "--data", str(tmp_path)), "unknown LongBench task 'qasperx'")
    _one_line_error(_run("--task", "longbench", "--subtasks", "qasper", "--data", str(tmp_path)), "has no qasper.jsonl")
    _one_line_error(_run("--task", "zeroscrolls", "--subtasks", "qasper", "--data", str(tmp_path / "nothing")), "has no qasper/validation.jsonl")
    model = save_tiny(tmp_path / "m", max_positions=512)
    _one_line_error(_run("--task", "ruler", "--model", str(model), "--policy", "cepe"), "policy: 'cepe' needs a CEPE model")


def _zs_rows():
    doc = "Paragraph about the harbour and the lighthouse. " * 20
    query = "\n\nQuestion: Where is the lighthouse?\n\nAnswer:"
    head = "You are given a story. Answer the question.\n\nStory:\n"
    text = head + doc + query
    qs = len(head + doc)
    base = {"input": text, "query_start_index": qs, "query_end_index": len(text), "truncation_seperator": "... [The rest of the story is omitted]\n\n"}
    qasper = [{**base, "id": "q1", "output": "at the harbour"}, {**base, "id": "q1", "output": "near the sea"}, {**base, "id": "q2", "output": "unknown"}]
    quality = [{**base, "id": "m1", "output": "(B) the harbour"}]
    return qasper, quality


def test_zeroscrolls_keep_query_truncation_and_grouping(tmp_path):
    qasper, quality = _zs_rows()
    for task, rows in (("qasper", qasper), ("quality", quality)):
        (tmp_path / task).mkdir()
        (tmp_path / task / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, digest = zs.load_task(str(tmp_path), "qasper")
    assert [e["id"] for e in examples] == ["q1", "q2"] and examples[0]["references"] == ["at the harbour", "near the sea"]
    tok = byte_tokenizer()
    ex = examples[0]
    policy = adapters.VanillaPolicy(tok, 200, adapters.make_wrapper("none", tok))
    p = policy.prepare(adapters.Request(ex["input"], 50, query_start=ex["query_start_index"], separator=ex["truncation_seperator"]))
    text = tok.decode(p.input_ids, skip_special_tokens=True)
    assert len(p.input_ids) == 200  # document prefix cut on the right to fit exactly
    assert text.startswith("You are given a story.") and text.endswith(ex["truncation_seperator"] + ex["input"][ex["query_start_index"]:])

    model = save_tiny(tmp_path / "m", max_positions=512)
    out = tmp_path / "out"
    result = _run("--task", "zeroscrolls", "--model", str(model), "--data", str(tmp_path), "--subtasks", "qasper,quality",
                  "--max-new-tokens", "3", "--max-length", "300", "--output", str(out))
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["zeroscrolls"]) == {"qasper", "quality"} and "score" in metrics["zeroscrolls"]["qasper"]
    submission = json.loads((out / "submission" / "qasper.json").read_text())
    assert set(submission) == {"q1", "q2"}


def test_zeroscrolls_metrics():
    assert zs.quality_accuracy("The answer is (B).", "(B) the harbour") == 1.0
    assert zs.quality_accuracy("A lighthouse? No: C", "(B) x") == 0.0  # first A-D letter counts: "A"
    assert zs.token_f1("at the harbour", "the harbour") == pytest.approx(2 * 0.5 * 1 / 1.5)
    # SCROLLS docstring example: R-1/R-2/R-L 72.22/33.33/72.22 -> geometric mean 55.81
    per = [{"rouge1": 0.7222, "rouge2": 0.3333, "rougeL": 0.7222, "em": 0.0, "cepe_rougeL": 0.7}]
    assert zs.aggregate("gov_report", per)["score"] == pytest.approx(55.81, abs=0.01)
    s = zs.score_example("qmsum", "the cat sat on the mat", ["the cat sat on a mat", "dogs"])
    assert s["rouge1"] == pytest.approx(5 / 6) and s["rougeL"] == pytest.approx(5 / 6)
    with pytest.raises(CepeError, match="unknown ZeroSCROLLS task 'squality'"):
        zs.select_tasks(["squality"])
