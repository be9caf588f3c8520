"""In-context learning with many demonstrations (evaluation.md 1.4): the eleven PCW classification sets.

Data: a folder with `<set>/train.jsonl` (the demonstration pool) and `<set>/test.jsonl` for each
set run (`subtasks`, default all eleven), rows `{text, label}` or the set's own HF field names
(sst2 `sentence`, dbpedia `content`, trec `coarse_label`/`fine_label`, nlu_scenario `scenario`,
clinic150 `intent`). A label is an option's name (underscores read as spaces) or its number in
the set's option list: the official list where the official code fixes one, else
`<set>/labels.json` (a JSON list of names, in label-number order; the HF `features` names for
nlu_intent, banking77 and clinic150), else the names met in train.jsonl, sorted.

The protocol, as the official `eval_downstream.py` with `configs/eval_icl.yaml`: each test item
gets its own class-balanced demonstrations (`sample_demos`: the same number from each class
where possible, each set of classes shuffled), drawn from one seeded generator per set, setting
and seed; the first `demos` of them go to the decoder and, for CEPE, the rest to the encoder, one
per chunk. A demonstration is the set's template with its answer (`Sentence: {text}\\nSentiment:
positive`), demonstrations are joined by blank lines, the test item ends with the label prefix
(`...\\nSentiment:`). Each option (` positive`, with its leading space, tokenized alone) is scored
by the sum of its tokens' log-probabilities after the prompt. Metrics: `acc` (argmax of the sum),
`acc_norm` (of the per-token mean) and their calibrated forms (`acc_calibrated`,
`acc_calibrated_norm`: the option's score under a content-free prompt, the BOS token alone, is
subtracted first: calibrate_nll with empty_domain_prompt), x100, averaged over the seeds. The
test items are the first N (250) of test.jsonl for every seed (the official code's shuffle result
is discarded, so it too reads the first 250).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import CepeError

TEST_EXAMPLES = 250
OPTION_BATCH = 16  # options scored per forward


@dataclass(frozen=True)
class IclSet:
    """One PCW set: its prompt and where its fields live."""

    template: str  # with {text} and {answer}; the answer carries its leading space
    text_fields: tuple[str, ...] = ("text",)
    label_fields: tuple[str, ...] = ("label",)
    options: tuple[str, ...] | None = None  # the official fixed option list (leading space), or None

    def render(self, text: str, answer: str = "") -> str:
        return self.template.format(text=text, answer=answer)


def _opts(*names: str) -> tuple[str, ...]:
    return tuple(" " + n for n in names)


_TREC_FINE = (
    "abbreviation abbreviation", "abbreviation expansion", "entity animal", "entity body", "entity color",
    "entity creation", "entity currency", "entity disease", "entity event", "entity food", "entity instrument",
    "entity language", "entity letter", "entity other", "entity plant", "entity product", "entity religion",
    "entity sport", "entity substance", "entity symbol", "entity technique", "entity term", "entity vehicle",
    "entity word", "description definition", "description description", "description manner", "description reason",
    "human group", "human individual", "human title", "human description", "location city", "location country",
    "location mountain", "location other", "location state", "numeric code", "numeric count", "numeric date",
    "numeric distance", "numeric money", "numeric order", "numeric other", "numeric period", "numeric percent",
    "numeric speed", "numeric temperature", "numeric size", "numeric weight")

# The eleven sets of the official eval_icl.yaml, all of them (its demo_files list has ten entries,
# so its zip over datasets silently drops clinic150; here every set runs).
SETS: dict[str, IclSet] = {
    "sst2": IclSet("Sentence: {text}\nSentiment:{answer}", ("sentence", "text"), ("label",), _opts("negative", "positive")),
    "sst5": IclSet("Sentence: {text}\nSentiment:{answer}", ("text",), ("label",), _opts("terrible", "bad", "okay", "good", "great")),
    "mr": IclSet("Review: {text}\nSentiment:{answer}", ("text",), ("label",), _opts("negative", "positive")),
    "ag_news": IclSet("Article: {text}\nTopic:{answer}", ("text",), ("label",), _opts("World", "Sports", "Business", "Sci/Tech")),
    "trec-coarse": IclSet("Question: {text}\nType:{answer}", ("text",), ("coarse_label", "label"),
                          _opts("abbreviation", "entity", "description", "human", "location", "numeric")),
    "trec-fine": IclSet("Question: {text}\nType:{answer}", ("text",), ("fine_label", "label"), _opts(*_TREC_FINE)),
    "dbpedia": IclSet("Input: {text}\nType:{answer}", ("content", "text"), ("label",),
                      _opts("Company", "School", "Artist", "Athlete", "Politics", "Transportation", "Building", "Nature",
                            "Village", "Animal", "Plant", "Album", "Film", "Book")),
    "nlu_scenario": IclSet("Utterance: {text}\nScenario:{answer}", ("text",), ("scenario", "label"),
                           _opts("general", "weather", "play", "music", "qa", "audio", "alarm", "email", "calendar", "cooking",
                                 "datetime", "news", "social", "recommendation", "iot", "lists", "takeaway", "transport")),
    "nlu_intent": IclSet("Utterance: {text}\nIntent:{answer}", ("text",), ("label",)),
    "banking77": IclSet("Query: {text}\nIntent:{answer}", ("text",), ("label",)),
    "clinic150": IclSet("Utterance: {text}\nIntent:{answer}", ("text",), ("intent", "label")),
}


@dataclass
class Item:
    text: str
    label: int  # index into the set's options


def select_sets(names: list[str]) -> list[str]:
    for n in names:
        if n not in SETS:
            raise CepeError(f"subtasks: unknown ICL set {n!r} (known: {', '.join(SETS)})")
    return list(names) if names else list(SETS)


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    if not path.is_file():
        raise CepeError(f"data: {path} does not exist (icl reads <data>/<set>/train.jsonl and test.jsonl)")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise CepeError(f"{path} line {lineno}: invalid JSON ({exc.msg})") from None
    return rows


def _name(label: str) -> str:
    return " " + label.strip().replace("_", " ")


def options_for(name: str, folder: Path, train_rows: list[tuple[int, Any]]) -> list[str]:
    """The option strings (leading space) of a set: labels.json, else the official list, else train's names."""
    spec = SETS[name]
    labels = folder / "labels.json"
    if labels.is_file():
        try:
            names = json.loads(labels.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CepeError(f"{labels}: invalid JSON ({exc.msg})") from None
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise CepeError(f"{labels}: expected a non-empty JSON list of label names")
        return [_name(n) for n in names]
    if spec.options is not None:
        return list(spec.options)
    seen = sorted({_name(r[f]) for _, r in train_rows if isinstance(r, dict)
                   for f in spec.label_fields[:1] if isinstance(r.get(f), str) and r[f].strip()})
    if not seen:
        raise CepeError(f"data: {folder} has no labels.json and {folder / 'train.jsonl'} no string labels to name the options")
    return seen


def parse_rows(name: str, path: Path, rows: list[tuple[int, Any]], options: list[str], errors: Any) -> list[Item]:
    spec = SETS[name]
    stripped = [o.strip() for o in options]
    items = []
    for lineno, row in rows:
        if not isinstance(row, dict):
            errors.add(path, lineno, "(row)", "expected a JSON object")
            continue
        text_field = next((f for f in spec.text_fields if f in row), spec.text_fields[0])
        text = row.get(text_field)
        if not isinstance(text, str) or not text.strip():
            errors.add(path, lineno, text_field, "expected a non-empty string")
            continue
        label_field = next((f for f in spec.label_fields if f in row), spec.label_fields[0])
        label = row.get(label_field)
        if isinstance(label, bool) or label is None:
            errors.add(path, lineno, label_field, f"expected a label name or number of {name}'s {len(options)} options")
            continue
        if isinstance(label, int):
            index = label if 0 <= label < len(options) else -1
        elif isinstance(label, str):
            index = stripped.index(_name(label).strip()) if _name(label).strip() in stripped else -1
        else:
            index = -1
        if index < 0:
            errors.add(path, lineno, label_field, f"unknown label {label!r} (not one of {name}'s {len(options)} options)")
            continue
        items.append(Item(text.strip(), index))
    return items


def load_set(root: str, name: str, errors: Any) -> tuple[list[Item], list[Item], list[str], str]:
    """(train items, test items, options, sha256 of the set's files)."""
    import hashlib

    folder = Path(root) / name
    train_rows = _read_jsonl(folder / "train.jsonl")
    test_rows = _read_jsonl(folder / "test.jsonl")
    options = options_for(name, folder, train_rows)
    digest = hashlib.sha256()
    for f in ("train.jsonl", "test.jsonl", "labels.json"):
        if (folder / f).is_file():
            digest.update((folder / f).read_bytes())
    train = parse_rows(name, folder / "train.jsonl", train_rows, options, errors)
    test = parse_rows(name, folder / "test.jsonl", test_rows, options, errors)
    return train, test, options, digest.hexdigest()


def sample_demos(by_class: list[list[Item]], num: int, rng: random.Random) -> list[Item]:
    """The official balanced sampling: ceil(num / classes) sets with one item of every class each
    (with replacement once a class runs out), every set shuffled, flattened, the first `num`."""
    if num == 0:
        return []
    classes = [c for c in by_class if c]
    n_sets = math.ceil(num / len(classes))
    sets: list[list[Item]] = [[] for _ in range(n_sets)]
    for members in classes:
        idx = rng.sample(range(len(members)), n_sets % len(members))
        while len(idx) < n_sets:
            idx += rng.sample(range(len(members)), len(members))
        for i, j in enumerate(idx[:n_sets]):
            sets[i].append(members[j])
    for s in sets:
        rng.shuffle(s)
    return [item for s in sets for item in s][:num]


def group_by_class(items: list[Item]) -> list[list[Item]]:
    groups: dict[int, list[Item]] = {}
    for it in items:
        groups.setdefault(it.label, []).append(it)
    return [groups[k] for k in sorted(groups)]


# --- scoring ---------------------------------------------------------------------------------


def option_scores(model: Any, prefix: list[int], options: list[list[int]], encoder: tuple[Any, Any] | None = None) -> list[float]:
    """Sum of log p(option tokens | prefix) for each option (token-id lists).

    The prefix runs once (its KV cache kept, its last logit scoring each option's first token);
    options then run `OPTION_BATCH` at a time on copies of that cache, right-padded (padding
    comes after every scored token, so causal attention never lets it in).
    encoder: (encoder_hidden_states (1, S, H), encoder_padding_mask (1, S) or None) computed once.
    """
    import copy

    import torch

    device = next(model.parameters()).device

    def context(rows: int) -> dict[str, Any]:
        if encoder is None:
            return {}
        states, pad = encoder
        return {"encoder_hidden_states": states.expand(rows, -1, -1),
                "encoder_padding_mask": None if pad is None else pad.expand(rows, -1)}

    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prefix], dtype=torch.long, device=device), use_cache=True,
                    logits_to_keep=1, **context(1))
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # (V,): predicts each option's token 0
        cache = out.past_key_values
        scores: list[float] = []
        for start in range(0, len(options), OPTION_BATCH):
            batch = options[start : start + OPTION_BATCH]
            m = max(len(o) for o in batch)
            ids = torch.zeros((len(batch), m), dtype=torch.long)  # (B, m), right-padded
            for b, o in enumerate(batch):
                ids[b, : len(o)] = torch.tensor(o, dtype=torch.long)
            if m > 1:
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(len(batch))
                logits = model(input_ids=ids.to(device), past_key_values=past, use_cache=True, **context(len(batch))).logits
                logp = torch.log_softmax(logits.float(), dim=-1)  # (B, m, V): position t predicts token t + 1
            for b, o in enumerate(batch):
                total = float(first[o[0]])
                for t in range(1, len(o)):
                    total += float(logp[b, t - 1, o[t]])
                scores.append(total)
    return scores


def predictions(scores: list[float], lengths: list[int], calibration: list[float]) -> dict[str, int]:
    """The option each metric picks (official nll_acc, nll_acc_norm, nll_acc_calibrated(_norm))."""
    def argmax(values: list[float]) -> int:
        return max(range(len(values)), key=lambda i: values[i])

    cal = [s - c for s, c in zip(scores, calibration)]
    return {"acc": argmax(scores), "acc_norm": argmax([s / n for s, n in zip(scores, lengths)]),
            "acc_calibrated": argmax(cal), "acc_calibrated_norm": argmax([s / n for s, n in zip(cal, lengths)])}


METRICS = ("acc", "acc_norm", "acc_calibrated", "acc_calibrated_norm")
