#!/usr/bin/env python
"""Evaluation evidence on one GPU: long-context perplexity and RULER for a trained CEPE model and
its plain decoder, written to docs/results/evaluation.md with the commands that made them.

What it runs (all through `cepe evaluate`'s own code, `pipeline.stages.evaluate.run`):

1. `ppl` at total lengths 4K/8K/32K with the paper's encoder/decoder splits (2K+2K, 4K+4K,
   28K+4K), on the same windows for three readers: CEPE (encoder + decoder), the plain decoder on
   its own decoder window (`decoder-only`), and the plain decoder with the whole window
   (`full-context`, where it fits the decoder's positions);
2. `ruler` (niah single/multikey/multivalue/multiquery + variable tracking) at a few lengths for
   CEPE (`cepe-concat-truncate-left`: the decoder keeps the last `--decoder-window` tokens, the rest
   goes to the encoder), for the plain decoder with the whole prompt in its window (middle-cut
   only beyond its positions) and for the plain decoder limited to the same decoder window.

The plain decoder is the CEPE model's own decoder run without encoder input (identical to the
decoder it wraps), so no second model directory is needed.

Run from the repository root:

    PYTHONPATH=. python scripts/gpu_evaluate.py --model runs/train/final

Options: `--data` (ppl documents; default the embedded corpus plus ../shared/data/*.jsonl.gz when
present), `--lengths`, `--ruler-lengths`, `--max-windows`, `--num-samples`, `--decoder-window`,
`--out` (run folders, default runs/eval_gpu), `--results` (default docs/results/evaluation.md).
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

NOTES = """## How these numbers relate to the official protocols

- **ppl** (evaluation.md 1.1): windows start at 0, 256, 512, ... of each document (stride 256);
  documents must have at least the longest requested total (32,768 tokens for 4K/8K/32K, as the
  paper); at most `--max-windows` per length, a seeded random choice. Windows are slices of running
  text with no BOS. bf16 on CUDA. The decoder-only and full-context columns use the CEPE model's
  own decoder without encoder input, which is exactly the decoder it wraps.
- **RULER** (evaluation.md 2.4): RULER's templates, needles, key/value types, insertion depths and
  binary search for the haystack size, run with the evaluated model's tokenizer. Different from
  RULER: the essay haystack is the embedded public-domain corpus (Paul Graham's essays are a
  download), sentences are split by a regular expression (NLTK's punkt model is a download), each
  (seed, task, length) has its own RNG, the essay step is length/16 words below 4K tokens, and cwe,
  fwe and the QA tasks are not implemented. No chat template (RULER's "base" template).
- **LongBench** (evaluation.md 2.1): prompts and generation lengths are the vendored upstream
  files (checksummed); scoring reproduces `LongBench/eval.py` and `metrics.py`, checked by a golden
  test against the official script's own `result.json` on frozen predictions. Code similarity is
  `fuzzywuzzy.fuzz.ratio` as computed **without** `python-Levenshtein` (difflib's SequenceMatcher,
  Python rounding): LongBench's requirements.txt does not install python-Levenshtein, and with it
  installed fuzzywuzzy silently switches matcher and scores change; we compute the difflib version
  ourselves so an installed python-Levenshtein cannot change our numbers. ROUGE is the `rouge`
  1.0.1 package (not `rouge-score`), exceptions scored 0 as upstream.
- **ZeroSCROLLS** (evaluation.md 2.2, 1.5): validation split, the dataset's own prompts;
  plain decoders keep the document prefix and the query (`process_model_input`, without a BOS in
  the middle of the prompt); summaries are scored by the geometric mean of ROUGE-1/2/L from
  `rouge_score` without stemming (ZeroSCROLLS's `use_stemmer` was not verified), QA by token F1,
  QuALITY by the first A-D letter; CEPE's own stemmed ROUGE-L is reported beside them.
"""

RULER_TASKS = ["niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multivalue", "niah_multiquery", "vt"]


def _default_data(out: Path) -> str:
    """The embedded corpus, plus the shared long-text corpora when the checkout has them, as one
    folder of links (ppl reads every *.jsonl(.gz) below a folder)."""
    folder = out / "ppl_data"
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((ROOT / "pipeline" / "resources" / "corpus").glob("*.jsonl.gz"))
    for shared in (ROOT / "shared" / "data", ROOT.parent / "shared" / "data"):
        if shared.is_dir():
            sources += [p for p in sorted(shared.glob("*.jsonl.gz")) if p.name not in {s.name for s in sources}]
            break
    for src in sources:
        link = folder / src.name
        if not link.exists():
            link.symlink_to(src.resolve())
    return str(folder)


def _evaluate(args: list[str]) -> dict[str, Any]:
    """`cepe evaluate ARGS` in-process; returns metrics.json."""
    from click.testing import CliRunner

    from cepe_cli.main import cli

    print("+ cepe evaluate " + " ".join(shlex.quote(a) for a in args), flush=True)
    result = CliRunner().invoke(cli, ["evaluate", *args], catch_exceptions=False)
    if result.exit_code != 0:
        raise SystemExit(f"cepe evaluate failed ({result.exit_code}): {result.output.strip().splitlines()[-1:]}")
    out = Path(args[args.index("--output") + 1])
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="CEPE model directory (save_pretrained, with its tokenizer)")
    ap.add_argument("--tokenizer", default="", help="tokenizer if the model directory has none (e.g. embedded)")
    ap.add_argument("--data", default="", help="ppl documents (default: embedded corpus + shared corpora)")
    ap.add_argument("--lengths", default="4096:2048,8192:4096,32768:4096")
    ap.add_argument("--ruler-lengths", default="2048,4096,8192,16384")
    ap.add_argument("--ruler-tasks", default=",".join(RULER_TASKS))
    ap.add_argument("--max-windows", type=int, default=200)
    ap.add_argument("--num-samples", type=int, default=20)
    ap.add_argument("--decoder-window", type=int, default=2048, help="CEPE's decoder window for RULER")
    ap.add_argument("--batch-size", type=int, default=8, help="generation/ppl batch (left-padded; greedy)")
    ap.add_argument("--out", default="runs/eval_gpu")
    ap.add_argument("--results", default="docs/results/evaluation.md")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = args.data or _default_data(out)
    common = ["--model", args.model, "--seed", "42", "--batch-size", str(args.batch_size)]
    if args.tokenizer:
        common += ["--tokenizer", args.tokenizer]
    started = time.time()
    commands: list[str] = []

    def run(extra: list[str]) -> dict[str, Any]:
        full = common + extra
        commands.append("cepe evaluate " + " ".join(shlex.quote(a) for a in full))
        return _evaluate(full)

    ppl = run(["--task", "ppl", "--data", data, "--lengths", args.lengths, "--max-windows", str(args.max_windows),
               "--output", str(out / "ppl")])
    ruler_lengths = [x for x in args.ruler_lengths.split(",") if x]
    ruler_common = ["--task", "ruler", "--subtasks", args.ruler_tasks, "--num-samples", str(args.num_samples)]
    for n in ruler_lengths:
        ruler_common += ["--ruler-lengths", n]
    ruler = {
        "CEPE (decoder window + encoder)": run(ruler_common + ["--policy", "cepe", "--decoder-max-len", str(args.decoder_window),
                                                               "--max-encoder-chunks", "1000", "--output", str(out / "ruler_cepe")]),
        "decoder, whole prompt in its window": run(ruler_common + ["--policy", "vanilla", "--output", str(out / "ruler_decoder_full")]),
        "decoder, own window only": run(ruler_common + ["--policy", "vanilla", "--max-length", str(args.decoder_window),
                                                        "--output", str(out / "ruler_decoder_window")]),
    }
    write_results(Path(args.results), ppl, ruler, commands, out, time.time() - started, args)
    print(f"wrote {args.results}")


def write_results(path: Path, ppl: dict[str, Any], ruler: dict[str, dict[str, Any]], commands: list[str], out: Path,
                  seconds: float, args: argparse.Namespace) -> None:
    import torch

    run_info = json.loads((out / "ppl" / "run.json").read_text())
    model_info = run_info.get("model_info", {})
    lines = [
        "# Evaluation results",
        "",
        f"Model: `{args.model}` ({model_info.get('model_type')}, decoder {model_info.get('decoder_type')}, "
        f"{model_info.get('n_params', 0) / 1e6:.1f}M parameters, {model_info.get('dtype')}), "
        f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}, "
        f"total wall time {seconds / 60:.1f} min. Produced by one command:",
        "",
        "```",
        "PYTHONPATH=. python scripts/gpu_evaluate.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "```",
        "",
        "## Long-context perplexity (last 256 tokens)",
        "",
        "Same windows for every column (stride 256, seeded choice of at most "
        f"{args.max_windows} per length). CEPE: encoder + decoder; decoder-only: the plain decoder on its "
        "own decoder window; full-context: the plain decoder with the whole window ('–' where it exceeds "
        "the decoder's positions). Cells: PPL (windows).",
        "",
        "| total (E+D) | CEPE | decoder-only | full-context |",
        "|---|---|---|---|",
    ]
    for label, row in ppl["ppl"].items():
        cells = []
        for v in ("cepe", "decoder-only", "full-context"):
            r = row.get(v) or {}
            cells.append(f"{r['ppl']:.3f} ({r['n_windows']})" if r.get("ppl") is not None else "–")
        first = next(iter(row.values()))
        lines.append(f"| {label} ({first['encoder_tokens']}+{first['decoder_tokens']}) | " + " | ".join(cells) + " |")
    docs = run_info["data"]["documents"]
    lines += ["", f"Documents: {docs['n_long_documents']} of {docs['n_documents']} with at least "
              f"{docs['min_doc_tokens']} tokens, from {len(docs['files'])} files (sha256 {docs['sha256'][:16]}).", ""]
    lines += ["## RULER (string_match_all, %)", "",
              f"{args.num_samples} examples per task and length, seed 42, generated with the model's tokenizer; "
              f"CEPE's decoder window {args.decoder_window} tokens. The essay haystack is the embedded "
              "public-domain corpus (Paul Graham's essays are not available offline).", ""]
    for name, metrics in ruler.items():
        res = metrics["ruler"]
        tasks = [t for t in next(iter(res.values())) if t != "average"]
        lines += [f"### {name}", "", "| length | " + " | ".join(tasks) + " | average |", "|" + "---|" * (len(tasks) + 2)]
        for length, row in res.items():
            lines.append(f"| {length} | " + " | ".join(f"{row[t]:.1f}" for t in tasks) + f" | {row['average']:.1f} |")
        lines.append("")
    lines += [NOTES]
    lines += ["## Commands", "", "Each table comes from these runs (outputs, per-example files and run.json under "
              f"`{out}`):", "", "```"] + commands + ["```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    main()
