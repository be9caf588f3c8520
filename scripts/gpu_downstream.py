#!/usr/bin/env python
"""The applications' evidence (evaluation.md 1.2-1.4): retrieval-augmented LM on held-out documents,
and open-domain QA / ICL run on the test fixtures, written to docs/results/downstream.md with the
commands that made them.

What it runs, each through the `cepe` commands' own code, reading the profile's sections
(`--profile gpu`: params/gpu.yaml; `--profile cpu` for a CPU smoke run against the cpu
profile's outputs):

1. `cepe index --section index`: the corpus cut into 256-token passages with the decoder's
   tokenizer, BM25 (bm25s);
2. `cepe evaluate --section evaluate_ralm`: windows of the held-out documents (`--data`), the
   query the window's first tokens, k retrieved passages (never from the window's own document)
   in the encoder vs in the decoder window vs the decoder alone;
3. `cepe evaluate --task qa` and `--task icl` on tests/fixtures/qa and tests/fixtures/icl (no real
   QA or ICL data on this machine: these rows show the tasks running, not the model's ability).

Run from the repository root after the profile's `dvc repro` (runs/train/model, models/decoder):

    PYTHONPATH=. python scripts/gpu_downstream.py --profile gpu --corpus data/corpora \\
        --data data/corpora/debian-handbook.jsonl.gz

`--corpus`: a jsonl(.gz) file or folder of documents to index (default: the profile's
`index.corpus`); `--data`: the documents evaluated (default: the profile's `evaluate_ralm.data`);
`--max-windows`, `--passages` (k, comma-separated) override the profile; `--fixture-limit` (qa/icl
examples per dataset, default 6); `--out` (run folders,
default runs/downstream); `--results` (default docs/results/downstream.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _cepe(args: list[str], commands: list[str]) -> None:
    """`cepe ARGS` in-process, stopping on failure."""
    from click.testing import CliRunner

    from cepe_cli.main import cli

    line = "cepe " + " ".join(shlex.quote(a) for a in args)
    commands.append(line)
    print("+ " + line, flush=True)
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    if result.exit_code != 0:
        raise SystemExit(f"{line} failed ({result.exit_code}): {result.output.strip().splitlines()[-1:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="gpu", help="params/<profile>.yaml gives every setting not overridden")
    ap.add_argument("--corpus", default="", help="documents to index (default: the profile's index.corpus)")
    ap.add_argument("--data", default="", help="held-out documents for ralm (default: the profile's evaluate_ralm.data)")
    ap.add_argument("--model", default="", help="default: the profile's evaluate_ralm.model")
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--passages", default="", help="k values, comma-separated (default: the profile's ralm_passages)")
    ap.add_argument("--fixture-limit", type=int, default=6, help="qa/icl: fixture examples per dataset/set")
    ap.add_argument("--out", default="runs/downstream")
    ap.add_argument("--results", default="docs/results/downstream.md")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    params = str(ROOT / "params" / f"{args.profile}.yaml")
    out = Path(args.out)
    index_dir = out / "index"
    commands: list[str] = []
    started = time.time()

    index_args = ["index", "--params", params, "--section", "index", "--output", str(index_dir)]
    if args.corpus:
        index_args += ["--corpus", args.corpus]
    _cepe(index_args, commands)

    model = ["--model", args.model] if args.model else []
    ralm = ["evaluate", "--params", params, "--section", "evaluate_ralm", "--index", str(index_dir),
            "--output", str(out / "ralm"), "--progress", "false", *model]
    if args.data:
        ralm += ["--data", args.data]
    if args.max_windows:
        ralm += ["--max-windows", str(args.max_windows)]
    for k in [p for p in args.passages.split(",") if p.strip()]:
        ralm += ["--ralm-passages", k.strip()]
    _cepe(ralm, commands)

    fixtures = ROOT / "tests" / "fixtures"
    qa = ["evaluate", "--params", params, "--section", "evaluate_qa", "--data", str(fixtures / "qa"),
          "--passages-encoder", "1", "--passages-encoder", "3", "--passages-decoder", "1", "--replug-passages", "2",
          "--limit", str(args.fixture_limit), "--output", str(out / "qa"), "--progress", "false", *model]
    _cepe(qa, commands)
    icl = ["evaluate", "--params", params, "--section", "evaluate_icl", "--data", str(fixtures / "icl"),
           "--demos", "1", "--icl-encoder-demos", "3", "--icl-decoder-demos", "1", "--icl-decoder-demos", "4",
           "--limit", str(args.fixture_limit), "--output", str(out / "icl"), "--progress", "false", *model]
    _cepe(icl, commands)
    write_results(Path(args.results), out, commands, time.time() - started, args)


def write_results(path: Path, out: Path, commands: list[str], seconds: float, args: Any) -> None:
    run = json.loads((out / "ralm" / "run.json").read_text())
    metrics = json.loads((out / "ralm" / "metrics.json").read_text())
    manifest = json.loads((out / "index" / "manifest.json").read_text())
    info = run.get("model_info", {})
    device = (run.get("host") or {}).get("cuda") or "CPU"
    ralm_cfg = run.get("ralm", {})
    docs = run["data"]["documents"]
    lines = [
        "# Downstream applications: retrieval-augmented LM, open-domain QA, ICL", "",
        f"Model: `{run['model']}` ({'cepe' if info.get('cepe') else 'plain'}, {info.get('n_params', 0) / 1e6:.1f}M parameters, "
        f"{info.get('dtype')}), device: {device}, total wall time {seconds / 60:.1f} min. Produced by:", "",
        "```", f"PYTHONPATH=. python scripts/gpu_downstream.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}", "```", "",
        "which ran:", "", "```", *commands, "```", "",
        "## Retrieval-augmented LM (evaluation.md 1.2)", "",
        f"Index: {manifest['n_passages']} passages of {manifest['passage_tokens']} tokens from {manifest['corpus']['n_documents']} "
        f"documents ({', '.join(Path(f).name for f in manifest['corpus']['files'])}; corpus sha256 {manifest['corpus']['sha256'][:16]}), "
        f"{manifest['retriever']} ({manifest.get('bm25', {}).get('package', '')}).",
        f"Evaluated documents: {', '.join(Path(f).name for f in docs['files'])} (sha256 {docs['sha256'][:16]}); "
        f"{ralm_cfg.get('n_windows')} windows of {ralm_cfg.get('decoder_len')} tokens, the first {ralm_cfg.get('query_tokens')} "
        f"the BM25 query, the last {ralm_cfg.get('eval_window')} scored. Passages of the window's own document are never "
        "retrieved. Cells: PPL (windows); cepe: k passages in the encoder, one per chunk; in-decoder: the same k passages "
        "before the window in the decoder ('–' where they exceed its positions); k = 0 is the decoder alone.", "",
        (out / "ralm" / "table.md").read_text().rstrip(), "",
        f"Decoder alone: {metrics.get('decoder_alone_ppl')}.", "",
        "## Open-domain QA and ICL: on the test fixtures only", "",
        "No NQ-open / TriviaQA / PopQA or PCW data is available offline here: these tables show both tasks running end to "
        "end on the CEPE model with the repository's small fixtures (tests/fixtures/qa: 6 questions in CEPE's and FlashRAG's "
        "layouts; tests/fixtures/icl: 1-5 test items per set). Their numbers say nothing about the model.", "",
        "### QA (EM / F1 / substring EM, %)", "", (out / "qa" / "table.md").read_text().rstrip(), "",
        "### ICL (accuracy, %; calibrated = the option's BOS-only score subtracted)", "",
        (out / "icl" / "table.md").read_text().rstrip(), "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
