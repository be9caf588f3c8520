"""LongBench v1 (THUDM/LongBench, folder `LongBench/`): data, prompts, generation and scoring.

What is reproduced from the official `pred.py` / `eval.py` (evaluation.md 2.1):
- prompts: `config/dataset2prompt.json` byte for byte (vendored in `pipeline/resources/longbench`
  with its MIT licence and checked against the checksums below), filled with
  `prompt_format.format(**example)`;
- generation lengths: `config/dataset2maxlen.json`; greedy; samsum stops on a newline;
- plain decoders: middle truncation at `max_length` tokens measured with BOS, then the chat
  wrapper, except for trec, triviaqa, samsum, lsht, lcc and repobench-p;
- CEPE models: the `cepe-concat-truncate-left` policy (see adapters.py);
- per-example output `pred/<task>.jsonl` with exactly `pred, answers, all_classes, length`, so the
  official `eval.py` runs on our files unchanged;
- scoring: first-line cut for the four few-shot tasks, max over answers, `round(100 * mean, 2)`;
  LongBench-E buckets `<4000`, `<8000`, `8k+` by the `length` field with `np.mean`.

Data: a local directory in the official `data/*.jsonl` layout (what `data.zip` unpacks to), or
`hub`, which fetches that same `data.zip` from the THUDM/LongBench dataset repository. The hub's
loading script does not work with `datasets>=4`, so it is not used.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import CepeError
from pipeline.evaluate.longbench_metrics import DATASET2METRIC, score_example
from pipeline.io import sha256_file

RESOURCES = Path(__file__).resolve().parent.parent / "resources" / "longbench"

# sha256 of the vendored upstream files (THUDM/LongBench LongBench/config/, MIT).
RESOURCE_SHA256 = {
    "dataset2prompt.json": "56d22ad4f382169c2b8a11ff4c982a4a1bea096c8152b0f0b85b64686b157c30",
    "dataset2maxlen.json": "72966b3c0933e214591637fb085798c5e687ebff4ddaab5d99bbc31120532022",
    "model2maxlen.json": "2405c0b85b215a504fb6a8f69c4982db7e2be2d53d177c69891cdcf0fe78f3ce",
}

# pred.py's task lists, in its order.
TASKS = (
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique",
    "dureader", "gov_report", "qmsum", "multi_news", "vcsum", "trec", "triviaqa", "samsum", "lsht",
    "passage_count", "passage_retrieval_en", "passage_retrieval_zh", "lcc", "repobench-p",
)
TASKS_E = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
    "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)
# pred.py: "chat models are better off without build prompts on these tasks"
NO_CHAT_TASKS = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")
PRED_FIELDS = ("pred", "answers", "all_classes", "length")
HUB_REPO = "THUDM/LongBench"
HUB_ARCHIVE = "data.zip"


def load_config_file(name: str) -> dict[str, Any]:
    """A vendored upstream config file, refused if it is not byte-identical to upstream."""
    path = RESOURCES / name
    if sha256_file(path) != RESOURCE_SHA256[name]:
        raise CepeError(f"{path}: differs from LongBench's own {name} (sha256 mismatch); restore the vendored copy")
    return json.loads(path.read_text(encoding="utf-8"))


def select_tasks(names: list[str], e: bool) -> list[str]:
    known = TASKS_E if e else TASKS
    if not names:
        return list(known)
    for name in names:
        if name not in known:
            suite = "LongBench-E" if e else "LongBench"
            raise CepeError(f"subtasks: unknown {suite} task {name!r} (known: {', '.join(known)})")
    return list(names)


# --- reading jsonl with errors that name file and line ---------------------------------------


def read_jsonl_lines(lines: Iterator[str], where: str) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CepeError(f"{where} line {lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise CepeError(f"{where} line {lineno}: expected a JSON object")
        rows.append(row)
    return rows


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return read_jsonl_lines(iter(fh), str(path))


# --- data ------------------------------------------------------------------------------------


def missing_data_message(task: str, given: str, what: str) -> str:
    """`--task longbench|zeroscrolls` reads its benchmark's files; `data` then must name them
    (`embedded`, the ppl corpus and the `evaluate` section's default, is no benchmark)."""
    typed = f"data is {given!r} (the ppl corpus)" if given else "no --data was given"
    return f"data: --task {task} needs --data {what}, or --data hub to download it; {typed}"


class LongBenchData:
    """Examples per task from a local directory or the hub's `data.zip`, with checksums."""

    def __init__(self, source: str, e: bool = False):
        self.e = e
        self.source = source
        self.archive: Path | None = None
        if source in ("", "embedded"):
            raise CepeError(missing_data_message("longbench-e" if e else "longbench", source,
                                                 "DIR (LongBench's data/<task>.jsonl files)"))
        if source == "hub":
            self.archive = _download_archive()
            self.root = None
        else:
            root = Path(source)
            if not root.is_dir():
                raise CepeError(f"data: {source!r} is not a directory; pass --data DIR (LongBench's data/*.jsonl layout) or --data hub")
            self.root = root / "data" if (root / "data").is_dir() else root

    def file_name(self, task: str) -> str:
        return f"{task}_e.jsonl" if self.e else f"{task}.jsonl"

    def load(self, task: str) -> tuple[list[dict[str, Any]], str]:
        """(examples, sha256 of the task file)."""
        name = self.file_name(task)
        if self.archive is not None:
            with zipfile.ZipFile(self.archive) as zf:
                member = f"data/{name}"
                if member not in zf.namelist():
                    raise CepeError(f"{self.archive}: no {member} in the archive")
                raw = zf.read(member)
            import hashlib

            rows = read_jsonl_lines(iter(raw.decode("utf-8").splitlines()), f"{self.archive}:{member}")
            digest = hashlib.sha256(raw).hexdigest()
        else:
            assert self.root is not None
            path = self.root / name
            if not path.is_file():
                raise CepeError(f"data: {self.root} has no {name} (expected LongBench's data/*.jsonl layout)")
            rows = read_jsonl(path)
            digest = sha256_file(path)
        for i, row in enumerate(rows, 1):
            missing = [k for k in ("input", "context", "answers", "length", "all_classes") if k not in row]
            if missing:
                raise CepeError(f"{self.file_name(task)} example {i}: missing field(s) {', '.join(missing)}")
        return rows, digest


def _download_archive() -> Path:
    """LongBench's `data.zip` from the hub dataset repository (cached by huggingface_hub)."""
    from pipeline.hub import require_hub

    require_hub(HUB_REPO, "data", repo_type="dataset")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(HUB_REPO, HUB_ARCHIVE, repo_type="dataset"))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CepeError(
            f"data: LongBench could not be fetched from the hub ({first}); pass --data DIR with the official data/*.jsonl files"
        ) from None


# --- prompts and requests --------------------------------------------------------------------


def build_requests(task: str, examples: list[dict[str, Any]], prompts: dict[str, str], maxlen: dict[str, int],
                   max_new_tokens: int | None = None) -> list[Any]:
    from pipeline.evaluate.adapters import Request

    template = prompts[task]
    gen = max_new_tokens or maxlen[task]
    return [
        Request(
            prompt=template.format(**ex),
            max_new_tokens=gen,
            chat=task not in NO_CHAT_TASKS,
            stop_on_newline=(task == "samsum"),
        )
        for ex in examples
    ]


def prediction_rows(examples: list[dict[str, Any]], preds: list[str]) -> list[dict[str, Any]]:
    """The official per-example record, field for field (pred.py)."""
    return [
        {"pred": p, "answers": ex["answers"], "all_classes": ex["all_classes"], "length": ex["length"]}
        for ex, p in zip(examples, preds)
    ]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            json.dump(row, fh, ensure_ascii=False)
            fh.write("\n")


# --- scoring (eval.py) -----------------------------------------------------------------------


def scorer(task: str, predictions: list[str], answers: list[list[Any]], all_classes: Any) -> float:
    """`eval.py: scorer`: summed in order, then `round(100 * total / n, 2)`."""
    total = 0.0
    for prediction, ground_truths in zip(predictions, answers):
        total += score_example(task, prediction, ground_truths, all_classes)
    return round(100 * total / len(predictions), 2)


def scorer_e(task: str, predictions: list[str], answers: list[list[Any]], lengths: list[int], all_classes: Any) -> dict[str, float]:
    """`eval.py: scorer_e`: buckets by `length`, `round(100 * np.mean(bucket), 2)`; an empty
    bucket is NaN there (numpy's mean of nothing), and so here."""
    import numpy as np

    buckets: dict[str, list[float]] = {"0-4k": [], "4-8k": [], "8k+": []}
    for prediction, ground_truths, length in zip(predictions, answers, lengths):
        score = score_example(task, prediction, ground_truths, all_classes)
        key = "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"
        buckets[key].append(score)
    out = {}
    for key, values in buckets.items():
        out[key] = round(100 * float(np.mean(values)), 2) if values else float("nan")
    return out


def read_predictions(path: Path, e: bool) -> tuple[list[str], list[list[Any]], list[int], Any]:
    """Parse one `<task>.jsonl`, naming file and line for bad JSON or missing fields."""
    rows = read_jsonl(path)
    if not rows:
        raise CepeError(f"{path}: no predictions")
    required = PRED_FIELDS if e else PRED_FIELDS[:3]
    preds, answers, lengths = [], [], []
    all_classes = None
    with open(path, encoding="utf-8") as fh:
        numbered = [i for i, line in enumerate(fh, 1) if line.strip()]
    for lineno, row in zip(numbered, rows):
        missing = [k for k in required if k not in row]
        if missing:
            raise CepeError(f"{path} line {lineno}: missing field(s) {', '.join(missing)}")
        if not isinstance(row["pred"], str):
            raise CepeError(f"{path} line {lineno}: 'pred' must be a string")
        if not isinstance(row["answers"], list):
            raise CepeError(f"{path} line {lineno}: 'answers' must be a list")
        preds.append(row["pred"])
        answers.append(row["answers"])
        # eval.py keeps the all_classes of the LAST line for the whole file; so do we.
        all_classes = row["all_classes"]
        if "length" in row:
            lengths.append(row["length"])
    return preds, answers, lengths, all_classes


def score_directory(pred_dir: str | os.PathLike[str], e: bool = False) -> dict[str, Any]:
    """Score every `<task>.jsonl` in `pred_dir` as the official `eval.py` does: `{task: score}`
    (or `{task: {bucket: score}}` for LongBench-E)."""
    root = Path(pred_dir)
    if not root.is_dir():
        raise CepeError(f"predictions: {root} is not a directory")
    files = sorted(p for p in root.iterdir() if p.name.endswith("jsonl"))
    if not files:
        raise CepeError(f"predictions: {root} has no <task>.jsonl files")
    scores: dict[str, Any] = {}
    for path in files:
        task = path.name.split(".")[0]
        if task not in DATASET2METRIC:
            raise CepeError(f"{path}: {task!r} is not a LongBench task (known: {', '.join(TASKS)})")
        preds, answers, lengths, all_classes = read_predictions(path, e)
        if task in ("trec", "lsht") and not isinstance(all_classes, list):
            raise CepeError(f"{path}: 'all_classes' must be a list for {task}")
        scores[task] = scorer_e(task, preds, answers, lengths, all_classes) if e else scorer(task, preds, answers, all_classes)
    return scores


def write_result(path: Path, scores: dict[str, Any]) -> None:
    """`result.json` as eval.py writes it (`json.dump(..., ensure_ascii=False, indent=4)`),
    NaN included for empty LongBench-E buckets."""
    from pipeline.io import atomic_write_text

    atomic_write_text(path, json.dumps(scores, ensure_ascii=False, indent=4))


def metrics_from_scores(scores: dict[str, Any], e: bool) -> dict[str, Any]:
    """metrics.json for DVC: the same numbers (NaN -> null) plus a plain average over tasks."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    out: dict[str, Any] = {"tasks": clean(scores)}
    if e:
        buckets = {}
        for key in ("0-4k", "4-8k", "8k+"):
            vals = [s[key] for s in scores.values() if not math.isnan(s[key])]
            buckets[key] = round(sum(vals) / len(vals), 2) if vals else None
        out["average"] = buckets
    else:
        out["average"] = round(sum(scores.values()) / len(scores), 2) if scores else None
    return out
