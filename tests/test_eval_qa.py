"""Open-domain QA: the official answer normalisation and metrics, both data layouts, data errors,
REPLUG's ensembling, and `evaluate --task qa` end to end with a CEPE model and a plain decoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from eval_helpers import byte_tokenizer, save_tiny, save_tiny_cepe, tiny_llama

from cepe_cli.main import cli
from pipeline.evaluate import qa
from pipeline.evaluate.report import DataErrors

FIXTURES = Path(__file__).parent / "fixtures" / "qa"


@pytest.mark.parametrize("pred, gold, em, sub", [
    ("The Pacific Ocean.", "Pacific Ocean", 1, 1),      # article and punctuation dropped
    ("an apple a day", "Apple Day", 1, 1),             # every article, any case
    ("Theatre", "the atre", 0, 1),                      # "the" inside a word stays; the gold becomes "atre"
    ("  Paris,\tFrance ", "paris france", 1, 1),        # whitespace collapsed, comma dropped
    ("Beyoncé", "beyoncé", 1, 1),                       # non-ASCII letters lower-cased, kept
    ("“Paris”", "Paris", 0, 1),                         # curly quotes are not string.punctuation
    ("Beyonce\u0301", "Beyoncé", 0, 0),                 # no Unicode normalisation (NFD != NFC), as upstream
    ("it was Jane Austen who", "Austen", 0, 1),
])
def test_official_normalisation(pred, gold, em, sub):
    assert qa.exact_match(pred, gold) == bool(em)
    assert qa.substring_match(pred, gold) == bool(sub)


def test_scores_by_hand():
    # pred tokens [jane, austen, wrote, it]; gold [jane, austen]: P 2/4, R 1 -> F1 2/3
    s = qa.score("Jane Austen wrote it.", ["Charlotte Bronte", "Jane Austen"])
    assert s == {"em": 0.0, "f1": pytest.approx(2 / 3), "substring_em": 1.0}
    assert qa.f1("yes it is", "yes") == 0.0 and qa.f1("yes", "Yes.") == 1.0  # yes/no must match exactly
    assert qa.f1("the", "a") == 0.0  # both normalise to nothing: no common token
    assert qa.aggregate([{"em": 1, "f1": 0.5, "substring_em": 1}, {"em": 0, "f1": 0.25, "substring_em": 1}]) == \
        {"em": 50.0, "f1": 37.5, "substring_em": 100.0, "n": 2}
    assert qa.postprocess("  Paris\nQuestion: next") == "Paris"


def test_both_layouts_load_to_the_same_examples():
    errors = DataErrors()
    data, _ = qa.load_examples(str(FIXTURES), errors)
    assert set(data) == {"nq-open", "popqa"} and not errors.lines
    nq, pop = data["nq-open"], data["popqa"]
    assert [e.question for e in nq] == [e.question for e in pop] and [e.answers for e in nq] == [e.answers for e in pop]
    assert [(p.title, p.text) for p in nq[1].passages] == [(p.title, p.text) for p in pop[1].passages]
    assert nq[0].passages[0].score == 1.9 and pop[0].passages[0].score == 0.9  # string scores parsed; FlashRAG's retrieval_score
    assert nq[1].passages[0].render() == "Document (Title: Pride and Prejudice): Pride and Prejudice is an 1813 novel of manners by Jane Austen."


def test_every_bad_row_is_one_line_naming_file_line_and_field():
    errors = DataErrors()
    data, _ = qa.load_examples(str(FIXTURES / "bad" / "triviaqa.jsonl"), errors)
    assert len(data["triviaqa"]) == 2
    path = FIXTURES / "bad" / "triviaqa.jsonl"
    assert errors.lines == [
        f"{path} line 2: field 'question': expected a non-empty string",
        f"{path} line 3: field 'ctxs': expected a non-empty list of retrieved passages ({{title, text}} or FlashRAG {{contents}})",
        f"{path} line 4: field 'answers': expected a non-empty list of non-empty answer strings",
        f"{path} line 5: field 'ctxs': expected a non-empty list of retrieved passages ({{title, text}} or FlashRAG {{contents}})",
    ]


def test_prompt_and_demos():
    data, _ = qa.load_examples(str(FIXTURES / "nq-open.jsonl"), DataErrors())
    ex = data["nq-open"]
    import random

    demos = qa.sample_demos(ex, ex[0].question, 2, random.Random(0))
    assert len(demos) == 2 and all(d.question != ex[0].question for d in demos)
    text = qa.decoder_text([qa.demo_text(ex[1])], ex[0].passages[:1], ex[0].question)
    assert text == ("Document (Title: Pride and Prejudice): Pride and Prejudice is an 1813 novel of manners by Jane Austen.\n\n"
                    "Question: Who wrote Pride and Prejudice?\nAnswer: Jane Austen\n\n"
                    "Document (Title: France): France is a country in Western Europe. Its capital and largest city is Paris.\n\n"
                    "Question: What is the capital of France?\nAnswer:")
    tok = byte_tokenizer()
    full = len(qa.encode(tok, qa.decoder_text([], ex[0].passages, ex[0].question)))
    assert qa.fit_passages(tok, [], ex[0].passages, ex[0].question, full) == 5
    assert qa.fit_passages(tok, [], ex[0].passages, ex[0].question, full - 1) == 4


def test_replug_weights_and_one_passage_is_greedy_decoding():
    ps = [qa.Passage("a", "x", 2.0), qa.Passage("b", "y", 0.0)]
    w = qa.replug_weights(ps, 1.0)
    assert w[0] == pytest.approx(1 / (1 + torch.exp(torch.tensor(-2.0)).item()))
    assert qa.replug_weights([qa.Passage("a", "x"), qa.Passage("b", "y")], 1.0) == [0.5, 0.5]
    model = tiny_llama()
    prompt = list(range(40, 70))
    ours = qa.replug_generate(model, [prompt], [1.0], 6, [257], 258)
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=257, pad_token_id=258)[0, 30:]
    assert ours == ref.tolist()
    # two prompts of different lengths (left padding, own positions), equal weights: the same as mixing by hand
    other = list(range(80, 100))
    mixed = qa.replug_generate(model, [prompt, other], [0.5, 0.5], 1, [], 258)
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([prompt])).logits[0, -1], -1) + torch.softmax(model(torch.tensor([other])).logits[0, -1], -1)
    assert mixed == [int(p.argmax())]


def _qa(model, out, *extra):
    return CliRunner().invoke(cli, [
        "evaluate", "--task", "qa", "--progress", "false", "--model", str(model), "--data", str(FIXTURES),
        "--passages-decoder", "1", "--passages-encoder", "1", "--passages-encoder", "3", "--replug-passages", "2",
        "--max-new-tokens", "4", "--limit", "3", "--output", str(out), *extra])


def test_qa_runs_a_cepe_model_and_a_plain_decoder(tmp_path):
    cepe = save_tiny_cepe(tmp_path / "cepe", max_positions=1024)
    result = _qa(cepe, tmp_path / "c")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert set(metrics["qa"]) == {"nq-open", "popqa"}
    assert list(metrics["qa"]["nq-open"]) == ["cepe-1+1", "cepe-1+3", "decoder-fit", "replug-2"]
    row = metrics["qa"]["nq-open"]["cepe-1+3"]
    assert row["n"] == 3 and row["decoder_passages"] == 1 and row["encoder_passages"] == 3
    assert metrics["qa"]["nq-open"]["decoder-fit"]["decoder_passages"] == 4  # all 4 passages fit 1024 positions
    preds = [json.loads(l) for l in (tmp_path / "c" / "pred" / "popqa" / "cepe-1+3.jsonl").read_text().splitlines()]
    assert len(preds) == 3 and {"pred", "em", "f1", "substring_em", "answers"} <= set(preds[0])
    tsv = (tmp_path / "c" / "qa_by_passages.tsv").read_text().splitlines()
    assert tsv[0].split("\t")[:3] == ["dataset", "setting", "policy"] and len(tsv) == 9

    plain = save_tiny(tmp_path / "plain", max_positions=1024)
    result = _qa(plain, tmp_path / "p", "--qa-baselines", "replug")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert list(metrics["qa"]["popqa"]) == ["decoder-1", "replug-2"]


def test_qa_data_errors_are_written_and_counted(tmp_path):
    plain = save_tiny(tmp_path / "plain", max_positions=1024)
    result = CliRunner().invoke(cli, ["evaluate", "--task", "qa", "--progress", "false", "--model", str(plain),
                                      "--data", str(FIXTURES / "bad"), "--demos", "0", "--qa-baselines", "decoder",
                                      "--max-new-tokens", "2", "--output", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["data_errors"] == 4
    assert len((tmp_path / "o" / "data_errors.txt").read_text().splitlines()) == 4
    result = CliRunner().invoke(cli, ["evaluate", "--task", "qa", "--progress", "false", "--model", str(plain),
                                      "--data", str(FIXTURES / "bad"), "--output", str(tmp_path / "o2")])
    assert result.exit_code == 2 and "demos: 2 demonstrations asked for, only 0 usable" in result.output  # the two good rows ask the same question


def test_cepe_inputs_put_one_passage_per_chunk_and_the_demos_in_one():
    from pipeline.evaluate.downstream import _qa_inputs

    data, _ = qa.load_examples(str(FIXTURES / "nq-open.jsonl"), DataErrors())
    ex = data["nq-open"][0]
    tok = byte_tokenizer()
    demos = [qa.demo_text(d) for d in data["nq-open"][1:3]]
    prepared, n_dec, n_enc = _qa_inputs(qa.Setting("cepe", 2, 2), ex, demos, tok, 4096, 64)
    assert (n_dec, n_enc) == (2, 2)
    decoded = [tok.decode(c) for c in prepared.encoder_chunks]
    assert decoded[0] == ("\n\n".join(demos))[:64]  # byte tokens: the first 64 characters
    assert decoded[1:] == [ex.passages[2].render()[:64], ex.passages[3].render()[:64]]
    assert tok.decode(prepared.input_ids, skip_special_tokens=True) == qa.decoder_text([], ex.passages[:2], ex.question)
    prepared, n_dec, _ = _qa_inputs(qa.Setting("decoder", 5), ex, demos, tok, 400, 64)
    assert n_dec < 5 and len(prepared.input_ids) <= 400 and not prepared.encoder_chunks
