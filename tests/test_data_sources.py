"""Bad input: each mistake is one line naming the file (and line) and what was expected, or a
counted skip reported in the manifest; nothing half-written is left behind."""

from __future__ import annotations

import gzip
import json
import multiprocessing
from pathlib import Path

import pytest

from pipeline.data import build as data_build
from pipeline.errors import CepeError
from pipeline.stages.prepare_data import PrepareConfig, run

SMALL = dict(decoder_len=8, n_chunks=2, chunk_len=4, num_proc=1, layout="concat", splits={"train": 1.0})
TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. " * 6).strip()


def good_lines(n: int = 5) -> list[str]:
    return [json.dumps({"id": i, "text": f"{i}: {TEXT}"}) for i in range(n)]


def build(tmp_path: Path, sources: list[str], name: str = "out", **kw) -> tuple[dict, Path]:
    out = tmp_path / name
    summary = run(PrepareConfig(**{**SMALL, "source": sources, "output": str(out), **kw}))
    return summary, out


def fails(tmp_path: Path, sources: list[str], *needles: str, **kw) -> str:
    with pytest.raises(CepeError) as err:
        build(tmp_path, sources, name="failed", **kw)
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    # Nothing half-written: no output and no temporary directory beside it.
    assert not (tmp_path / "failed").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".failed")]
    return msg


def test_missing_path_and_empty_glob(tmp_path):
    fails(tmp_path, [str(tmp_path / "missing.jsonl")], "missing.jsonl", "no such file or directory")
    fails(tmp_path, [str(tmp_path / "none-*.jsonl")], "none-*.jsonl", "matches no file")
    (tmp_path / "table.csv").write_text("a,b\n")
    fails(tmp_path, [str(tmp_path / "table.csv")], "table.csv", "unsupported file type", ".jsonl")


def test_file_that_is_not_what_its_suffix_says(tmp_path):
    (tmp_path / "plain.jsonl.gz").write_text("\n".join(good_lines()))
    fails(tmp_path, [str(tmp_path / "plain.jsonl.gz")], "plain.jsonl.gz", "gzip")
    (tmp_path / "plain.jsonl.zst").write_text("\n".join(good_lines()))
    fails(tmp_path, [str(tmp_path / "plain.jsonl.zst")], "plain.jsonl.zst", "zstd")
    (tmp_path / "notparquet.parquet").write_text("\n".join(good_lines()))
    fails(tmp_path, [str(tmp_path / "notparquet.parquet")], "notparquet.parquet", "not a Parquet file")
    (tmp_path / "binary.jsonl").write_bytes(gzip.compress(b"\n".join(x.encode() for x in good_lines())))
    fails(tmp_path, [str(tmp_path / "binary.jsonl")], "binary.jsonl", "no valid JSON line", "line 1")
    truncated = gzip.compress("\n".join(good_lines(200)).encode())[:300]
    (tmp_path / "cut.jsonl.gz").write_bytes(truncated)
    fails(tmp_path, [str(tmp_path / "cut.jsonl.gz")], "cut.jsonl.gz", "gzip")


def test_malformed_lines_are_counted_or_fatal_with_strict(tmp_path):
    lines = good_lines(3) + ['{"id": 9, "text": "unterminated'] + good_lines(5)[3:] + ["[1, 2]"]
    path = tmp_path / "some-bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    summary, out = build(tmp_path, [str(path)])
    m = json.loads((out / "manifest.json").read_text())
    assert m["skipped_lines"] == {"malformed_json": 2}
    assert [(e["file"], e["line"]) for e in m["skipped_examples"]] == [(str(path), 4), (str(path), 7)]
    assert m["documents"]["kept"] == 5
    fails(tmp_path, [str(path)], "some-bad.jsonl line 4", "malformed JSON", "--strict", strict=True)


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "latin1.jsonl"
    bad = '{"id": "x", "text": "caf\u00e9"}'.encode("latin-1")
    path.write_bytes(b"\n".join([good_lines()[0].encode(), bad, good_lines()[1].encode()]) + b"\n")
    summary, out = build(tmp_path, [str(path)])
    m = json.loads((out / "manifest.json").read_text())
    assert m["skipped_lines"] == {"bad_utf8": 1} and m["skipped_examples"][0]["line"] == 2
    fails(tmp_path, [str(path)], "latin1.jsonl line 2", "not UTF-8", strict=True)
    (tmp_path / "doc.txt").write_bytes(b"Caf\xe9 au lait " * 20)
    fails(tmp_path, [str(tmp_path / "doc.txt")], "doc.txt", "not UTF-8", "offset 3")


def test_missing_text_field(tmp_path):
    path = tmp_path / "content.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "content": TEXT}) for i in range(3)) + "\n")
    fails(tmp_path, [str(path)], "content.jsonl line 1", "no field 'text'", "content, id", "text_field")
    summary, out = build(tmp_path, [f"{path};text_field=content"])
    assert summary["documents"]["kept"] == 1  # the same text three times: two duplicates
    later = tmp_path / "later.jsonl"
    later.write_text("\n".join(good_lines(2) + [json.dumps({"id": 5, "body": "x"}), json.dumps({"text": None})]) + "\n")
    summary, out = build(tmp_path, [str(later)])
    assert summary["skipped_lines"] == {"missing_text_field": 1, "text_not_string": 1}


def test_source_with_no_document_after_filtering(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(good_lines()) + "\n")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n".join(json.dumps({"text": t}) for t in ["", "  ", "\n\n"]) + "\n")
    fails(tmp_path, [str(good), str(blank)], "blank.jsonl", "no document left after filtering", "empty 3")
    fails(tmp_path, [str(good)], "good.jsonl", "too_short 5", min_doc_tokens=10_000)
    fails(tmp_path, [str(good)], "no prevdoc window could be built", "needs 2560 tokens inside one document",
          layout="prevdoc", decoder_len=512, n_chunks=8, chunk_len=256)


def test_spec_mistakes(tmp_path):
    fails(tmp_path, ["embedded:dickens"], "embedded:dickens", "unknown embedded corpus", "austen")
    fails(tmp_path, ["embedded;colour=red"], "unknown option 'colour'")
    fails(tmp_path, ["embedded;weight=-1"], "weight must be > 0")
    fails(tmp_path, ["hf:"], "expected hf:NAME")
    fails(tmp_path, ["embedded"], "domains: no source has domain code", domains=["code"])


def test_offline_hub_names_fail_in_one_line(tmp_path):
    fails(tmp_path, ["hf:someone/not-a-real-dataset-xyz"], "hf:someone/not-a-real-dataset-xyz", "the hub cannot be reached",
          "HF_HUB_OFFLINE", "--source DIR")
    with pytest.raises(CepeError, match="tokenizer: no such directory: someone/no-such-tokenizer, .*HF_HUB_OFFLINE"):
        build(tmp_path, ["embedded:abs-guide"], tokenizer="someone/no-such-tokenizer")


def test_failure_keeps_an_existing_output(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(good_lines()) + "\n")
    summary, out = build(tmp_path, [str(good)])
    before = (out / "manifest.json").read_bytes()
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_text("not gzip")
    with pytest.raises(CepeError):
        build(tmp_path, [str(good), str(bad)])
    assert (out / "manifest.json").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_ctrl_c_leaves_nothing_behind(tmp_path, monkeypatch, num_proc):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(good_lines(40)) + "\n")
    calls = {"n": 0}
    real_push = data_build._SplitAssembler.push

    def interrupted(self, doc, tokens):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real_push(self, doc, tokens)

    monkeypatch.setattr(data_build._SplitAssembler, "push", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, [str(good)], num_proc=num_proc, shard_size_mb=0.0005)
    assert calls["n"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.jsonl"]
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("signame", ["SIGTERM"])
def test_a_killed_run_leaves_no_output_and_no_worker(tmp_path, signame):
    """A real signal to the real CLI while its workers tokenize: the temporary directory goes,
    the workers go, nothing appears at the output path."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    code = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from cepe_cli.main import cli; cli()")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, "prepare-data", "--source", "embedded", "--num-proc", "2",
                             "--output", str(tmp_path / "out")], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    workers: list = []
    while time.time() < deadline and proc.poll() is None:
        tmp = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
        workers = psutil.Process(proc.pid).children()
        if tmp and len(workers) == 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "finished before it could be interrupted"
    time.sleep(0.5)
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == [], err.decode()[-500:]
    psutil.wait_procs(workers, timeout=10)
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
