"""`cepe bench-serve` on the tiny presets (CPU): every measurement runs and the report holds."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from cepe_cli.main import cli


def test_bench_serve_tiny(tmp_path):
    torch.set_num_threads(1)
    (tmp_path / "p.yaml").write_text("{}\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [
        "bench-serve", "--params", str(tmp_path / "p.yaml"), "--decoder", "tiny", "--encoder", "tiny",
        "--document-tokens", "200", "--chunk-len", "16", "--question-tokens", "8", "--gen-tokens", "3",
        "--clients", "1,3", "--device", "cpu", "--dtype", "float32", "--repeats", "1", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "serve.json").read_text())
    res = report["results"]
    assert report["complete"], res
    assert res["cold"]["tokens"] == 200 and res["cold"]["chunks"] == 13  # 12 full chunks + 8 tokens
    assert res["full_attention"]["tokens"] == 208
    # tiny shapes: a document's states (32 wide) against a 2-layer, 2-KV-head x 16 KV cache (128 per token)
    assert res["memory"]["document_state_bytes"] == 200 * 32 * 4
    assert res["memory"]["kv_cache_bytes"] == 200 * 2 * 2 * 2 * 16 * 4
    assert res["clients_3"]["tokens"] == 9 and res["clients_3"]["batches"] == 1  # three clients, one batch
    assert res["cached"]["cache_hits"] >= 2
    assert "| 3 | 9 |" in (out / "serve.md").read_text()
