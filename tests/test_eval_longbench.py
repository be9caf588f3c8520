"""LongBench: scoring prediction files as the official eval.py does, data and prompt handling,
input policies, bad input, and an end-to-end run on the tiny fixture in the official layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from eval_helpers import byte_tokenizer, save_tiny

from cepe_cli.main import cli
from pipeline.errors import CepeError
from pipeline.evaluate import adapters
from pipeline.evaluate import longbench as lb

FIXTURE = Path(__file__).parent / "fixtures" / "longbench"


def _cli(*args):
    result = CliRunner().invoke(cli, ["evaluate", "--progress", "false", *args], catch_exceptions=False)
    return result


def test_scores_equal_official_eval_py(tmp_path):
    """Golden: the official eval.py's result.json on the same prediction files."""
    out = tmp_path / "out"
    result = _cli("--task", "longbench", "--predictions", str(FIXTURE / "pred"), "--output", str(out))
    assert result.exit_code == 0, result.output
    ours = json.loads((out / "result.json").read_text())
    assert ours == json.loads((FIXTURE / "official_result.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"] == ours and metrics["average"] == round(sum(ours.values()) / len(ours), 2)
    run = json.loads((out / "run.json").read_text())
    assert run["task"] == "longbench" and "trec.jsonl" in run["data"] and run["wall_time_s"] >= 0


def test_longbench_e_buckets_equal_official(tmp_path):
    out = tmp_path / "out"
    assert _cli("--task", "longbench-e", "--predictions", str(FIXTURE / "pred"), "--output", str(out)).exit_code == 0
    ours = json.loads((out / "result.json").read_text())  # NaN for empty buckets, as eval.py
    official = json.loads((FIXTURE / "official_result_e.json").read_text())
    assert ours.keys() == official.keys()
    for task, buckets in official.items():
        for key, value in buckets.items():
            assert (math.isnan(value) and math.isnan(ours[task][key])) or ours[task][key] == value, (task, key)
    metrics = json.loads((out / "metrics.json").read_text())  # strict JSON for DVC: NaN -> null
    assert metrics["tasks"]["trec"]["4-8k"] is None


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bad_prediction_files_name_file_and_line(tmp_path):
    good = json.dumps({"pred": "a", "answers": ["a"], "all_classes": None, "length": 3})
    _write(tmp_path / "p1" / "qasper.jsonl", [good, "{not json"])
    with pytest.raises(CepeError, match=r"qasper.jsonl line 2: invalid JSON"):
        lb.score_directory(tmp_path / "p1")
    _write(tmp_path / "p2" / "qasper.jsonl", [good, json.dumps({"pred": "a", "all_classes": None})])
    with pytest.raises(CepeError, match=r"qasper.jsonl line 2: missing field\(s\) answers"):
        lb.score_directory(tmp_path / "p2")
    _write(tmp_path / "p3" / "qasper.jsonl", [json.dumps({"pred": "x", "answers": ["x"], "all_classes": None})])
    assert lb.score_directory(tmp_path / "p3") == {"qasper": 100.0}  # length not needed here...
    with pytest.raises(CepeError, match=r"line 1: missing field\(s\) length"):
        lb.score_directory(tmp_path / "p3", e=True)  # ...but LongBench-E buckets by it
    _write(tmp_path / "p4" / "qasperr.jsonl", [good])
    with pytest.raises(CepeError, match=r"'qasperr' is not a LongBench task \(known: narrativeqa"):
        lb.score_directory(tmp_path / "p4")
    # through the CLI: one line on stderr, exit status 2, no traceback
    result = CliRunner().invoke(cli, ["evaluate", "--task", "longbench", "--predictions", str(tmp_path / "p1"),
                                      "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "line 2: invalid JSON" in result.output


def test_all_classes_of_the_last_line_apply_to_the_whole_file(tmp_path):
    """eval.py keeps `all_classes` from the last line it read."""
    rows = [{"pred": "Location", "answers": ["Location"], "all_classes": ["Location"], "length": 1},
            {"pred": "Location", "answers": ["Location"], "all_classes": ["Entity"], "length": 1}]
    _write(tmp_path / "p" / "trec.jsonl", [json.dumps(r) for r in rows])
    assert lb.score_directory(tmp_path / "p") == {"trec": 0.0}  # "Location" is not a class of the last line


def test_vendored_prompts_are_upstream_bytes_with_their_quirks():
    prompts = lb.load_config_file("dataset2prompt.json")
    maxlen = lb.load_config_file("dataset2maxlen.json")
    assert set(prompts) == set(lb.TASKS) == set(maxlen)
    assert prompts["narrativeqa"].count("asconcisely") == 2
    assert "\n\n Answer the question" in prompts["qasper"]
    assert "Write a one-page summary of all news. \n\n" in prompts["multi_news"]
    assert prompts["passage_count"].endswith("The final answer is: ")
    assert prompts["lcc"] == "Please complete the code given below. \n{context}Next line of code:\n"
    assert maxlen["gov_report"] == 512 and maxlen["hotpotqa"] == 32
    assert (lb.RESOURCES / "LICENSE").read_text().startswith("MIT License")


def test_data_directory_missing_a_task_file(tmp_path):
    data = lb.LongBenchData(str(FIXTURE))
    rows, digest = data.load("trec")
    assert len(rows) == 2 and len(digest) == 64
    with pytest.raises(CepeError, match=r"has no narrativeqa.jsonl"):
        data.load("narrativeqa")
    with pytest.raises(CepeError, match=r"unknown LongBench task 'qsper'"):
        lb.select_tasks(["qsper"], e=False)
    with pytest.raises(CepeError, match=r"unknown LongBench-E task 'narrativeqa'"):
        lb.select_tasks(["narrativeqa"], e=True)


def test_hub_fails_offline_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CepeError) as info:
        lb.LongBenchData("hub")
    assert "\n" not in str(info.value) and "--data DIR" in str(info.value)


def test_requests_follow_pred_py():
    prompts, maxlen = lb.load_config_file("dataset2prompt.json"), lb.load_config_file("dataset2maxlen.json")
    ex = {"input": "Q?", "context": "C {x}", "answers": ["a"], "length": 1, "all_classes": None}
    trec, samsum, qasper = (lb.build_requests(t, [ex], prompts, maxlen)[0] for t in ("trec", "samsum", "qasper"))
    assert trec.prompt.endswith("examples of questions.\n\nC {x}\nQ?") and not trec.chat and trec.max_new_tokens == 64
    assert samsum.stop_on_newline and not samsum.chat and samsum.prompt.endswith("C {x}\n\nQ?")
    assert qasper.chat and not qasper.stop_on_newline and qasper.max_new_tokens == 128


def test_middle_truncation_and_wrapper_as_pred_py():
    tok = byte_tokenizer()  # one token per byte, plus BOS
    wrap = adapters.make_wrapper("llama2", tok)
    policy = adapters.VanillaPolicy(tok, 21, wrap)  # half = 10: BOS + 9 bytes, then the last 10 bytes
    p = policy.prepare(adapters.Request("0123456789" * 3, 5))
    assert tok.decode(p.input_ids) == "<s>[INST]012345678" + "0123456789" + "[/INST]"
    assert p.dropped_tokens == 31 - 20
    fits = policy.prepare(adapters.Request("short", 5, chat=False))
    assert tok.decode(fits.input_ids) == "<s>short"


def test_end_to_end_on_fixture(tmp_path):
    model = save_tiny(tmp_path / "model", max_positions=1024)
    out = tmp_path / "out"
    result = _cli("--task", "longbench", "--model", str(model), "--data", str(FIXTURE), "--output", str(out),
                  "--subtasks", "qasper,trec,samsum,passage_count,lcc", "--max-new-tokens", "4",
                  "--chat-wrapper", "llama2", "--max-length", "300", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    for task, n in (("qasper", 2), ("trec", 2), ("samsum", 1), ("passage_count", 1), ("lcc", 1)):
        rows = [json.loads(line) for line in (out / "pred" / f"{task}.jsonl").read_text().splitlines()]
        assert len(rows) == n and all(set(r) == {"pred", "answers", "all_classes", "length"} for r in rows)
    # the written result is what scoring the written predictions gives (the official path)
    assert json.loads((out / "result.json").read_text()) == lb.score_directory(out / "pred")
    run = json.loads((out / "run.json").read_text())
    assert run["policy"]["name"] == "vanilla" and run["inputs"]["qasper"]["examples_truncated"] == 2
    assert set(run["data"]) == {"qasper", "trec", "samsum", "passage_count", "lcc"}
    assert run["model_info"]["cepe"] is False and run["wall_time_s"] > 0
    # --limit evaluates a subset
    out2 = tmp_path / "out2"
    assert _cli("--task", "longbench", "--model", str(model), "--data", str(FIXTURE), "--output", str(out2),
                "--subtasks", "qasper", "--limit", "1", "--max-new-tokens", "2").exit_code == 0
    assert len((out2 / "pred" / "qasper.jsonl").read_text().splitlines()) == 1
