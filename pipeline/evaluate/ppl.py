"""Long-context perplexity: CEPE's own LM protocol (evaluation.md 1.1) and its baselines.

Windows: long documents are tokenized with the evaluated model's tokenizer (no special tokens),
kept if they have at least `min_doc_tokens` tokens (default: the longest requested total, so
every length reads the same documents), and cut into windows of the total length starting at
0, 256, 512, ... (stride 256). At most `max_windows` windows per length are kept, a seeded random
choice when there are more (the paper caps at 5000; at 128K, one window per document over 10
documents: `max_windows_per_doc=1`, `max_windows=10`).

Each window of total length T with decoder length D is scored three ways, on the same tokens:
- `cepe`: the last D tokens go to the decoder, the T - D before them to the encoder as
  (T - D) / 256 chunks of 256 tokens (CEPE models only);
- `decoder-only`: the decoder alone on its own last D tokens (truncated context; for a CEPE
  model this is the wrapped decoder with no encoder input, which is the plain decoder);
- `full-context`: the decoder with the whole window, when T fits its position limit.

The score is PPL = exp(mean over windows of the mean NLL of the last `eval_window` (256) tokens).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from pipeline.errors import CepeError

VARIANTS = ("cepe", "decoder-only", "full-context")
BASELINES = ("decoder-only", "full-context")
PAPER_LENGTHS = ["4096:2048", "8192:4096", "32768:4096", "131072:4096"]
CORPUS_DIR = Path(__file__).resolve().parent.parent / "resources" / "corpus"


@dataclass(frozen=True)
class LengthSpec:
    total: int
    decoder: int

    @property
    def encoder(self) -> int:
        return self.total - self.decoder

    @property
    def label(self) -> str:
        return f"{self.total}"


def parse_lengths(items: list[str], decoder_len: int, chunk_len: int, eval_window: int) -> list[LengthSpec]:
    """"TOTAL" or "TOTAL:DECODER" items -> specs, validated (encoder part a whole number of chunks)."""
    specs = []
    for item in items:
        text = str(item).strip()
        try:
            if ":" in text:
                total_s, dec_s = text.split(":", 1)
                total, dec = int(total_s), int(dec_s)
            else:
                total, dec = int(text), decoder_len
        except ValueError:
            raise CepeError(f"lengths: expected TOTAL or TOTAL:DECODER tokens, got {item!r}") from None
        if dec < eval_window + 1 or total < dec:
            raise CepeError(f"lengths: {item!r} needs {eval_window + 1} <= decoder <= total")
        if (total - dec) % chunk_len:
            raise CepeError(f"lengths: {item!r}: encoder part {total - dec} is not a multiple of chunk_len {chunk_len}")
        specs.append(LengthSpec(total, dec))
    if not specs:
        raise CepeError("lengths: at least one length is required")
    return specs


# --- documents -------------------------------------------------------------------------------


def _document_files(source: str) -> list[Path]:
    root = CORPUS_DIR if source in ("", "embedded") else Path(source)
    if root.is_file():
        return [root]
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.name.endswith((".jsonl", ".jsonl.gz")))
        if files:
            return files
        raise CepeError(f"data: {root} has no *.jsonl or *.jsonl.gz documents")
    if source in ("", "embedded"):
        raise CepeError(f"data: the embedded corpus is missing ({root}); pass --data with *.jsonl(.gz) documents")
    raise CepeError(f"data: {root} does not exist")


def read_documents(source: str) -> tuple[list[tuple[str, str]], str, list[str]]:
    """([(doc_id, text)], sha256 over the files read, file names) from jsonl(.gz) with a `text` field."""
    docs: list[tuple[str, str]] = []
    digest = hashlib.sha256()
    files = _document_files(source)
    for path in files:
        raw = path.read_bytes()
        digest.update(raw)
        data = gzip.decompress(raw) if path.name.endswith(".gz") else raw
        for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CepeError(f"{path} line {lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise CepeError(f"{path} line {lineno}: expected an object with a 'text' string")
            docs.append((str(row.get("id", f"{path.name}:{lineno}")), row["text"]))
    return docs, digest.hexdigest(), [str(p) for p in files]


def tokenize_documents(docs: list[tuple[str, str]], tokenizer: Any, min_tokens: int) -> list[tuple[str, list[int]]]:
    """Token ids per document (no BOS/EOS: windows are slices of running text), long ones only.

    Texts shorter than `min_tokens / 8` characters are skipped untokenized: even a byte-level
    tokenizer makes at most 4 tokens of one character, so they cannot reach `min_tokens`.
    """
    out = []
    for doc_id, text in docs:
        if len(text) * 8 < min_tokens:
            continue
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= min_tokens:
            out.append((doc_id, list(ids)))
    return out


def make_windows(docs: list[tuple[str, list[int]]], total: int, stride: int, max_windows: int | None,
                 max_windows_per_doc: int | None, seed: int) -> list[tuple[int, int]]:
    """(document index, start) of each window: starts 0, stride, 2*stride... while the window fits;
    the first `max_windows_per_doc` per document; a seeded random `max_windows` of all, in order."""
    windows = []
    for d, (_, ids) in enumerate(docs):
        starts = list(range(0, len(ids) - total + 1, stride))
        if max_windows_per_doc is not None:
            starts = starts[:max_windows_per_doc]
        windows.extend((d, s) for s in starts)
    if max_windows is not None and len(windows) > max_windows:
        windows = sorted(random.Random(seed).sample(windows, max_windows))
    return windows


# --- prepared shards ------------------------------------------------------------------------


def is_shard_dir(source: str) -> bool:
    return bool(source) and (Path(source) / "manifest.json").is_file()


def shard_windows(root: str, split: str, max_windows: int | None, seed: int) -> tuple[list[tuple[str, list[int]]], list[LengthSpec], str, int]:
    """Windows from a `cepe prepare-data` shard directory (docs/architecture.md "Shards").

    Each row is one window: its `encoder_input_ids` (n_chunks, chunk_len) followed by its
    `input_ids` (decoder_len). For the `concat` layout that is one contiguous stretch of text;
    for `prevdoc` the context comes from the previous document, and the full-context baseline
    reads it the same way (the paper's `put_in_decoder`). Returns ([(doc_id, tokens)], [spec],
    the manifest's fingerprint or sha256, the shards' chunk length).
    """
    import numpy as np

    from pipeline.data.shards import ShardDataset

    ds = ShardDataset(root, split)
    if ds.encoder_shape is None:
        raise CepeError(f"data: {root} holds mlm windows without encoder context; ppl needs prevdoc or concat shards")
    n, chunk = ds.encoder_shape
    indices = list(range(len(ds)))
    if max_windows is not None and len(indices) > max_windows:
        indices = sorted(random.Random(seed).sample(indices, max_windows))
    docs = []
    for i in indices:
        row = ds[i]
        tokens = np.concatenate([row["encoder_input_ids"].reshape(-1), row["input_ids"]]).astype(np.int64)
        docs.append((f"{row['doc_id']}#{i}", tokens.tolist()))
    if not docs:
        raise CepeError(f"data: split {split!r} of {root} has no windows")
    manifest = ds.manifest
    digest = str(manifest.get("fingerprint") or hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest())
    return docs, [LengthSpec(n * chunk + ds.input_width, ds.input_width)], digest, chunk


# --- scoring ---------------------------------------------------------------------------------


def window_nll(model: Any, decoder_ids: Any, eval_window: int, encoder_ids: Any = None, encoder_mask: Any = None) -> Any:
    """Mean NLL (nats) of the last `eval_window` tokens of each row of `decoder_ids` (B, T).

    Only the last `eval_window + 1` logits are computed (`logits_to_keep`): position t predicts
    token t + 1, so logits[-eval_window - 1 : -1] score tokens[-eval_window:]. fp32 log-softmax.
    encoder_ids: (B, n, chunk_len) context chunks for a CEPE model, or None; encoder_mask: their
    0/1 mask (default all ones: full chunks).
    """
    import torch

    kwargs: dict[str, Any] = {"input_ids": decoder_ids, "logits_to_keep": eval_window + 1, "use_cache": False}
    if encoder_ids is not None:
        kwargs["encoder_input_ids"] = encoder_ids
        kwargs["encoder_attention_mask"] = torch.ones_like(encoder_ids) if encoder_mask is None else encoder_mask
    with torch.inference_mode():
        logits = model(**kwargs).logits[:, -eval_window - 1 : -1].float()  # (B, W, V)
        targets = decoder_ids[:, -eval_window:]  # (B, W)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    return (-logp).mean(dim=-1).cpu()


def score_windows(model: Any, docs: list[tuple[str, list[int]]], windows: list[tuple[int, int]], spec: LengthSpec,
                  variant: str, eval_window: int, chunk_len: int, batch_size: int, progress: bool = True) -> list[float]:
    """Per-window mean NLL for one length and one variant, in window order."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    nlls: list[float] = []
    bar = tqdm(total=len(windows), desc=f"ppl {spec.total} {variant}", unit="win", disable=not progress, dynamic_ncols=True)
    for i in range(0, len(windows), max(1, batch_size)):
        rows = [docs[d][1][s : s + spec.total] for d, s in windows[i : i + batch_size]]
        full = torch.tensor(rows, dtype=torch.long, device=device)  # (B, T)
        if variant == "full-context":
            nll = window_nll(model, full, eval_window)
        elif variant == "decoder-only":
            nll = window_nll(model, full[:, spec.encoder :], eval_window)
        elif variant == "cepe":
            enc = full[:, : spec.encoder].reshape(full.shape[0], spec.encoder // chunk_len, chunk_len)  # (B, n, L)
            nll = window_nll(model, full[:, spec.encoder :], eval_window, enc if spec.encoder else None)
        else:
            raise CepeError(f"baselines: unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
        nlls.extend(float(x) for x in nll)
        bar.update(len(rows))
    bar.close()
    return nlls


def perplexity(nlls: Iterable[float]) -> float:
    """exp(mean over windows of the per-window mean NLL)."""
    values = list(nlls)
    return math.exp(sum(values) / len(values)) if values else float("nan")


def variants_for(cepe: bool, baselines: list[str]) -> list[str]:
    for name in baselines:
        if name not in BASELINES:
            raise CepeError(f"baselines: unknown baseline {name!r} (known: {', '.join(BASELINES)})")
    return (["cepe"] if cepe else []) + [b for b in BASELINES if b in baselines]


def markdown_table(results: dict[str, dict[str, dict[str, Any]]], variants: list[str]) -> str:
    """One row per length, one column per variant: PPL (windows)."""
    head = "| total (E+D) | " + " | ".join(variants) + " |"
    lines = [head, "|" + "---|" * (len(variants) + 1)]
    for label, row in results.items():
        cells = []
        for v in variants:
            r = row.get(v)
            if r is None or r.get("ppl") is None:
                cells.append("–")
            else:
                cells.append(f"{r['ppl']:.3f} ({r['n_windows']})")
        first = next(iter(row.values()), {})
        lines.append(f"| {label} ({first.get('encoder_tokens', '?')}+{first.get('decoder_tokens', '?')}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
