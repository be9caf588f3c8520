"""RULER synthetic tasks (NVIDIA/RULER `scripts/data/synthetic/{niah,variable_tracking}.py`),
generated with the evaluated model's tokenizer at chosen lengths, seeded, and scored by string
match (`scripts/eval/synthetic/constants.py`).

Faithful to RULER:
- templates and answer prefixes of `constants.py` (the upstream typo "assgined" in the
  variable-tracking prefix is kept);
- the needle "One of the special magic {type_needle_v} for {key} is: {value}.", keys are
  adjective-noun pairs from the `wonderwords` word lists, values 7-digit numbers, words or UUIDs;
- single-needle prompts rewritten to the singular exactly as niah.py does (Some -> A, are -> is);
- needles inserted at depths drawn from `linspace(0, 100, 40)` at sentence boundaries (essay),
  or at random lines (noise and needle haystacks);
- the haystack size found by binary search so that prompt tokens + tokens_to_generate fit the
  target length, with RULER's increments (500 words for essays, 25 or 5 sentences otherwise;
  below 4K tokens the essay step is length/16 words, since 500 words alone overshoot);
- variable tracking with one in-context example (values 12345 -> random, names re-drawn);
- metric: string_match_all, each prediction stripped and `[\\x00-\\x1f]` replaced by newlines.

Different from RULER, for offline use (documented in docs/results/evaluation.md):
- the "essay" haystack is text from the embedded public-domain corpus, not Paul Graham's essays
  (which RULER downloads);
- essay sentences are split with a regular expression, not NLTK's punkt model (a download);
- one `random.Random` per (seed, task, length) instead of RULER's global RNG, so any subset of
  tasks and lengths is reproducible on its own.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import string
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import CepeError

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
# "assgined" sic: RULER's constants.py.
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, "
    "{num_v} variables are assgined the value {query}, they are: "
)
DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)).astype(int)


@dataclass(frozen=True)
class RulerTask:
    name: str
    kind: str  # "niah" | "vt"
    tokens_to_generate: int
    args: dict[str, Any] = field(default_factory=dict)


# scripts/synthetic.yaml (the niah and vt entries)
TASKS: dict[str, RulerTask] = {
    t.name: t
    for t in [
        RulerTask("niah_single_1", "niah", 128, dict(type_haystack="noise", type_needle_k="words", type_needle_v="numbers", num_needle_k=1, num_needle_v=1, num_needle_q=1)),
        RulerTask("niah_single_2", "niah", 128, dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_k=1, num_needle_v=1, num_needle_q=1)),
        RulerTask("niah_single_3", "niah", 128, dict(type_haystack="essay", type_needle_k="words", type_needle_v="uuids", num_needle_k=1, num_needle_v=1, num_needle_q=1)),
        RulerTask("niah_multikey_1", "niah", 128, dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_k=4, num_needle_v=1, num_needle_q=1)),
        RulerTask("niah_multikey_2", "niah", 128, dict(type_haystack="needle", type_needle_k="words", type_needle_v="numbers", num_needle_k=1, num_needle_v=1, num_needle_q=1)),
        RulerTask("niah_multikey_3", "niah", 128, dict(type_haystack="needle", type_needle_k="uuids", type_needle_v="uuids", num_needle_k=1, num_needle_v=1, num_needle_q=1)),
        RulerTask("niah_multivalue", "niah", 128, dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_k=1, num_needle_v=4, num_needle_q=1)),
        RulerTask("niah_multiquery", "niah", 128, dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_k=1, num_needle_v=1, num_needle_q=4)),
        RulerTask("vt", "vt", 30, dict(type_haystack="noise", num_chains=1, num_hops=4)),
    ]
}


def select_tasks(names: list[str]) -> list[str]:
    if not names:
        return list(TASKS)
    for name in names:
        if name not in TASKS:
            raise CepeError(f"subtasks: unknown RULER task {name!r} (known: {', '.join(TASKS)})")
    return list(names)


# --- word lists and haystack text ------------------------------------------------------------

_WORDS: tuple[list[str], list[str]] | None = None


def _word_lists() -> tuple[list[str], list[str]]:
    """wonderwords' adjective and noun lists, sorted and deduplicated (RULER's key vocabulary)."""
    global _WORDS
    if _WORDS is None:
        try:
            from wonderwords import random_word
        except ImportError:
            raise CepeError("ruler: the `wonderwords` package is needed for RULER keys (pip install wonderwords)") from None
        adjs = sorted(set(random_word._get_words_from_text_file("adjectivelist.txt")))
        nouns = sorted(set(random_word._get_words_from_text_file("nounlist.txt")))
        _WORDS = (adjs, nouns)
    return _WORDS


def load_essay_words(source: str) -> list[str]:
    """Haystack words (RULER: `re.sub(r"\\s+", " ", essay).split(" ")`) from jsonl(.gz) `text`
    fields or plain .txt files; "embedded" reads the project's embedded corpus."""
    from pipeline.evaluate.ppl import _document_files

    if source not in ("", "embedded") and Path(source).is_file() and not source.endswith((".jsonl", ".jsonl.gz")):
        texts = [Path(source).read_text(encoding="utf-8")]
    else:
        texts = []
        for path in _document_files(source):
            raw = path.read_bytes()
            data = gzip.decompress(raw) if path.name.endswith(".gz") else raw
            for line in data.decode("utf-8").splitlines():
                if line.strip():
                    texts.append(json.loads(line).get("text", ""))
    words = re.sub(r"\s+", " ", " ".join(texts)).strip().split(" ")
    if len(words) < 100:
        raise CepeError(f"ruler_haystack: {source!r} has too little text for an essay haystack ({len(words)} words)")
    return words


def split_sentences(text: str) -> list[str]:
    """Sentence split at . ! ? followed by whitespace (stands in for NLTK's sent_tokenize)."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


# --- one generator per (task, length) --------------------------------------------------------


def task_seed(seed: int, task: str, length: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(task.encode()) * 7919 + length) % (2**32)


class NiahGenerator:
    """RULER's niah.py `generate_input_output`, with its own RNG."""

    def __init__(self, task: RulerTask, rng: random.Random, essay: list[str] | None):
        self.task, self.rng, self.essay = task, rng, essay
        a = task.args
        self.k = max(a["num_needle_k"], a["num_needle_q"])
        self.v, self.q = a["num_needle_v"], a["num_needle_q"]
        self.type_k, self.type_v, self.haystack = a["type_needle_k"], a["type_needle_v"], a["type_haystack"]
        if self.haystack == "essay" and not essay:
            raise CepeError(f"ruler: {task.name} needs an essay haystack text (ruler_haystack)")

    def random_value(self, kind: str) -> str:
        rng = self.rng
        if kind == "numbers":
            return str(rng.randint(10**6, 10**7 - 1))
        if kind == "words":
            adjs, nouns = _word_lists()
            return f"{rng.choice(adjs)}-{rng.choice(nouns)}"
        if kind == "uuids":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        raise CepeError(f"ruler: unknown needle type {kind!r}")

    def __call__(self, num_haystack: int, seed: int) -> tuple[str, list[str]]:
        rng = self.rng
        keys, values, needles = [], [], []
        for _ in range(self.k):
            keys.append(self.random_value(self.type_k))
            value = []
            for _ in range(self.v):
                value.append(self.random_value(self.type_v))
                needles.append(NEEDLE.format(type_needle_v=self.type_v, key=keys[-1], value=value[-1]))
            values.append(value)
        random.Random(seed).shuffle(needles)  # niah.py shuffles with a fresh Random(random_seed)

        if self.haystack == "essay":
            assert self.essay is not None
            words = self.essay
            if num_haystack <= len(words):
                text = " ".join(words[:num_haystack])
            else:
                repeats = (num_haystack + len(words) - 1) // len(words)
                text = " ".join((words * repeats)[:num_haystack])
            sents = split_sentences(text)
            depths = rng.sample(DEPTHS, len(needles))
            positions = [0] + sorted(int(len(sents) * (d / 100)) for d in depths) + [len(sents)]
            parts = []
            for i in range(1, len(positions)):
                parts.append(" ".join(sents[positions[i - 1] : positions[i]]))
                if i - 1 < len(needles):
                    parts.append(needles[i - 1])
            context = " ".join(parts)
        else:
            if self.haystack == "noise":
                sentences = [NOISE] * num_haystack
            else:  # "needle": distractor needles with random keys and values
                sentences = [
                    NEEDLE.format(type_needle_v=self.type_v, key=self.random_value(self.type_k), value=self.random_value(self.type_v))
                    for _ in range(num_haystack)
                ]
            indexes = sorted(rng.sample(range(num_haystack), len(needles)), reverse=True)
            for index, element in zip(indexes, needles):
                sentences.insert(index, element)
            context = "\n".join(sentences)

        indices = rng.sample(range(self.k), self.q)
        queries = [keys[i] for i in indices]
        answers = [a for i in indices for a in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        template = NIAH_TEMPLATE + NIAH_ANSWER_PREFIX
        type_needle_v = self.type_v
        if self.q * self.v == 1:  # niah.py's singular rewrite, replace for replace
            template = template.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")
            type_needle_v = type_needle_v[:-1]
        return template.format(type_needle_v=type_needle_v, context=context, query=query), answers


class VtGenerator:
    """RULER's variable_tracking.py (noise haystack) `generate_input_output`."""

    def __init__(self, task: RulerTask, rng: random.Random):
        self.task, self.rng = task, rng
        self.chains, self.hops = task.args["num_chains"], task.args["num_hops"]

    def chains_for(self, is_icl: bool) -> tuple[list[list[str]], list[list[str]]]:
        rng, hops = self.rng, (min(10, self.hops) if is_icl else self.hops)
        k = 3 if is_icl else 5
        need = (hops + 1) * self.chains
        names = ["".join(rng.choices(string.ascii_uppercase, k=k)) for _ in range(need)]
        while len(set(names)) < need:  # RULER appends to the list (and can then misgroup); we redraw
            names = ["".join(rng.choices(string.ascii_uppercase, k=k)) for _ in range(need)]
        var_groups, chains = [], []
        for i in range(0, need, hops + 1):
            group = names[i : i + hops + 1]
            var_groups.append(group)
            first = f"VAR {group[0]} = 12345" if is_icl else f"VAR {group[0]} = {rng.randint(10000, 99998)}"
            chains.append([first] + [f"VAR {group[j + 1]} = VAR {group[j]} " for j in range(hops)])
        return var_groups, chains

    def __call__(self, num_noises: int, is_icl: bool = False) -> tuple[str, list[str]]:
        var_groups, chains = self.chains_for(is_icl)
        value = chains[0][0].split("=")[-1].strip()
        sentences = [NOISE] * num_noises
        for chain in chains:
            positions = sorted(self.rng.sample(range(len(sentences)), len(chain)))
            for insert_pi, j in zip(positions, range(len(chain))):
                sentences.insert(insert_pi + j, chain[j])
        context = "\n".join(sentences).replace(". \n", ".\n")
        hops = min(10, self.hops) if is_icl else self.hops
        text = (VT_TEMPLATE + VT_ANSWER_PREFIX).format(context=context, query=value, num_v=hops + 1)
        return text, var_groups[0]

    def randomize_icl(self, example: str) -> str:
        """variable_tracking.py `randomize_icl`: fresh names for the example's variables and a
        fresh value for 12345."""
        for item in example.strip().split()[-self.hops - 1 :]:
            example = example.replace(item, "".join(self.rng.choices(string.ascii_uppercase, k=len(item))))
        return example.replace("12345", str(self.rng.randint(10000, 99998)))


@dataclass
class RulerExample:
    task: str
    length: int
    index: int
    input: str  # the prompt up to the answer prefix
    answer_prefix: str
    outputs: list[str]
    tokens: int  # prompt tokens + tokens_to_generate, as RULER's `length`


def _search(generate: Callable[[int], str], count: Callable[[str], int], budget: int, incremental: int) -> int:
    """RULER's binary search for the largest haystack whose prompt fits `budget` tokens."""
    sample = generate(incremental)
    per_unit = max(count(sample) / incremental, 1e-6)
    lower, upper = incremental, max(int((budget / per_unit) * 3), incremental * 2)
    best = None
    while lower <= upper:
        mid = (lower + upper) // 2
        if count(generate(mid)) <= budget:
            best, lower = mid, mid + 1
        else:
            upper = mid - 1
    return best if best is not None else incremental


def generate_examples(task_name: str, length: int, num_samples: int, tokenizer: Any, seed: int,
                      essay: list[str] | None = None) -> list[RulerExample]:
    """`num_samples` prompts of at most `length` tokens (prompt + tokens_to_generate)."""
    task = TASKS[task_name]
    rng = random.Random(task_seed(seed, task_name, length))

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    gen_tokens = task.tokens_to_generate
    examples = []
    if task.kind == "niah":
        gen = NiahGenerator(task, rng, essay)
        haystack = task.args["type_haystack"]
        if haystack == "essay":  # RULER's 500 words overshoot lengths below 4K: scale the step down
            incremental = 500 if length >= 4096 else max(10, length // 16)
        else:
            incremental = 5 if length < 4096 else 25
        n = _search(lambda m: gen(m, seed)[0], count, length - gen_tokens, incremental)
        prefix_head = NIAH_ANSWER_PREFIX[:10]
        for index in range(num_samples):
            used = n
            while True:
                text, answers = gen(used, seed)
                tokens = count(text) + gen_tokens
                if tokens <= length or used <= incremental:
                    break
                used -= incremental
            cut = text.rfind(prefix_head)
            examples.append(RulerExample(task_name, length, index, text[:cut], text[cut:], answers, tokens))
    else:
        gen_vt = VtGenerator(task, rng)
        # the in-context example: a small instance with 12345 and 3-letter names, <= 500 tokens
        icl_n = _search(lambda m: gen_vt(m, is_icl=True)[0], count, 500, 5)
        icl_text, icl_out = gen_vt(icl_n, is_icl=True)
        icl = icl_text + " " + " ".join(icl_out) + "\n"
        icl_tokens = count(icl)
        incremental = 5 if length < 4096 else 10
        n = _search(lambda m: gen_vt(m)[0], count, length - gen_tokens - icl_tokens, incremental)
        prefix_head = VT_ANSWER_PREFIX[:10]
        for index in range(num_samples):
            used = n
            while True:
                text, answers = gen_vt(used)
                text = gen_vt.randomize_icl(icl) + "\n" + text
                tokens = count(text) + gen_tokens
                if tokens <= length or used <= incremental:
                    break
                used -= incremental
            cut = text.rfind(prefix_head)
            examples.append(RulerExample(task_name, length, index, text[:cut], text[cut:], list(answers), tokens))
    return examples


# --- scoring ---------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(pred: str) -> str:
    """RULER evaluate.py: strip, control characters -> newline, strip."""
    return _CONTROL.sub("\n", pred.strip()).strip()


def match_all(pred: str, refs: list[str]) -> float:
    """Per-example string_match_all: the share of references found (case-insensitive)."""
    return sum(1.0 if r.lower() in pred.lower() else 0.0 for r in refs) / len(refs)


def string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    score = sum(match_all(p, r) for p, r in zip(preds, refs)) / len(preds) * 100
    return round(score, 2)


def string_match_part(preds: list[str], refs: list[list[str]]) -> float:
    score = sum(max(1.0 if r.lower() in p.lower() else 0.0 for r in ref) for p, ref in zip(preds, refs)) / len(preds) * 100
    return round(score, 2)
