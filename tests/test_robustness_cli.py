"""Error paths a new user meets (issue 17, items 11-13 and 15): one line each, nothing half-written,
no 20-30 s of hub retries without network, and no library noise in a stage's output."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from eval_helpers import save_tiny, save_tiny_cepe

from cepe_cli.main import cli
from pipeline import hub
from pipeline.errors import CepeError

REPO = Path(__file__).resolve().parent.parent
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a params.yaml of the repository must not fill the configs


@pytest.fixture
def fresh_probe(monkeypatch):
    """The hub probe unasked in this test (and put back after), HF_HUB_OFFLINE as the test sets it."""
    monkeypatch.setattr(hub, "_probed", hub._UNPROBED)
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", ""))  # restored after the test
    return monkeypatch


def _cli(*args):
    return CliRunner().invoke(cli, list(args))


def _one_line(result, *texts):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for text in texts:
        assert text in lines[0], lines[0]
    return lines[0]


# --- 12: missing local directories and the hub without network ------------------------------


@pytest.mark.parametrize("args, option", [
    (["evaluate", "--task", "ppl", "--model", "runs/nothing/model"], "model"),
    (["evaluate", "--task", "ppl", "--model", "./m", "--tokenizer", "./nothing"], "model"),
    (["convert-decoder", "--source", "runs/no/decoder", "--output", "out"], "source"),
    (["prepare-data", "--tokenizer", "runs/no/tok", "--output", "out"], "tokenizer"),
    (["prepare-data", "--source", "hf:data/no/such", "--output", "out"], "source 'hf:data/no/such'"),
    (["warmup", "--decoder", "runs/no/decoder", "--data", "{dup}", "--output", "out"], "decoder"),
    (["pretrain-encoder", "--decoder", "runs/no/decoder", "--init", "decoder-layers", "--data", "{mlm}", "--output", "out"], "decoder"),
])
def test_missing_local_directory_says_so(args, option, tmp_path):
    """Not the hub's `Repo id must use alphanumeric chars...`: the directory is missing."""
    from _train_helpers import write_shards

    dup = write_shards(tmp_path / "dup", "duplicate", n_train=2, n_val=1, decoder_len=16, n_chunks=2, chunk_len=8)
    mlm = write_shards(tmp_path / "mlm", "mlm", n_train=2, n_val=1, decoder_len=16)
    line = _one_line(_cli(*[a.format(dup=dup, mlm=mlm) for a in args]), f"{option}: no such directory: ")
    assert "Repo id" not in line and "alphanumeric" not in line


HUB_PATHS = [
    (["evaluate", "--task", "ppl", "--model", "org/model"], "--model DIR"),
    (["evaluate", "--task", "ppl", "--model", "{model}", "--tokenizer", "org/tok"], "--tokenizer DIR"),
    (["convert-decoder", "--source", "org/model", "--output", "out"], "--source DIR"),
    (["prepare-data", "--tokenizer", "org/tok", "--output", "out"], "--tokenizer DIR"),
    (["prepare-data", "--source", "hf:org/dataset", "--output", "out"], "--source DIR"),
    (["evaluate", "--task", "longbench", "--model", "{model}", "--data", "hub", "--subtasks", "qasper"], "--data DIR"),
    (["evaluate", "--task", "zeroscrolls", "--model", "{model}", "--data", "hub", "--subtasks", "qasper"], "--data DIR"),
]


@pytest.mark.parametrize("args, flag", HUB_PATHS)
def test_hub_names_fail_fast_with_hf_hub_offline(args, flag, tmp_path, fresh_probe):
    fresh_probe.setenv("HF_HUB_OFFLINE", "1")
    fresh_probe.setattr(hub, "probe_network", lambda: pytest.fail("HF_HUB_OFFLINE set: nothing to probe"))
    model = save_tiny(tmp_path / "m")
    start = time.monotonic()
    result = _cli(*[a.format(model=model) for a in args])
    _one_line(result, "HF_HUB_OFFLINE", flag)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("args, flag", HUB_PATHS[:5])
def test_hub_names_fail_fast_without_network(args, flag, tmp_path, fresh_probe):
    """HF_HUB_OFFLINE unset, no network: one probe, then one line naming HF_HUB_OFFLINE and the option."""
    fresh_probe.delenv("HF_HUB_OFFLINE", raising=False)
    fresh_probe.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []
    fresh_probe.setattr(hub, "probe_network", lambda: calls.append(1) or "no network: huggingface.co:443 cannot be reached (test)")
    model = save_tiny(tmp_path / "m")
    _one_line(_cli(*[a.format(model=model) for a in args]), "no network", "HF_HUB_OFFLINE=1", flag)
    assert calls == [1]
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # the libraries then read the cache, never retry


def test_probe_is_asked_once_and_cached_names_pass(tmp_path, fresh_probe):
    fresh_probe.delenv("HF_HUB_OFFLINE", raising=False)
    fresh_probe.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []
    fresh_probe.setattr(hub, "probe_network", lambda: calls.append(1) or "no network: test")
    fresh_probe.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "models--org--cached" / "snapshots" / "abc").mkdir(parents=True)
    hub.require_local_or_hub("org/cached", "model")  # in the local cache: offline mode serves it
    with pytest.raises(CepeError, match=r"model: no such directory: org/other, .*no network"):
        hub.require_local_or_hub("org/other", "model")
    with pytest.raises(CepeError, match=r"data: THUDM/LongBench is fetched from the hub"):
        hub.require_hub("THUDM/LongBench", "data", repo_type="dataset")
    assert calls == [1]


def test_probe_reaches_a_listening_socket_and_names_a_refused_one(fresh_probe):
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        fresh_probe.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            fresh_probe.delenv(key, raising=False)
        assert hub.probe_network() is None
    finally:
        server.close()
    reason = hub.probe_network()  # nothing listens there now
    assert reason is not None and f"127.0.0.1:{port}" in reason


def test_hub_ids_and_paths_are_told_apart():
    for name in ("org/model", "gpt2", "meta-llama/Llama-2-7b-hf", "org/m.v1"):
        assert hub.looks_like_hub_id(name)
    for name in ("runs/train/model", "./m", "/abs/dir", "~/m", "a/../b", "org/", "m/"):
        assert not hub.looks_like_hub_id(name)


def test_decoder_name_in_from_decoder_goes_through_the_check(fresh_probe):
    from pipeline.model import CepeForCausalLM

    fresh_probe.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CepeError, match=r"decoder: no such directory: org/none, .*HF_HUB_OFFLINE"):
        CepeForCausalLM.from_decoder("org/none")
    with pytest.raises(CepeError, match=r"decoder: no such directory: runs/none/x$"):
        CepeForCausalLM.from_decoder("runs/none/x")


def test_benchmark_tasks_without_data_name_the_option(tmp_path):
    """`--data` unset, or the `evaluate` section's ppl default `embedded`: say what to pass."""
    model = save_tiny(tmp_path / "m")
    for task in ("longbench", "longbench-e", "zeroscrolls"):
        line = _one_line(_cli("evaluate", "--task", task, "--model", str(model)), f"data: --task {task} needs --data DIR",
                         "--data hub", "no --data was given")
        assert "not a directory" not in line
    (tmp_path / "params.yaml").write_text("evaluate:\n  data: embedded\n")
    _one_line(_cli("evaluate", "--task", "longbench", "--model", str(model)), "needs --data DIR", "data is 'embedded'")


@pytest.mark.parametrize("lengths, texts", [
    ("128", ["'128' is 128 tokens in all, fewer than the decoder's 512 (decoder_len 512)", "e.g. '768'"]),
    ("1024:128", ["gives the decoder 128 tokens", "last 256 (eval_window)", "at least 257", "'1024:512'"]),
    ("1000", ["leaves 488 tokens before the decoder's 512", "multiple of 256", "'1000:488'"]),
])
def test_ppl_lengths_are_explained_in_the_users_numbers(tmp_path, lengths, texts):
    model = save_tiny_cepe(tmp_path / "m")
    line = _one_line(_cli("evaluate", "--task", "ppl", "--model", str(model), "--lengths", lengths), *texts)
    assert "257 <= decoder <= total" not in line
    from pipeline.evaluate.ppl import parse_lengths

    for suggestion in line.split("e.g. ")[1].split(")")[0].split(" or "):
        parse_lengths([suggestion.strip("'")], 512, 256, 256)  # every suggested length is valid


# --- 11: attention backends and full disks ---------------------------------------------------


def test_flash_attention_without_flash_attn_is_one_line(tmp_path):
    from pipeline.backends import installed

    if installed("flash_attn"):
        pytest.skip("flash-attn is installed here")
    model = save_tiny(tmp_path / "m")
    _one_line(_cli("evaluate", "--task", "ppl", "--model", str(model), "--attn-implementation", "flash_attention_2"),
              "attn_implementation: flash_attention_2 needs flash-attn", "use sdpa or eager")
    _one_line(_cli("bench", "--attn-implementation", "flash_attention_2"), "attn_implementation: flash_attention_2")
    # training stages check before launching N processes that would each fail
    _one_line(_cli("train", "--attn-implementation", "flash_attention_2", "--num-processes", "2"),
              "attn_implementation: flash_attention_2 needs flash-attn")
    _one_line(_cli("teacher-logits", "--attn-implementation", "flash_attention_2"), "attn_implementation: flash_attention_2")


def _shard_source(tmp_path: Path) -> Path:
    from test_data_prepare import paragraphs, write_jsonl

    return write_jsonl(tmp_path / "emma.jsonl", paragraphs(30))


PREP = ["--decoder-len", "16", "--n-chunks", "2", "--chunk-len", "8", "--num-proc", "1", "--shard-size-mb", "0.004"]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["shard", "manifest"])
def test_prepare_data_on_a_full_disk(tmp_path, monkeypatch, where):
    """ENOSPC while writing shards or the manifest: one line, the earlier output byte-identical,
    no temporary directory left beside it."""
    import pipeline.data.shards as shards
    import pipeline.io as io

    source = _shard_source(tmp_path)
    args = ["prepare-data", "--source", str(source), "--output", str(tmp_path / "out"), *PREP]
    assert _cli(*args).exit_code == 0
    before = _tree(tmp_path / "out")
    if where == "shard":
        real = shards.ShardWriter.add
        count = {"n": 0}

        def add(self, *a, **k):
            count["n"] += 1
            if count["n"] > 5:
                raise OSError("[errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device")
            return real(self, *a, **k)

        monkeypatch.setattr(shards.ShardWriter, "add", add)
    else:
        def full(*a, **k):
            raise ENOSPC

        monkeypatch.setattr(io, "atomic_write_json", full)
        monkeypatch.setattr(shards, "atomic_write_json", full)  # the one manifest writer's (shards.write_manifest)
    _one_line(_cli(*args, "--max-documents", "20"), f"output: no space left on the device of {tmp_path / 'out'}",
              "MiB free", "nothing was written")
    assert _tree(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emma.jsonl", "out"]  # no .out.*.tmp


def test_evaluate_on_a_full_disk(tmp_path, monkeypatch):
    import pipeline.evaluate.runners as runners

    model = save_tiny_cepe(tmp_path / "m", max_positions=1024)
    text = " ".join(f"word{i % 97}" for i in range(200))
    (tmp_path / "docs.jsonl").write_text(json.dumps({"id": "x", "text": text}) + "\n")

    def full(*a, **k):
        raise ENOSPC

    monkeypatch.setattr(runners, "write_jsonl", full)
    out = tmp_path / "reports"
    _one_line(_cli("evaluate", "--task", "ppl", "--model", str(model), "--data", str(tmp_path / "docs.jsonl"),
                   "--lengths", "768:512", "--max-windows", "1", "--output", str(out), "--progress", "false"),
              f"output: no space left on the device of {out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "m"]  # no output, no .reports.*.tmp


def test_other_os_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    import pipeline.io as io

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(io, "atomic_write_json", denied)
    with pytest.raises(PermissionError):
        with io.disk_full_as_error(tmp_path / "x"):
            io.atomic_write_json(tmp_path / "x" / "a.json", {})


# --- 13: an empty split is said ---------------------------------------------------------------


def test_prepare_data_warns_on_an_empty_validation_split(tmp_path):
    source = _shard_source(tmp_path)
    result = CliRunner().invoke(cli, ["prepare-data", "--source", str(source), "--output", str(tmp_path / "out"), *PREP,
                                      "-S", "splits={train: 0.98, validation: 0.01, test: 0.01}", "--max-documents", "5"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: split 'validation'")]
    assert len(warned) == 1 and "val_loss: null" in warned[0] and "splits.validation (now 0.01)" in warned[0]
    assert summary["rows"]["validation"] == 0 and len(summary["warnings"]) == 2  # validation and test
    # a split asked to be empty is not warned about
    result = CliRunner().invoke(cli, ["prepare-data", "--source", str(source), "--output", str(tmp_path / "out2"), *PREP,
                                      "-S", "splits={train: 1.0}"])
    assert result.exit_code == 0 and "warning" not in result.stderr


# --- 15: no library noise --------------------------------------------------------------------


def test_evaluate_output_has_no_transformers_bars(tmp_path):
    """Run as a user would (a subprocess, progress on): our bars stay, transformers' are gone."""
    model = save_tiny_cepe(tmp_path / "m", max_positions=1024)
    text = " ".join(f"word{i % 97}" for i in range(200))
    (tmp_path / "docs.jsonl").write_text(json.dumps({"id": "x", "text": text}) + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "cepe_cli.main", "evaluate", "--task", "ppl", "--model", str(model),
                           "--data", str(tmp_path / "docs.jsonl"), "--lengths", "768:512", "--max-windows", "1",
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ppl 768 cepe" in proc.stderr  # the project's own bar
    for noise in ("Loading weights", "Writing model shards", "LOAD REPORT"):
        assert noise not in proc.stderr


def _report_lines(caplog) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("transformers")]
    caplog.clear()
    return lines


def test_load_reports_dropped_when_expected_and_one_line_when_weights_are_missing(tmp_path, caplog):
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from pipeline.console import quiet_libraries
    from pipeline.model import CepeEncoderForMaskedLM, build_encoder_config, load_encoder

    quiet_libraries()
    caplog.set_level(logging.WARNING)
    mlm = CepeEncoderForMaskedLM(build_encoder_config(130, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=4))
    mlm.save_pretrained(tmp_path / "mlm")
    caplog.clear()
    load_encoder(tmp_path / "mlm")  # mlm_head.* are UNEXPECTED for the bare encoder: expected, not said
    lines = _report_lines(caplog)
    assert not any("LOAD REPORT" in l or "UNEXPECTED" in l or "mlm_head" in l for l in lines), lines

    decoder = save_tiny(tmp_path / "dec")
    weights = load_file(decoder / "model.safetensors")
    dropped = sorted(k for k in weights if ".layers.1.mlp." in k)
    save_file({k: v for k, v in weights.items() if k not in dropped}, str(decoder / "model.safetensors"), metadata={"format": "pt"})
    caplog.clear()
    AutoModelForCausalLM.from_pretrained(decoder, dtype=torch.float32)
    lines = _report_lines(caplog)
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert lines[0].startswith("warning: LlamaForCausalLM from ") and "not in the checkpoint, initialised at random" in lines[0]
    assert "layers.1.mlp" in lines[0] and "LOAD REPORT" not in lines[0]


def test_report_parser_on_transformers_text():
    from pipeline.console import parse_load_report, summarize_load_report

    text = ("\x1b[1mCepeEncoder LOAD REPORT\x1b[0m from: runs/encoder/model\nKey | Status | \n----+--------+-\n"
            "mlm_head.weight | \x1b[38;5;208mUNEXPECTED\x1b[0m | \nlayers.{0, 1}.mlp.up_proj.weight | MISSING | \n\nNotes:\n"
            "- UNEXPECTED:\tcan be ignored\n- MISSING:\tthose params were newly initialized")
    cls, src, rows = parse_load_report(text)
    assert (cls, src) == ("CepeEncoder", "runs/encoder/model")
    assert rows == {"UNEXPECTED": ["mlm_head.weight"], "MISSING": ["layers.{0, 1}.mlp.up_proj.weight"]}
    assert summarize_load_report(cls, src, {"UNEXPECTED": ["mlm_head.weight"]}) is None
    assert "differ from the checkpoint" in summarize_load_report(cls, src, {})  # unreadable table: still said
    assert "1 weight group(s) not in the checkpoint" in summarize_load_report(cls, src, rows)
