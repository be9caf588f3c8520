"""`cepe prepare-data` end to end on small real text: windows, determinism, splits, formats,
filters, the mixture, and the CLI."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.corpus import CORPUS_DIR
from pipeline.data.layouts import prevdoc_windows
from pipeline.data.shards import ShardDataset, verify_shards
from pipeline.data.tokenize import load_tokenizer
from pipeline.stages.prepare_data import PrepareConfig, run

SMALL = dict(decoder_len=16, n_chunks=2, chunk_len=8, mlm_len=12, num_proc=1, shard_size_mb=0.004)


def paragraphs(n: int = 60, start: int = 40) -> list[str]:
    """`n` distinct real paragraphs (of *Emma*), 100 to 3000 characters each."""
    with gzip.open(CORPUS_DIR / "austen.jsonl.gz", "rt", encoding="utf-8") as fh:
        text = json.loads(fh.readline())["text"]
    paras = [p.strip() for p in text.split("\n\n") if 100 <= len(p.strip()) <= 3000]
    return paras[start: start + n]


def write_jsonl(path: Path, texts: list[str], ids: bool = True) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i, t in enumerate(texts):
            fh.write(json.dumps({"id": f"p{i}", "text": t} if ids else {"text": t}) + "\n")
    return path


def prep(tmp_path: Path, name: str = "out", **kw) -> tuple[dict, Path]:
    cfg = PrepareConfig(**{**SMALL, "output": str(tmp_path / name), **kw})
    return run(cfg), Path(cfg.output_dir())


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "emma.jsonl"
    return write_jsonl(path, paragraphs())


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded")


def test_prevdoc_rows_are_the_documents_windows(tmp_path, corpus, tok):
    summary, root = prep(tmp_path, source=[str(corpus)], layout="prevdoc", splits={"train": 1.0})
    ds = ShardDataset(root, "train")
    texts = {f"emma.jsonl:p{i}": t for i, t in enumerate(paragraphs())}
    expected = []
    for doc_id, text in texts.items():
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        enc, dec = prevdoc_windows(np.array(ids, dtype=np.int32), 16, 2, 8)
        expected += [(doc_id, e, d) for e, d in zip(enc, dec)]
    assert len(ds) == len(expected) == summary["rows"]["train"] > 0
    for i, (doc_id, e, d) in enumerate(expected):
        row = ds[i]
        assert row["doc_id"] == doc_id and row["layout"] == "prevdoc" and row["domain"] == "emma"
        assert row["input_ids"].dtype == np.int32 and row["input_ids"].shape == (16,)
        assert row["encoder_input_ids"].shape == (2, 8)
        np.testing.assert_array_equal(row["input_ids"], d)
        np.testing.assert_array_equal(row["encoder_input_ids"], e)
    assert len({e["path"] for e in ds.entries}) > 1  # small shards: several files
    assert ds.manifest["drops"]["shorter_than_window"] == sum(
        1 for t in texts.values() if len(tok(t, add_special_tokens=False)["input_ids"]) + 2 < 32)


def test_concat_rows_tile_the_concatenated_stream(tmp_path, corpus, tok):
    _, root = prep(tmp_path, source=[str(corpus)], layout="concat", splits={"train": 1.0})
    ds = ShardDataset(root, "train")
    stream = np.concatenate([
        [tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in paragraphs()
    ]).astype(np.int32)
    n = (len(stream) - 32) // 16 + 1
    assert len(ds) == n
    for i in (0, 1, n // 2, n - 1):
        row = ds[i]
        np.testing.assert_array_equal(row["encoder_input_ids"].reshape(-1), stream[16 * i: 16 * i + 16])
        np.testing.assert_array_equal(row["input_ids"], stream[16 * i + 16: 16 * i + 32])


def test_duplicate_and_mlm_layouts(tmp_path, corpus):
    _, root = prep(tmp_path, "dup", source=[str(corpus)], layout="duplicate", decoder_len=16, n_chunks=4, chunk_len=4)
    row = ShardDataset(root, "train")[3]
    assert row["encoder_input_ids"].shape == (4, 4)
    np.testing.assert_array_equal(row["encoder_input_ids"].reshape(-1), row["input_ids"])
    _, root = prep(tmp_path, "mlm", source=[str(corpus)], layout="mlm")
    ds = ShardDataset(root, "train")
    assert set(ds[0]) == {"input_ids", "domain", "layout", "doc_id"} and ds[0]["input_ids"].shape == (12,)
    m = ds.manifest
    assert (m["layout"], m["mlm_len"], m["decoder_len"], m["n_chunks"]) == ("mlm", 12, 12, 0)
    verify_shards(root)


def test_mix_has_the_configured_ratio(tmp_path, corpus):
    summary, root = prep(tmp_path, source=[str(corpus)], layout="mix", mix={"prevdoc": 2, "concat": 1},
                         splits={"train": 1.0})
    layouts = [r["layout"] for r in (ShardDataset(root, "train")[i] for i in range(summary["rows"]["train"]))]
    assert layouts[:6] == ["prevdoc", "concat", "prevdoc"] * 2
    p, c = layouts.count("prevdoc"), layouts.count("concat")
    assert p > 0 and abs(p - 2 * c) <= 2
    m = json.loads((root / "manifest.json").read_text())
    assert m["layout"] == "mix" and m["layouts"] == {"prevdoc": 2.0, "concat": 1.0}
    assert m["splits"]["train"]["layouts"] == {"concat": c, "prevdoc": p}


def test_same_inputs_give_identical_bytes_whatever_num_proc(tmp_path, corpus):
    kw = dict(source=[str(corpus), "embedded:abs-guide"], layout="mix", max_documents=50)
    _, a = prep(tmp_path, "a", **kw)
    _, b = prep(tmp_path, "b", **{**kw, "num_proc": 2})
    files_a, files_b = shard_bytes(a), shard_bytes(b)
    assert len(files_a) > 4 and files_a == files_b  # shards and manifest, byte for byte


def test_splits_are_disjoint_by_document(tmp_path, corpus):
    dup = tmp_path / "dup.jsonl"
    write_jsonl(dup, paragraphs()[:20] + paragraphs(1, start=300), ids=False)  # 20 texts again, other ids
    summary, root = prep(tmp_path, source=[str(corpus), str(dup)], layout="concat",
                         splits={"train": 0.5, "validation": 0.25, "test": 0.25}, n_chunks=1, chunk_len=4, decoder_len=4)
    seen: dict[str, str] = {}
    for split in ("train", "validation", "test"):
        ds = ShardDataset(root, split)
        assert len(ds) > 0
        for i in range(len(ds)):
            assert seen.setdefault(ds[i]["doc_id"], split) == split
    m = json.loads((root / "manifest.json").read_text())
    assert sum(m["splits"][s]["documents"] for s in m["splits"]) == m["documents"]["kept"] == 61
    assert m["drops"] == {"duplicate": 20}


def test_filters_are_counted_by_reason(tmp_path, corpus, tok):
    mixed = write_jsonl(tmp_path / "mixed.jsonl", paragraphs() + ["", "   \n\t ", "Short.", paragraphs()[0]])
    lengths = sorted(len(tok(t, add_special_tokens=False)["input_ids"]) + 2 for t in paragraphs())
    lo, hi = lengths[10], lengths[-10]
    summary, root = prep(tmp_path, source=[str(mixed)], layout="concat", min_doc_tokens=lo, max_doc_tokens=hi)
    drops = summary["drops"]
    assert drops["empty"] == 2 and drops["duplicate"] == 1
    assert drops["too_short"] == sum(1 for n in lengths if n < lo) + 1  # + "Short."
    assert drops["too_long"] == sum(1 for n in lengths if n > hi)
    m = json.loads((root / "manifest.json").read_text())
    assert m["documents"]["kept"] == 60 - drops["too_short"] + 1 - drops["too_long"]


def test_domain_selection_and_budget(tmp_path, corpus):
    summary, root = prep(tmp_path, source=[f"{corpus};domain=fiction", "embedded:kjv"], layout="concat",
                         domains=["fiction"])
    m = json.loads((root / "manifest.json").read_text())
    assert [s["selected"] for s in m["sources"]] == [True, False]
    assert set().union(*(m["splits"][s]["domains"] for s in m["splits"])) == {"fiction"}
    summary, _ = prep(tmp_path, "budget", source=[str(corpus)], layout="concat", max_documents=7)
    assert summary["documents"]["kept"] == 7 and summary["documents"]["stopped_by_budget"]


def test_weights_interleave_sources(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, [f"alpha {i} " * 30 for i in range(40)])
    write_jsonl(b, [f"gamma {i} " * 30 for i in range(40)])  # same lengths as a
    _, root = prep(tmp_path, source=[f"{a};weight=3", str(b)], layout="mlm", max_documents=20, splits={"train": 1.0})
    m = json.loads((root / "manifest.json").read_text())
    kept = [s["documents_kept"] for s in m["sources"]]
    assert sum(kept) == 20 and abs(kept[0] - 15) <= 1  # 3:1 by characters


def test_every_local_format_reads_the_same_documents(tmp_path, corpus):
    import zstandard

    texts = paragraphs()[:12]
    d = tmp_path / "formats"
    (d / "txt").mkdir(parents=True)
    for i, t in enumerate(texts[:3]):
        (d / "txt" / f"{i}.txt").write_text(t, encoding="utf-8")
    (d / "txt" / "notes.md").write_text("not a supported type: ignored in a directory")
    raw = "".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts[3:6]))
    (d / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw.encode()))
    (d / "b.json").write_text(json.dumps([{"body": t} for t in texts[6:9]]))
    pq.write_table(pa.table({"body": texts[9:12]}), d / "c.parquet")
    with gzip.open(d / "d.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"body": texts[0] + " (gz)"}) + "\n")
    summary, root = prep(tmp_path, source=[f"{d}/txt", f"{d}/*.*;text_field=body"], layout="mlm", splits={"train": 1.0})
    m = json.loads((root / "manifest.json").read_text())
    assert [s["documents_kept"] for s in m["sources"]] == [3, 10]
    ids = {ShardDataset(root, "train")[i]["doc_id"] for i in range(len(ShardDataset(root, "train")))}
    assert {"0.txt", "a.jsonl.zst:0", "c.parquet:1"} <= ids


def test_hf_source_goes_through_datasets(tmp_path, corpus):
    summary, root = prep(tmp_path, source=[f"hf:json;data_files={corpus};domain=novel"], layout="concat")
    m = json.loads((root / "manifest.json").read_text())
    assert m["documents"]["kept"] == 60 and m["sources"][0]["domain"] == "novel"
    ref, _ = prep(tmp_path, "ref", source=[f"{corpus};domain=novel"], layout="concat")
    assert ref["rows"] == summary["rows"]  # same text through either path, same windows


def test_embedded_default_config_runs_and_verifies(tmp_path):
    summary, root = prep(tmp_path, source=["embedded:abs-guide"], num_proc=2, max_documents=40)
    out = verify_shards(root)
    assert out["fingerprint"] == summary["fingerprint"]
    m = json.loads((root / "manifest.json").read_text())
    assert m["tokenizer"]["name"] == "embedded" and m["tokenizer"]["bos_token_id"] == 1
    assert m["params"]["layout"] == "mix" and "output" not in m["params"]
    assert all(e["sha256"] and e["rows"] for s in m["splits"].values() for e in s["shards"])


def test_cli_builds_and_verifies(tmp_path, corpus, monkeypatch):
    from click.testing import CliRunner

    from cepe_cli.main import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        "prepare:\n  layout: concat\n  decoder_len: 16\n  n_chunks: 2\n  chunk_len: 8\n  num_proc: 1\n"
    )
    runner = CliRunner()
    res = runner.invoke(cli, ["prepare-data", "--source", str(corpus), "--output", "shards/{layout}", "-S", "shard_size_mb=0.01"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["layout"] == "concat" and (tmp_path / "shards/concat/manifest.json").is_file()
    res = runner.invoke(cli, ["prepare-data", "--verify", "shards/concat"])
    assert res.exit_code == 0 and json.loads(res.output)["ok"] is True
    res = runner.invoke(cli, ["prepare-data", "--source", str(tmp_path / "nope.jsonl"), "--output", "x"])
    assert res.exit_code == 2 and "nope.jsonl" in res.output and "no such file" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_repository_params_prepare_sections_are_valid():
    """params.yaml and every profile in params/ give a valid PrepareConfig (unknown keys, bad
    types and contradictions fail here, not in a pipeline run)."""
    from pipeline.config import load_config, read_params

    root = Path(__file__).resolve().parent.parent
    files = [root / "params.yaml"] + sorted((root / "params").glob("*.yaml"))
    checked = 0
    for f in files:
        if f.is_file() and "prepare" in read_params(f):
            cfg = load_config(PrepareConfig, "prepare", f)
            assert cfg.layout_weights() and cfg.output_dir().name
            checked += 1
    assert checked >= 1
