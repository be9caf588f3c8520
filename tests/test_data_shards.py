"""The shard reader (random access, pickling, seeded resumable order) and the validator."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.shards import ResumableSampler, ShardDataset, verify_shards
from pipeline.errors import CepeError
from pipeline.stages.prepare_data import PrepareConfig, run


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards") / "kjv"
    run(PrepareConfig(source=["embedded:kjv"], layout="prevdoc", decoder_len=32, n_chunks=2, chunk_len=16,
                      max_documents=3, num_proc=1, shard_size_mb=0.02, output=str(root)))
    return root


def copy(built: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(built, dst)
    return dst


def test_reader_gives_rows_across_shards(built):
    ds = ShardDataset(built, "train")
    m = ds.manifest
    assert len(ds.entries) > 2 and len(ds) == m["splits"]["train"]["rows"] == sum(e["rows"] for e in ds.entries)
    import pyarrow as pa

    tables = [pa.ipc.open_file(pa.memory_map(str(built / e["path"]))).read_all() for e in ds.entries]
    flat = np.concatenate([np.asarray(t.column("input_ids").combine_chunks().values).reshape(-1, 32) for t in tables])
    for i in (0, 1, ds.entries[0]["rows"], len(ds) - 1, -1):
        row = ds[i]
        np.testing.assert_array_equal(row["input_ids"], flat[i])
        assert row["encoder_input_ids"].shape == (2, 16) and row["input_ids"].flags.writeable
    # prevdoc: the decoder window of row i+1 follows row i's inside one document.
    a, b = ds[0], ds[1]
    if a["doc_id"] == b["doc_id"]:
        np.testing.assert_array_equal(b["encoder_input_ids"].reshape(-1)[-32:], a["input_ids"])
    with pytest.raises(IndexError):
        ds[len(ds)]
    clone = pickle.loads(pickle.dumps(ds))  # what DataLoader workers receive
    np.testing.assert_array_equal(clone[5]["input_ids"], ds[5]["input_ids"])


def test_reader_errors_name_the_problem(built, tmp_path):
    with pytest.raises(CepeError, match="no split 'dev'"):
        ShardDataset(built, "dev")
    with pytest.raises(CepeError, match="no manifest"):
        ShardDataset(tmp_path, "train")


def test_sampler_order_is_seeded_and_resumable(built):
    ds = ShardDataset(built, "train")
    n = len(ds)
    s = ds.sampler(seed=7)
    full = list(s)  # epoch 0
    assert sorted(full) == list(range(n)) and full != list(range(n))
    assert full == ds.order(7, 0).tolist() and ds.order(7, 1).tolist() != full
    assert s.state_dict() == {"n": n, "seed": 7, "epoch": 1, "position": 0}

    # Stop mid-epoch, save, restore in a fresh sampler: the rest is exactly what was left.
    s = ResumableSampler(n, seed=7)
    it = iter(s)
    first = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(s.state_dict()))
    resumed = ResumableSampler(n, seed=0)
    resumed.load_state_dict(state)
    assert len(resumed) == n - 5
    assert first + list(resumed) == full
    assert list(resumed)[:3] == ds.order(7, 1).tolist()[:3]  # then the next epoch
    with pytest.raises(CepeError, match="saved for"):
        ResumableSampler(n + 1).load_state_dict(state)


def test_sampler_works_with_a_torch_dataloader(built):
    import torch

    ds = ShardDataset(built, "train")
    s = ResumableSampler(len(ds), seed=1, position=len(ds) - 4)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=2, sampler=s))
    assert len(batches) == 2 and batches[0]["input_ids"].shape == (2, 32)
    assert batches[0]["encoder_input_ids"].shape == (2, 2, 16)
    want = ds.order(1, 0)[-4:-2]
    np.testing.assert_array_equal(batches[0]["input_ids"].numpy(), np.stack([ds[int(i)]["input_ids"] for i in want]))


def test_verify_accepts_a_fresh_build(built):
    out = verify_shards(built)
    assert out["rows"]["train"] == len(ShardDataset(built, "train"))


def test_verify_catches_a_truncated_shard(built, tmp_path):
    root = copy(built, tmp_path)
    shard = root / "train" / "shard-00001.arrow"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CepeError, match=r"train/shard-00001.arrow: \d+ bytes but the manifest says \d+ \(truncated"):
        verify_shards(root)
    with pytest.raises(CepeError, match="truncated"):
        ShardDataset(root, "train")  # the cheap check on open catches it too


def test_verify_catches_corruption_missing_and_extra_shards(built, tmp_path):
    root = copy(built, tmp_path)
    shard = root / "train" / "shard-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    shard.write_bytes(bytes(data))
    with pytest.raises(CepeError, match="shard-00000.arrow: sha256 .* does not match .* \\(corrupt\\)"):
        verify_shards(root)
    shutil.rmtree(root)
    root = copy(built, tmp_path)
    (root / "train" / "shard-00002.arrow").unlink()
    with pytest.raises(CepeError, match="shard-00002.arrow: shard missing"):
        verify_shards(root)
    shutil.rmtree(root)
    root = copy(built, tmp_path)
    shutil.copy(root / "train" / "shard-00000.arrow", root / "train" / "shard-09999.arrow")
    with pytest.raises(CepeError, match="shard-09999.arrow: shard not listed"):
        verify_shards(root)
    m = json.loads((root / "manifest.json").read_text())
    (root / "train" / "shard-09999.arrow").unlink()
    m["fingerprint"] = "0" * 64
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CepeError, match="fingerprint"):
        verify_shards(root)


def test_cli_verify_reports_a_truncated_shard_in_one_line(built, tmp_path):
    from click.testing import CliRunner

    from cepe_cli.main import cli

    root = copy(built, tmp_path)
    shard = root / "train" / "shard-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    res = CliRunner().invoke(cli, ["prepare-data", "--verify", str(root)])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and "shard-00000.arrow" in res.output and "truncated" in res.output
