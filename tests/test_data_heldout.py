"""`prepare-data`'s held-out source (every document to the test split) and its document export."""

from __future__ import annotations

import gzip
import json

import pytest

from pipeline.config import ConfigError
from pipeline.data.shards import ShardDataset, verify_shards
from pipeline.stages.prepare_data import PrepareConfig, run
from test_data_prepare import SMALL, paragraphs, shard_bytes, write_jsonl


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return (write_jsonl(root / "emma.jsonl", paragraphs(40, 40)),
            write_jsonl(root / "later.jsonl", paragraphs(40, 200)))


def build(tmp_path, sources, name="out", **kw):
    cfg = PrepareConfig(**{**SMALL, "source": [str(s) for s in sources], "layout": "concat",
                           "output": str(tmp_path / name), **kw})
    return run(cfg), tmp_path / name


def read_export(root, split):
    with gzip.open(root / "documents" / f"{split}.jsonl.gz", "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_a_held_out_source_reaches_only_the_test_split_and_the_export(tmp_path, two_sources):
    _, root = build(tmp_path, two_sources, heldout_sources=["later"], export_documents=["test", "train"])
    verify_shards(root)
    manifest = json.loads((root / "manifest.json").read_text())
    for split in ("train", "validation"):
        assert "later" not in manifest["splits"][split]["domains"], split
        assert all(ShardDataset(root, split)[i]["domain"] == "emma" for i in range(len(ShardDataset(root, split))))
    assert manifest["splits"]["test"]["domains"]["later"]["documents"] == 40
    test_docs = read_export(root, "test")
    later = [d for d in test_docs if d["domain"] == "later"]
    assert len(later) == 40 and all(d["heldout_source"] for d in later)
    assert all(not d["heldout_source"] for d in test_docs if d["domain"] == "emma")
    assert {d["text"] for d in later} == set(paragraphs(40, 200))
    # the export of a split holds exactly that split's documents, as the manifest counts them
    train_docs = read_export(root, "train")
    assert len(train_docs) == manifest["splits"]["train"]["documents"] == manifest["document_files"]["train"]["documents"]
    assert not {d["text"] for d in train_docs} & {d["text"] for d in test_docs}


def test_the_export_is_byte_identical_across_runs(tmp_path, two_sources):
    _, a = build(tmp_path, two_sources, "a", heldout_sources=["later"], export_documents=["test"])
    _, b = build(tmp_path, two_sources, "b", heldout_sources=["later"], export_documents=["test"])
    assert shard_bytes(a) == shard_bytes(b)


def test_bad_held_out_settings_are_refused(tmp_path, two_sources):
    with pytest.raises(ConfigError, match="heldout_sources: no selected source has domain 'nope'"):
        build(tmp_path, two_sources, heldout_sources=["nope"])
    with pytest.raises(ConfigError, match="splits has no 'test'"):
        PrepareConfig(heldout_sources=["x"], splits={"train": 0.9, "validation": 0.1})
    with pytest.raises(ConfigError, match="export_documents: 'dev'"):
        PrepareConfig(export_documents=["dev"])
    assert not (tmp_path / "out").exists()


def test_corpus_dir_stands_for_the_folder_in_source_specs(tmp_path, two_sources):
    folder = two_sources[0].parent
    _, a = build(tmp_path, [two_sources[0]], "a")
    cfg = PrepareConfig(**{**SMALL, "source": ["{corpus_dir}/emma.jsonl"], "corpus_dir": str(folder),
                           "layout": "concat", "output": str(tmp_path / "b")})
    run(cfg)
    manifest = lambda root: json.loads((root / "manifest.json").read_text())  # noqa: E731
    assert manifest(tmp_path / "b")["fingerprint"] == manifest(a)["fingerprint"]
    with pytest.raises(ConfigError, match="corpus_dir: a source names"):
        PrepareConfig(source=["{corpus_dir}/x.jsonl"], corpus_dir="")
