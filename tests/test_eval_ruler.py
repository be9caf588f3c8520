"""RULER: generation is deterministic for a seed, answers are findable in the contexts, prompts
fit the target length with RULER's wording, and scoring is RULER's string match."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from eval_helpers import byte_tokenizer, save_tiny_cepe

from cepe_cli.main import cli
from pipeline.errors import CepeError
from pipeline.evaluate import ruler

ESSAY = ("It was a bright cold day in April. The clocks were striking thirteen! Who knew? " * 80).split(" ")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_generation_is_seeded_findable_and_fits(task, tok):
    a = ruler.generate_examples(task, 2048, 2, tok, 42, ESSAY)
    b = ruler.generate_examples(task, 2048, 2, tok, 42, ESSAY)
    assert [(x.input, x.answer_prefix, x.outputs) for x in a] == [(x.input, x.answer_prefix, x.outputs) for x in b]
    c = ruler.generate_examples(task, 2048, 2, tok, 43, ESSAY)
    assert [x.outputs for x in a] != [x.outputs for x in c]
    for ex in a:
        assert ex.outputs and all(o in ex.input for o in ex.outputs)  # every answer is in the context
        assert ex.tokens <= 2048  # prompt + tokens_to_generate fit the target length
        n_tokens = len(tok(ex.input + ex.answer_prefix, add_special_tokens=False)["input_ids"])
        assert ex.tokens == n_tokens + ruler.TASKS[task].tokens_to_generate
        assert ex.tokens > 2048 * 0.5  # the haystack was grown towards the target


def test_niah_wording_single_and_multi(tok):
    single = ruler.generate_examples("niah_single_1", 1024, 1, tok, 0)[0]
    assert single.input.startswith("A special magic number is hidden within the following text.")
    assert re.fullmatch(r" The special magic number for [\w-]+ mentioned in the provided text is", single.answer_prefix)
    assert re.fullmatch(r"\d{7}", single.outputs[0])
    assert f"One of the special magic numbers for " in single.input and "The grass is green." in single.input
    multi = ruler.generate_examples("niah_multivalue", 2048, 1, tok, 0, ESSAY)[0]
    assert multi.input.startswith("Some special magic numbers are hidden")
    assert len(multi.outputs) == 4 and multi.answer_prefix.endswith("mentioned in the provided text are")
    query = ruler.generate_examples("niah_multiquery", 2048, 1, tok, 0, ESSAY)[0]
    assert len(query.outputs) == 4 and query.input.count(", and ") == 1
    uuid = ruler.generate_examples("niah_multikey_3", 1024, 1, tok, 0)[0]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuid.outputs[0])


def test_variable_tracking_chain(tok):
    ex = ruler.generate_examples("vt", 2048, 1, tok, 5)[0]
    names = ex.outputs
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    value = re.search(r"assgined the value (\d+), they are: $", ex.answer_prefix).group(1)
    assert f"VAR {names[0]} = {value}" in ex.input
    for prev, cur in zip(names, names[1:]):
        assert f"VAR {cur} = VAR {prev}" in ex.input
    assert ex.input.startswith("Memorize and track")  # the in-context example comes first
    assert ex.input.count("Memorize and track") == 2


def test_scoring_is_string_match():
    assert ruler.postprocess("  abc\x00def\t ") == "abc\ndef"
    assert ruler.string_match_all(["1234567 and 7654321", "nothing"], [["1234567", "7654321"], ["x"]]) == 50.0
    assert ruler.string_match_all(["ABC"], [["abc", "d"]]) == 50.0  # case-insensitive, share found
    assert ruler.string_match_part(["abc"], [["abc", "d"]]) == 100.0
    with pytest.raises(CepeError, match="unknown RULER task 'niah'"):
        ruler.select_tasks(["niah"])


def test_cli_ruler_on_tiny_cepe(tmp_path):
    model = save_tiny_cepe(tmp_path / "m", max_positions=1024)
    hay = tmp_path / "hay.txt"
    hay.write_text(" ".join(ESSAY))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [
        "evaluate", "--task", "ruler", "--model", str(model), "--subtasks", "niah_single_1,niah_single_2",
        "--ruler-lengths", "1024", "--ruler-lengths", "1536", "--num-samples", "1", "--max-new-tokens", "2",
        "--ruler-haystack", str(hay), "--decoder-max-len", "512", "--output", str(out), "--progress", "false",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())["ruler"]
    assert set(metrics) == {"1024", "1536"} and set(metrics["1024"]) == {"niah_single_1", "niah_single_2", "average"}
    rows = [json.loads(line) for line in (out / "pred" / "1536" / "niah_single_1.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and all(r["encoder_chunks"] > 0 and r["decoder_tokens"] <= 512 for r in rows)
    assert (out / "ruler_by_length.tsv").read_text().startswith("length\tniah_single_1\tniah_single_2\taverage\n")
