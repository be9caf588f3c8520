"""Open-domain QA with retrieved passages (evaluation.md 1.3): NQ-open, TriviaQA, PopQA.

Data: a json (a list) or jsonl file, or a folder of them (each file is one dataset, named by
its stem), in either layout:

- CEPE's (the Contriever/DPR retrieval files its code reads): `question`, `answers` (or
  `answer`: a list or a string), `ctxs`: [{title, text, score?}], best first;
- FlashRAG's: `question`, `golden_answers`, and the retrieved passages as `retrieval_result`
  (top level, or under `output` as in its `intermediate_data.json`): [{contents, score?}] where
  `contents` is the title line (FlashRAG writes it in double quotes, removed here), a newline,
  then the text.

Prompts, as the official `test_qa.yaml` (include_title, no instruction): a passage is
`Document (Title: {title}): {text}`; a demonstration is its top passage, a blank line, then
`Question: {q}\\nAnswer: {first answer}`; the test item ends `Question: {q}\\nAnswer:`; blocks are
joined by blank lines. Demonstrations come from `demo_data` or else from the data itself, never
the test question (PopQA's rule in the official code); each test item draws its own, seeded.
Settings (one row each in the table):

- `cepe` (CEPE models): the top `passages_decoder` passages + the question in the decoder, the
  next N passages in the encoder one per chunk, the demonstrations together in one more chunk
  (the released yaml's `n_shot_encoder: 2`), for each N in `passages_encoder`;
- `decoder`: demonstrations + the top `passages_decoder` passages + the question in the decoder;
- `decoder-fit`: as many passages as fit the decoder's window (up to the most any cepe setting
  reads), the plain decoder's best use of the same passages;
- `replug` (REPLUG): one prompt per passage (demonstrations + that passage + the question), the
  next-token distributions averaged with weights softmax(retrieval score / temperature), greedy;
  for each k in `replug_passages`.

Decoding: greedy, 25 new tokens, stopping at a newline (the prediction is the text before the
first newline, stripped). Metrics, as the official utils.py: EM and substring EM after SQuAD/DrQA
normalisation (lower case, ASCII punctuation removed, articles a/an/the removed, whitespace
collapsed), token F1 (yes/no/noanswer must match exactly), each the max over the gold answers,
x100.
"""

from __future__ import annotations

import json
import math
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import CepeError

MAX_NEW_TOKENS = 25
DOCUMENT = "Document (Title: {title}): {text}"
QUESTION = "Question: {question}\nAnswer:"


# --- metrics (official utils.py) -------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """SQuAD/DrQA normalisation: lower, drop ASCII punctuation, drop articles, collapse spaces.
    Non-ASCII punctuation and letters are kept and not Unicode-normalised, as upstream."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def substring_match(prediction: str, gold: str) -> bool:
    """The normalised gold answer occurs in the normalised prediction."""
    return normalize_answer(gold) in normalize_answer(prediction)


def f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    if (pred in ("yes", "no", "noanswer") or ref in ("yes", "no", "noanswer")) and pred != ref:
        return 0.0
    p, r = pred.split(), ref.split()
    same = sum((Counter(p) & Counter(r)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, answers: list[str]) -> dict[str, float]:
    """EM, F1 and substring EM of one prediction: each the max over the gold answers."""
    return {"em": float(max(exact_match(prediction, a) for a in answers)),
            "f1": max(f1(prediction, a) for a in answers),
            "substring_em": float(max(substring_match(prediction, a) for a in answers))}


def postprocess(text: str) -> str:
    """The answer is the generated text before the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


# --- data ------------------------------------------------------------------------------------


@dataclass
class Passage:
    title: str
    text: str
    score: float | None = None

    def render(self) -> str:
        return DOCUMENT.format(title=self.title, text=self.text)


@dataclass
class Example:
    id: str
    question: str
    answers: list[str]
    passages: list[Passage] = field(default_factory=list)


def _files(source: str) -> list[Path]:
    root = Path(source)
    if not source:
        raise CepeError("data: qa needs a json/jsonl file or a folder of them (--data PATH)")
    if root.is_file():
        return [root]
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.suffix in (".json", ".jsonl"))
        if files:
            return files
        raise CepeError(f"data: {root} has no *.json or *.jsonl files")
    raise CepeError(f"data: {root} does not exist")


def _rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed row); a .json file is one list (its items numbered from 1)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CepeError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, list):
            raise CepeError(f"{path}: expected a JSON list of examples")
        return list(enumerate(data, 1))
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise CepeError(f"{path} line {lineno}: invalid JSON ({exc.msg})") from None
    return rows


def _answers(row: dict[str, Any]) -> tuple[str, list[str] | None]:
    for key in ("answers", "answer", "golden_answers"):
        if key in row:
            value = row[key]
            if isinstance(value, str):
                value = [value]
            ok = isinstance(value, list) and value and all(isinstance(a, str) and a.strip() for a in value)
            return key, list(value) if ok else None
    return "answers", None


def _passages(row: dict[str, Any]) -> tuple[str, list[Passage] | None]:
    """(field name, passages or None when malformed or empty)."""
    if "ctxs" in row:
        ctxs = row["ctxs"]
        if not isinstance(ctxs, list) or not ctxs:
            return "ctxs", None
        out = []
        for c in ctxs:
            if not isinstance(c, dict) or not isinstance(c.get("text"), str) or not isinstance(c.get("title", ""), str):
                return "ctxs", None
            out.append(Passage(c.get("title", ""), c["text"], _float(c.get("score"))))
        return "ctxs", out
    results = row.get("retrieval_result")
    name = "retrieval_result"
    if results is None and isinstance(row.get("output"), dict):
        results, name = row["output"].get("retrieval_result"), "output.retrieval_result"
    if not isinstance(results, list) or not results:
        return ("ctxs" if results is None and "golden_answers" not in row else name), None
    out = []
    scores = row.get("output", {}).get("retrieval_score") if isinstance(row.get("output"), dict) else None
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not isinstance(r.get("contents"), str):
            return name, None
        title, _, text = r["contents"].partition("\n")
        title = title.strip()
        if len(title) >= 2 and title[0] == title[-1] == '"':
            title = title[1:-1]
        s = r.get("score", scores[i] if isinstance(scores, list) and i < len(scores) else None)
        out.append(Passage(title, text.strip(), _float(s)))
    return name, out


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None  # Contriever files store scores as strings
    except (TypeError, ValueError):
        return None


def load_examples(source: str, errors: Any, need_passages: bool = True) -> tuple[dict[str, list[Example]], str]:
    """{dataset name: examples} and a sha256 over the files; bad rows go to `errors` (DataErrors)."""
    import hashlib

    digest = hashlib.sha256()
    out: dict[str, list[Example]] = {}
    for path in _files(source):
        digest.update(path.read_bytes())
        examples = []
        for lineno, row in _rows(path):
            if not isinstance(row, dict):
                errors.add(path, lineno, "(row)", "expected a JSON object")
                continue
            if not isinstance(row.get("question"), str) or not row["question"].strip():
                errors.add(path, lineno, "question", "expected a non-empty string")
                continue
            key, answers = _answers(row)
            if answers is None:
                errors.add(path, lineno, key, "expected a non-empty list of non-empty answer strings")
                continue
            pkey, passages = _passages(row)
            if passages is None and need_passages:
                errors.add(path, lineno, pkey, "expected a non-empty list of retrieved passages ({title, text} or FlashRAG {contents})")
                continue
            examples.append(Example(str(row.get("id", f"{path.stem}:{lineno}")), row["question"].strip(), answers, passages or []))
        out[path.stem] = examples
    return out, digest.hexdigest()


def sample_demos(pool: list[Example], question: str, n: int, rng: random.Random) -> list[Example]:
    """n demonstrations with at least one passage, none asking `question` (normalised)."""
    norm = normalize_answer(question)
    candidates = [e for e in pool if e.passages and normalize_answer(e.question) != norm]
    if n and len(candidates) < n:
        raise CepeError(f"demos: {n} demonstrations asked for, only {len(candidates)} usable examples in the demonstration pool")
    return rng.sample(candidates, n) if n else []


def demo_text(demo: Example) -> str:
    return demo.passages[0].render() + "\n\n" + QUESTION.format(question=demo.question) + " " + demo.answers[0]


# --- prompts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One row of the table: how many passages go where."""

    policy: str  # cepe | decoder | decoder-fit | replug
    decoder_passages: int
    encoder_passages: int = 0

    @property
    def name(self) -> str:
        if self.policy == "cepe":
            return f"cepe-{self.decoder_passages}+{self.encoder_passages}"
        if self.policy == "decoder-fit":
            return "decoder-fit"
        return f"{self.policy}-{self.decoder_passages}"


def decoder_text(demos: list[str], passages: list[Passage], question: str) -> str:
    blocks = demos + [p.render() for p in passages] + [QUESTION.format(question=question)]
    return "\n\n".join(blocks)


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def fit_passages(tokenizer: Any, demos: list[str], passages: list[Passage], question: str, budget: int) -> int:
    """The most leading passages whose prompt has at most `budget` tokens (0 if even none fits)."""
    lo, hi = 0, len(passages)
    while lo < hi:  # prompt length grows with the number of passages: binary search
        mid = (lo + hi + 1) // 2
        if len(encode(tokenizer, decoder_text(demos, passages[:mid], question))) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def chunk(tokenizer: Any, text: str, chunk_len: int) -> list[int]:
    """One encoder chunk: the text's tokens (no special tokens), cut to `chunk_len`."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])[:chunk_len]


def replug_weights(passages: list[Passage], temperature: float) -> list[float]:
    """softmax(score / temperature) over the passages (equal weights where scores are missing)."""
    scores = [p.score if p.score is not None else 0.0 for p in passages]
    top = max(scores)
    exps = [math.exp((s - top) / temperature) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def replug_generate(model: Any, prompts: list[list[int]], weights: list[float], max_new_tokens: int,
                    stop_ids: list[int], pad_id: int) -> list[int]:
    """Greedy decoding of one answer from k prompts: each step feeds the same token to every
    prompt and takes the argmax of sum_j w_j softmax(logits_j). Prompts are left-padded, their
    positions counted from their first real token (explicit position_ids)."""
    import torch

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for j, p in enumerate(prompts):
        ids[j, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[j, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    w = torch.tensor(weights, dtype=torch.float32, device=device)[:, None]  # (k, 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (k, T)
    out: list[int] = []
    past = None
    step_ids, step_pos = ids, positions
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            res = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=past,
                        use_cache=True, logits_to_keep=1)
            past = res.past_key_values
            probs = torch.softmax(res.logits[:, -1].float(), dim=-1)  # (k, V)
            token = int((w * probs).sum(0).argmax())
            if token in stop_ids:
                break
            out.append(token)
            step_ids = torch.full((len(prompts), 1), token, dtype=torch.long, device=device)
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return out


def stop_token_ids(tokenizer: Any, eos: list[int]) -> list[int]:
    """EOS plus the newline tokens the official code stops on ("\\n", "Ċ", "ĊĊ", "<0x0A>") that exist."""
    ids = list(eos)
    unk = tokenizer.unk_token_id
    for tok in ("\n", "Ċ", "ĊĊ", "<0x0A>"):
        i = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(i, int) and i != unk and i not in ids and i < len(tokenizer):
            ids.append(i)
    return ids


def aggregate(per_example: list[dict[str, float]]) -> dict[str, float]:
    n = len(per_example)
    return {k: round(100 * sum(e[k] for e in per_example) / n, 2) for k in ("em", "f1", "substring_em")} | {"n": n}
