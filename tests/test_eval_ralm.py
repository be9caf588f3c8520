"""Retrieval-augmented LM: the passage index (`cepe index`, BM25 and dense) and `evaluate --task ralm`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from eval_helpers import byte_tokenizer, save_tiny, save_tiny_cepe

from cepe_cli.main import cli
from pipeline.errors import CepeError
from pipeline.evaluate.retrieval import PassageIndex, doc_key
from pipeline.stages.index import IndexConfig, run as build

CORPUS = Path(__file__).parent / "fixtures" / "ralm" / "corpus.jsonl"
pytest.importorskip("bm25s")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ralm")
    return {"cepe": save_tiny_cepe(root / "cepe", max_positions=1024), "plain": save_tiny(root / "plain", max_positions=1024),
            "root": root}


@pytest.fixture(scope="module")
def bm25_index(models):
    out = models["root"] / "index"
    build(IndexConfig(corpus=str(CORPUS), output=str(out), tokenizer=str(models["cepe"]), passage_tokens=64))
    return out


def test_bm25_index_is_plain_files_and_finds_the_topic(bm25_index):
    manifest = json.loads((bm25_index / "manifest.json").read_text())
    assert manifest["corpus"]["n_documents"] == 8 and manifest["passage_tokens"] == 64
    assert all(not name.endswith((".pkl", ".pt", ".pickle")) for name in manifest["files"])
    index = PassageIndex(bm25_index)
    lengths = [len(index.passage_ids(i)) for i in range(len(index))]
    assert max(lengths) == 64 and len(index) == sum(-(-len(json.loads(l)["text"]) // 64) for l in CORPUS.read_text().splitlines())
    hits = index.search(["the keeper trimmed the wick of the lamp"], 3)[0]
    assert [index.passages[h.index]["doc"].split("-")[0] for h in hits] == ["lighthouse"] * 3
    assert hits[0].score >= hits[1].score >= hits[2].score > 0
    # the query's own document is never returned
    own = doc_key(json.loads(CORPUS.read_text().splitlines()[0])["text"])
    hits = index.search(["the keeper trimmed the wick of the lamp"], 20, [own])[0]
    assert hits and all(index.passages[h.index]["doc_key"] != own for h in hits)
    # no query term in the corpus: nothing is retrieved (not k arbitrary zero-score passages)
    assert index.search(["zzqx qqqv"], 3) == [[]]


def test_changed_index_or_other_tokenizer_is_refused(bm25_index, models, tmp_path):
    import shutil

    copy = tmp_path / "index"
    shutil.copytree(bm25_index, copy)
    with open(copy / "passages.jsonl", "a") as fh:
        fh.write("\n")
    with pytest.raises(CepeError, match="changed since the index was built"):
        PassageIndex(copy)
    other = tmp_path / "other-tok"
    tok = byte_tokenizer()
    tok.add_tokens(["lighthouse"])
    save_tiny(other, max_positions=1024)
    tok.save_pretrained(other)
    result = CliRunner().invoke(cli, ["evaluate", "--task", "ralm", "--progress", "false", "--model", str(other),
                                      "--index", str(bm25_index), "--data", str(CORPUS), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "was cut with tokenizer" in result.output, result.output


def _ralm(model, index, out, *extra):
    return CliRunner().invoke(cli, [
        "evaluate", "--task", "ralm", "--progress", "false", "--model", str(model), "--index", str(index),
        "--data", str(CORPUS), "--decoder-len", "128", "--eval-window", "64", "--chunk-len", "64",
        "--max-windows", "4", "--ralm-passages", "0", "--ralm-passages", "2", "--ralm-passages", "4",
        "--ralm-passages", "16", "--output", str(out), *extra])


def test_ralm_cepe_and_plain_decoder(bm25_index, models, tmp_path):
    result = _ralm(models["cepe"], bm25_index, tmp_path / "cepe")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "cepe" / "metrics.json").read_text())["ralm"]
    assert set(metrics) == {"0", "2", "4", "16"}
    assert metrics["0"]["cepe"] == metrics["0"]["in-decoder"]  # no passage: the decoder alone
    assert metrics["2"]["cepe"]["ppl"] != metrics["0"]["cepe"]["ppl"]  # the passages reach the model
    assert metrics["16"]["in-decoder"]["ppl"] is None and "exceed" in metrics["16"]["in-decoder"]["skipped"]
    assert metrics["16"]["cepe"]["n_windows"] == 4
    retrieved = [json.loads(l) for l in (tmp_path / "cepe" / "retrieval.jsonl").read_text().splitlines()]
    assert len(retrieved) == 4 and all(1 <= len(r["passages"]) <= 16 for r in retrieved)
    # fewer than k share a term with some queries: those windows get what there is
    assert metrics["16"]["cepe"]["passages_mean"] == pytest.approx(sum(len(r["passages"]) for r in retrieved) / 4, abs=0.01)
    assert all(p["doc"] != r["doc_id"] for r in retrieved for p in r["passages"])
    tsv = (tmp_path / "cepe" / "ralm_by_passages.tsv").read_text().splitlines()
    assert tsv[0] == "passages\tcepe\tin-decoder" and len(tsv) == 5

    result = _ralm(models["plain"], bm25_index, tmp_path / "plain")
    assert result.exit_code == 0, result.output
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())["ralm"]
    assert set(plain["2"]) == {"in-decoder"}
    # the CEPE model wraps this very decoder: without encoder input it scores the same windows the same
    for k in ("0", "2", "4"):
        assert plain[k]["in-decoder"]["ppl"] == pytest.approx(metrics[k]["in-decoder"]["ppl"], rel=1e-4)


def test_dense_index_with_a_tiny_encoder(models, tmp_path):
    from transformers import BertConfig, BertModel

    enc_dir = tmp_path / "encoder"
    BertModel(BertConfig(vocab_size=259, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, pad_token_id=258)).save_pretrained(enc_dir)
    byte_tokenizer().save_pretrained(enc_dir)
    out = tmp_path / "dense"
    build(IndexConfig(corpus=str(CORPUS), output=str(out), tokenizer=str(models["cepe"]), passage_tokens=64,
                      retriever="dense", dense_model=str(enc_dir), dense_max_length=128, device="cpu"))
    index = PassageIndex(out)
    import numpy as np

    emb = np.load(out / "embeddings.npy")
    assert emb.shape == (len(index), 32)
    # the best hit for a passage's own text is that passage (inner product of mean-pooled states)
    text = index.passages[5]["text"]
    hit = index.search([text], 1)[0][0]
    q = index._encoder.encode([text])[0]
    assert hit.score == pytest.approx(float(q @ emb[hit.index]), rel=1e-5)
    assert hit.score == pytest.approx(float((q @ emb.T).max()), rel=1e-5)
    result = _ralm(models["cepe"], out, tmp_path / "o")
    assert result.exit_code == 0, result.output


def test_index_bad_input_is_one_line(tmp_path):
    def run(*args):
        return CliRunner().invoke(cli, ["index", "--output", str(tmp_path / "i"), *args])

    result = run("--retriever", "dense")
    assert result.exit_code == 2 and "dense_model: retriever 'dense' needs an encoder model directory" in result.output
    result = run("--corpus", str(tmp_path / "missing"))
    assert result.exit_code == 2 and "does not exist" in result.output
    assert not (tmp_path / "i").exists()  # nothing half-written
    result = CliRunner().invoke(cli, ["evaluate", "--task", "ralm", "--model", str(tmp_path), "--index", str(tmp_path)])
    assert result.exit_code == 2
