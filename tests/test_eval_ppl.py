"""Long-context perplexity: the last-256 NLL equals a hand computation, windows follow the
protocol, the variants score the same tokens, and the CLI writes its tables."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from eval_helpers import byte_tokenizer, save_tiny_cepe, tiny_cepe, tiny_llama

from cepe_cli.main import cli
from pipeline.errors import CepeError
from pipeline.evaluate import ppl


def _hand_nll(model, ids: torch.Tensor, window: int = 256) -> float:
    """Full forward pass, then -log p(token_t | tokens_<t) averaged over the last `window` tokens."""
    with torch.no_grad():
        logits = model(ids[None]).logits[0].double()  # (T, V), every position
    logp = torch.log_softmax(logits, dim=-1)
    total = 0.0
    for t in range(len(ids) - window, len(ids)):
        total -= float(logp[t - 1, ids[t]])
    return total / window


def test_window_nll_equals_hand_computation():
    model = tiny_llama(max_positions=2048)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 256, (2, 700), generator=g)
    ours = ppl.window_nll(model, rows, 256)
    for b in range(2):
        assert float(ours[b]) == pytest.approx(_hand_nll(model, rows[b]), abs=1e-4)


def test_perplexity_over_windows_and_windows_protocol():
    docs = [("a", list(range(3000))), ("b", list(range(1000)))]
    w = ppl.make_windows(docs, 1024, 256, None, None, 0)
    assert w[:3] == [(0, 0), (0, 256), (0, 512)] and (1, 0) not in w  # doc b too short
    assert len(w) == (3000 - 1024) // 256 + 1
    assert ppl.make_windows(docs, 1024, 256, None, 1, 0) == [(0, 0)]  # one per document (128K)
    capped = ppl.make_windows(docs, 1024, 256, 3, None, 7)
    assert len(capped) == 3 and capped == sorted(capped) and capped == ppl.make_windows(docs, 1024, 256, 3, None, 7)
    assert ppl.perplexity([1.0, 3.0]) == pytest.approx(math.exp(2.0))


def test_lengths_parsing_and_paper_preset():
    specs = ppl.parse_lengths(ppl.PAPER_LENGTHS, 512, 256, 256)
    assert [(s.total, s.encoder, s.decoder) for s in specs] == [
        (4096, 2048, 2048), (8192, 4096, 4096), (32768, 28672, 4096), (131072, 126976, 4096)]
    assert [s.encoder // 256 for s in specs] == [8, 16, 112, 496]
    with pytest.raises(CepeError, match="leaves 488 tokens before the decoder's 512, not a whole number of 256-token encoder chunks"):
        ppl.parse_lengths(["1000:512"], 512, 256, 256)
    with pytest.raises(CepeError, match="TOTAL or TOTAL:DECODER"):
        ppl.parse_lengths(["4k"], 512, 256, 256)


def test_variants_score_the_same_tokens_on_a_cepe_model():
    model = tiny_cepe(max_positions=2048)
    decoder = model.decoder
    g = torch.Generator().manual_seed(1)
    doc = torch.randint(0, 256, (1600,), generator=g).tolist()
    docs = [("d", doc)]
    spec = ppl.LengthSpec(1024, 512)
    windows = ppl.make_windows(docs, spec.total, 256, None, None, 0)
    nll = {v: ppl.score_windows(model, docs, windows, spec, v, 256, 256, 2, progress=False) for v in ppl.VARIANTS}
    for (d, s), x_dec, x_full in zip(windows, nll["decoder-only"], nll["full-context"]):
        window = torch.tensor(doc[s : s + 1024])
        assert x_dec == pytest.approx(_hand_nll(decoder, window[512:]), abs=1e-4)  # plain decoder, own window
        assert x_full == pytest.approx(_hand_nll(decoder, window), abs=1e-4)  # whole window in the decoder
    # the encoder sees the 512 tokens before the decoder window, as 2 chunks of 256
    s = windows[0][1]
    enc = torch.tensor(doc[s : s + 512]).reshape(1, 2, 256)
    with torch.no_grad():
        logits = model(torch.tensor(doc[s + 512 : s + 1024])[None], encoder_input_ids=enc).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    target = doc[s + 512 : s + 1024]
    hand = -sum(float(logp[t - 1, target[t]]) for t in range(256, 512)) / 256
    assert nll["cepe"][0] == pytest.approx(hand, abs=1e-4)
    assert nll["cepe"] != nll["decoder-only"]


def test_cli_ppl_on_tiny_cepe(tmp_path):
    model_dir = save_tiny_cepe(tmp_path / "m", max_positions=1024)
    text = " ".join(f"word{i % 97}" for i in range(400))  # ~3.5K byte tokens
    (tmp_path / "docs.jsonl").write_text(json.dumps({"id": "x", "text": text}) + "\n" + json.dumps({"id": "short", "text": "tiny"}) + "\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["evaluate", "--task", "ppl", "--model", str(model_dir), "--data", str(tmp_path / "docs.jsonl"),
                                      "--lengths", "768:512,1536:512", "--max-windows", "2", "--output", str(out),
                                      "--progress", "false"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())["ppl"]
    assert set(metrics) == {"768", "1536"}
    assert set(metrics["768"]) == {"cepe", "decoder-only", "full-context"}
    assert metrics["768"]["cepe"]["n_windows"] == 2 and metrics["768"]["cepe"]["encoder_tokens"] == 256
    assert metrics["1536"]["full-context"]["ppl"] is None  # 1536 > 1024 positions: skipped, said so
    assert "exceed" in metrics["1536"]["full-context"]["skipped"]
    rows = [json.loads(line) for line in (out / "windows.jsonl").read_text().splitlines()]
    by_variant = {}
    for r in rows:
        by_variant.setdefault((r["total"], r["variant"]), []).append((r["doc_id"], r["start"], r["nll"]))
    # same windows for every variant; the metric is exp(mean NLL) over them
    assert [x[:2] for x in by_variant[(768, "cepe")]] == [x[:2] for x in by_variant[(768, "decoder-only")]]
    nlls = [x[2] for x in by_variant[(768, "cepe")]]
    assert metrics["768"]["cepe"]["ppl"] == pytest.approx(math.exp(sum(nlls) / 2), rel=1e-4)
    tsv = (out / "ppl_by_length.tsv").read_text().splitlines()
    assert tsv[0] == "total_len\tcepe\tdecoder-only\tfull-context" and tsv[2].endswith("\t")
    assert "| 768 (256+512) |" in (out / "table.md").read_text()
    run = json.loads((out / "run.json").read_text())
    assert run["data"]["documents"]["n_long_documents"] == 1 and run["lengths"][1]["encoder"] == 1024


def test_ppl_errors(tmp_path):
    with pytest.raises(CepeError, match="does not exist"):
        ppl.read_documents(str(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(CepeError, match=r"bad.jsonl line 2: expected an object with a 'text' string"):
        ppl.read_documents(str(tmp_path / "bad.jsonl"))
    with pytest.raises(CepeError, match="unknown baseline 'full'"):
        ppl.variants_for(True, ["full"])
    docs = ppl.tokenize_documents([("a", "x" * 100)], byte_tokenizer(), 101)
    assert docs == []  # 100 byte tokens < 101: filtered


def test_ppl_reads_prepare_data_shards(tmp_path):
    from pipeline.data.shards import ShardDataset
    from pipeline.stages.prepare_data import PrepareConfig
    from pipeline.stages.prepare_data import run as prepare

    model_dir = save_tiny_cepe(tmp_path / "m", max_positions=1024)
    docs = [" ".join(f"token{(i * k) % 101}" for i in range(150)) for k in range(1, 7)]
    (tmp_path / "src.jsonl").write_text("".join(json.dumps({"id": f"d{k}", "text": t}) + "\n" for k, t in enumerate(docs)))
    prepare(PrepareConfig(source=[str(tmp_path / "src.jsonl")], tokenizer=str(model_dir), layout="concat",
                          output=str(tmp_path / "shards"), decoder_len=300, n_chunks=2, chunk_len=64,
                          splits={"train": 0.5, "test": 0.5}, num_proc=1))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["evaluate", "--task", "ppl", "--model", str(model_dir), "--data", str(tmp_path / "shards"),
                                      "--max-windows", "2", "--output", str(out), "--progress", "false"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())["ppl"]
    assert list(metrics) == ["428"] and metrics["428"]["cepe"]["encoder_tokens"] == 128
    ds = ShardDataset(tmp_path / "shards", "test")
    rows = [json.loads(line) for line in (out / "windows.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["variant"] == "decoder-only")
    index = int(first["doc_id"].rsplit("#", 1)[1])
    from transformers import AutoModelForCausalLM

    decoder = AutoModelForCausalLM.from_pretrained(model_dir).decoder
    hand = _hand_nll(decoder, torch.tensor(ds[index]["input_ids"], dtype=torch.long))
    assert first["nll"] == pytest.approx(hand, abs=1e-4)
