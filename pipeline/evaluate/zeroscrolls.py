"""ZeroSCROLLS (tau/zero_scrolls), the six tasks CEPE used for CEPED, validation split.

Prompts are the dataset's own `input` field (instruction + document + query, ZeroSCROLLS's
wording). Truncation for plain decoders is ZeroSCROLLS's `process_model_input`: the document is
cut on the right and `truncation_seperator` + the query are kept; CEPE models use the
`cepe-concat-truncate-left` policy as CEPE's `run_zs.sh` configs do. Generation lengths follow
CEPE's configs (evaluation.md 1.5): 50 new tokens for the QA tasks, 1024 for the summaries;
greedy by default (CEPE samples GovReport with top-p 0.95; `sampling: true` does that).

Metrics, max over the references of an id, x100:
- ZeroSCROLLS's own: summaries (gov_report, summ_screen_fd, qmsum) the geometric mean of
  ROUGE-1/2/L F (Google `rouge_score`, no stemming); qasper and narrative_qa SQuAD token F1;
  quality accuracy of the first `\\b[A-D]\\b` in the prediction against the gold letter;
- CEPE's: ROUGE-L F with stemming for every task that uses rouge (including qasper and
  narrative_qa), EM for quality.
Rows of one id with several references (the validation files repeat the id) are one example.
"""

from __future__ import annotations

import hashlib
import math
import re
import string
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.errors import CepeError
from pipeline.evaluate.longbench import missing_data_message, read_jsonl, read_jsonl_lines

TASKS = ("qasper", "narrative_qa", "quality", "qmsum", "summ_screen_fd", "gov_report")
SUMMARY_TASKS = ("qmsum", "summ_screen_fd", "gov_report")
MAX_NEW_TOKENS = {"qasper": 50, "narrative_qa": 50, "quality": 50, "qmsum": 1024, "summ_screen_fd": 1024, "gov_report": 1024}
FIELDS = ("id", "input", "output", "query_start_index", "truncation_seperator")
HUB_REPO = "tau/zero_scrolls"


def select_tasks(names: list[str]) -> list[str]:
    if not names:
        return list(TASKS)
    for name in names:
        if name not in TASKS:
            raise CepeError(f"subtasks: unknown ZeroSCROLLS task {name!r} (known: {', '.join(TASKS)})")
    return list(names)


def load_task(source: str, task: str, split: str = "validation") -> tuple[list[dict[str, Any]], str]:
    """Examples grouped by id (`references` = every `output` of that id) and the file's sha256.

    Local layouts: `<dir>/<task>/<split>.jsonl` (the unpacked `<task>.zip`) or `<dir>/<task>.jsonl`;
    `hub` reads `<task>.zip` from the tau/zero_scrolls dataset repository.
    """
    if source in ("", "embedded"):
        raise CepeError(missing_data_message("zeroscrolls", source, "DIR with the unpacked ZeroSCROLLS zips"))
    if source == "hub":
        from pipeline.hub import require_hub

        require_hub(HUB_REPO, "data", repo_type="dataset")
        try:
            from huggingface_hub import hf_hub_download

            archive = Path(hf_hub_download(HUB_REPO, f"{task}.zip", repo_type="dataset"))
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CepeError(f"data: ZeroSCROLLS {task} could not be fetched from the hub ({first}); pass --data DIR") from None
        with zipfile.ZipFile(archive) as zf:
            member = next((n for n in zf.namelist() if n.endswith(f"{task}/{split}.jsonl")), None)
            if member is None:
                raise CepeError(f"{archive}: no {task}/{split}.jsonl inside")
            raw = zf.read(member)
        rows = read_jsonl_lines(iter(raw.decode("utf-8").splitlines()), f"{archive}:{member}")
        digest = hashlib.sha256(raw).hexdigest()
    else:
        root = Path(source)
        candidates = [root / task / f"{split}.jsonl", root / f"{task}.jsonl"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise CepeError(f"data: {root} has no {task}/{split}.jsonl or {task}.jsonl (pass --data DIR with the unpacked ZeroSCROLLS zips, or --data hub)")
        rows = read_jsonl(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    grouped: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(rows, 1):
        missing = [k for k in FIELDS if k not in row]
        if missing:
            raise CepeError(f"{task} example {i}: missing field(s) {', '.join(missing)}")
        ex = grouped.setdefault(str(row["id"]), {**row, "references": []})
        ex["references"].append(row["output"])
    return list(grouped.values()), digest


# --- metrics ---------------------------------------------------------------------------------


def _normalize(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(pred: str, ref: str) -> float:
    p, r = _normalize(pred).split(), _normalize(ref).split()
    same = sum((Counter(p) & Counter(r)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(pred: str, ref: str) -> float:
    return float(_normalize(pred) == _normalize(ref))


def quality_letter(text: str) -> str | None:
    m = re.search(r"\b[A-D]\b", text)
    return m.group(0) if m else None


def quality_accuracy(pred: str, ref: str) -> float:
    """ZeroSCROLLS QuALITY: the first A-D letter of the prediction equals the gold letter."""
    gold = quality_letter(ref)
    return float(gold is not None and quality_letter(pred) == gold)


_SCORERS: dict[tuple[str, bool], Any] = {}


def _rouge(pred: str, ref: str, stem: bool) -> dict[str, float]:
    scorer = _SCORERS.get(("r", stem))
    if scorer is None:
        from rouge_score import rouge_scorer

        scorer = _SCORERS[("r", stem)] = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stem)
    scores = scorer.score(ref, pred)  # (target, prediction)
    return {k: v.fmeasure for k, v in scores.items()}


def score_example(task: str, pred: str, refs: list[str]) -> dict[str, float]:
    """Per-example metrics (0-1), each the max over references."""
    out: dict[str, float] = {}
    if task in SUMMARY_TASKS:
        for key in ("rouge1", "rouge2", "rougeL"):
            out[key] = max(_rouge(pred, r, False)[key] for r in refs)
    elif task == "quality":
        out["accuracy"] = max(quality_accuracy(pred, r) for r in refs)
    else:
        out["f1"] = max(token_f1(pred, r) for r in refs)
    out["em"] = max(exact_match(pred, r) for r in refs)
    out["cepe_rougeL"] = max(_rouge(pred, r, True)["rougeL"] for r in refs)  # CEPE's metric: stemmed R-L
    return out


def aggregate(task: str, per_example: list[dict[str, float]]) -> dict[str, float]:
    """Task means x100 and the headline `score` ZeroSCROLLS reports."""
    keys = per_example[0].keys() if per_example else []
    means = {k: 100 * sum(e[k] for e in per_example) / len(per_example) for k in keys}
    if task in SUMMARY_TASKS:
        r1, r2, rl = means["rouge1"], means["rouge2"], means["rougeL"]
        means["score"] = (r1 * r2 * rl) ** (1 / 3) if min(r1, r2, rl) > 0 else 0.0
    elif task == "quality":
        means["score"] = means["accuracy"]
    else:
        means["score"] = means["f1"]
    return {k: round(v, 2) for k, v in means.items() if not math.isnan(v)}
