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

Two controls score CEPE with the decoder tokens of one window and the encoder context of
another held-out window of the same length (`pair_windows`, deterministic and seeded):
- `other-document`: a window of the same source from another document (for a source whose
  windows all come from one document: a window of its other half, windows from the first half
  paired with windows from the second), so only the document differs, not the domain;
- `other-source`: a window of a different source.
A window without such a partner is left out of that control (counted as `unpaired`).

The score is PPL = exp(mean over windows of the mean NLL of the last `eval_window` (256) tokens).
Every difference against CEPE carries a 95% bootstrap interval over windows, and the context use
(`CONTEXT_USE`) is reported pooled and per source (`summarize`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from pipeline.errors import CepeError

VARIANTS = ("cepe", "decoder-only", "full-context")  # each scores a window on its own tokens
CONTROLS = ("other-document", "other-source")  # CEPE reading another window's context
BASELINES = ("decoder-only", "full-context") + CONTROLS
PAIRING_RULES = {
    "other-document": "window j reads the encoder context of a window drawn (random.Random(f'{seed}:other-document:"
                      "{total}'), in window order) from the windows of j's source whose document differs from j's; "
                      "for a source with one document, from the windows of the other half of that document (windows "
                      "wholly in the first half pair with windows wholly in the second); none: unpaired",
    "other-source": "window j reads the encoder context of a window drawn (random.Random(f'{seed}:other-source:{total}'), "
                    "in window order) from the windows of every other source; none: unpaired",
}
CONTEXT_USE = ("(NLL CEPE with another document's context - NLL CEPE with its own) / (NLL decoder alone - NLL "
               "full attention over the same window), means over the windows with a same-source other-document "
               "partner and a full-attention score")
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
        check_length(text, total, dec, ":" in text, decoder_len, chunk_len, eval_window)
        specs.append(LengthSpec(total, dec))
    if not specs:
        raise CepeError("lengths: at least one length is required")
    return specs


def check_length(text: str, total: int, dec: int, explicit: bool, decoder_len: int, chunk_len: int,
                 eval_window: int) -> None:
    """One `lengths` item's geometry, explained in the user's numbers when it cannot work.

    A window is TOTAL tokens: the last DECODER go to the decoder, which scores its last
    `eval_window` (each needs one token before it, so DECODER > eval_window), and the
    TOTAL - DECODER before them go to the encoder in whole `chunk_len` chunks.

    Raises:
        CepeError: what was typed, what is allowed and why, with lengths that would work.
    """
    where = "" if explicit else f" (decoder_len {decoder_len})"
    examples = "e.g. " + " or ".join(repr(x) for x in _working_lengths(total, dec, decoder_len, chunk_len, eval_window))
    if total < 1 or dec < 1:
        raise CepeError(f"lengths: {text!r}: expected positive token counts, TOTAL or TOTAL:DECODER ({examples})")
    if dec <= eval_window:
        raise CepeError(
            f"lengths: {text!r} gives the decoder {dec} tokens{where}, but it scores its last {eval_window} "
            f"(eval_window), which needs at least {eval_window + 1} (the first token has no prediction); "
            f"give the decoder more ({examples}) or lower --eval-window")
    if total < dec:
        raise CepeError(
            f"lengths: {text!r} is {total} tokens in all, fewer than the decoder's {dec}{where}; TOTAL holds "
            f"the decoder's tokens plus the encoder's chunks of {chunk_len} (chunk_len) before them ({examples})")
    if (total - dec) % chunk_len:
        raise CepeError(
            f"lengths: {text!r} leaves {total - dec} tokens before the decoder's {dec}{where}, not a whole number "
            f"of {chunk_len}-token encoder chunks (chunk_len); TOTAL - DECODER must be a multiple of {chunk_len} "
            f"({examples})")


def _working_lengths(total: int, dec: int, decoder_len: int, chunk_len: int, eval_window: int) -> list[str]:
    """Items close to what was typed that pass `check_length`: the typed decoder with one encoder
    chunk, and the typed total with the smallest decoder that fits it."""
    d0 = max(dec, eval_window + 1)
    out = [f"{d0 + chunk_len}" if d0 == decoder_len else f"{d0 + chunk_len}:{d0}"]
    if total > eval_window:
        d = eval_window + 1 + (total - eval_window - 1) % chunk_len
        if d != dec:
            out.append(f"{total}:{d}")
    return out


# --- documents -------------------------------------------------------------------------------


class Doc(NamedTuple):
    """One evaluation document: its id, its text (as read) or token ids (once tokenized), the
    source it belongs to (its `domain` field, else `source`, else the file's name) and whether
    that source was held out of training (`heldout_source`, as `prepare-data`'s export writes)."""

    doc_id: str
    tokens: Any
    source: str = ""
    heldout: bool = False
    document: str | None = None  # the document a prepare-data row came from (None: this Doc is one)


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


def _file_stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return name


def read_documents(source: str) -> tuple[list[Doc], str, list[str]]:
    """([Doc with text], sha256 over the files read, file names) from jsonl(.gz) with a `text` field."""
    docs: list[Doc] = []
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
            src = row.get("domain") or row.get("source") or _file_stem(path)
            docs.append(Doc(str(row.get("id", f"{path.name}:{lineno}")), row["text"], str(src),
                            bool(row.get("heldout_source", False))))
    return docs, digest.hexdigest(), [str(p) for p in files]


def tokenize_documents(docs: list[Any], tokenizer: Any, min_tokens: int) -> list[Doc]:
    """Token ids per document (no BOS/EOS: windows are slices of running text), long ones only.

    Texts shorter than `min_tokens / 8` characters are skipped untokenized: even a byte-level
    tokenizer makes at most 4 tokens of one character, so they cannot reach `min_tokens`.
    """
    out = []
    for item in docs:
        doc = Doc(*item)
        if len(doc.tokens) * 8 < min_tokens:
            continue
        ids = tokenizer(doc.tokens, add_special_tokens=False)["input_ids"]
        if len(ids) >= min_tokens:
            out.append(doc._replace(tokens=list(ids)))
    return out


def make_windows(docs: list[Any], total: int, stride: int, max_windows: int | None,
                 max_windows_per_doc: int | None, seed: int, max_windows_per_source: int | None = None) -> list[tuple[int, int]]:
    """(document index, start) of each window: starts 0, stride, 2*stride... while the window fits;
    the first `max_windows_per_doc` per document; a seeded random `max_windows_per_source` of each
    source's (so a source of long documents does not crowd out the others); a seeded random
    `max_windows` of all; in order."""
    windows = []
    for d, doc in enumerate(docs):
        ids = doc[1]
        starts = list(range(0, len(ids) - total + 1, stride))
        if max_windows_per_doc is not None:
            starts = starts[:max_windows_per_doc]
        windows.extend((d, s) for s in starts)
    if max_windows_per_source is not None:
        by_source: dict[str, list[tuple[int, int]]] = {}
        for w in windows:
            by_source.setdefault(Doc(*docs[w[0]]).source, []).append(w)
        windows = sorted(w for src, ws in by_source.items()
                         for w in (random.Random(f"{seed}:{src}").sample(ws, max_windows_per_source)
                                   if len(ws) > max_windows_per_source else ws))
    if max_windows is not None and len(windows) > max_windows:
        windows = sorted(random.Random(seed).sample(windows, max_windows))
    return windows


# --- prepared shards ------------------------------------------------------------------------


def is_shard_dir(source: str) -> bool:
    return bool(source) and (Path(source) / "manifest.json").is_file()


def shard_windows(root: str, split: str, max_windows: int | None, seed: int) -> tuple[list[Doc], list[LengthSpec], str, int]:
    """Windows from a `cepe prepare-data` shard directory (docs/architecture.md "Shards").

    Each row is one window: its `encoder_input_ids` (n_chunks, chunk_len) followed by its
    `input_ids` (decoder_len). For the `concat` layout that is one contiguous stretch of text;
    for `prevdoc` the context comes from the previous document, and the full-context baseline
    reads it the same way (the paper's `put_in_decoder`). Returns ([Doc per row, its source the
    row's domain], [spec],
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
        docs.append(Doc(f"{row['doc_id']}#{i}", tokens.tolist(), str(row.get("domain") or ""),
                        document=str(row["doc_id"])))
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


def score_windows(model: Any, docs: list[Any], windows: list[tuple[int, int]], spec: LengthSpec,
                  variant: str, eval_window: int, chunk_len: int, batch_size: int, progress: bool = True,
                  context_windows: list[tuple[int, int]] | None = None) -> list[float]:
    """Per-window mean NLL for one length and one variant, in window order.

    context_windows (variant `cepe` only): window i's encoder reads the context (first
    T - D tokens) of context_windows[i] instead of its own: the mismatched-context controls.
    """
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    nlls: list[float] = []
    if context_windows is not None and (variant != "cepe" or len(context_windows) != len(windows)):
        raise ValueError("context_windows: one per window, for the cepe variant only")
    label = variant if context_windows is None else "cepe, another window's context"
    bar = tqdm(total=len(windows), desc=f"ppl {spec.total} {label}", unit="win", disable=not progress, dynamic_ncols=True)
    for i in range(0, len(windows), max(1, batch_size)):
        rows = [docs[d][1][s : s + spec.total] for d, s in windows[i : i + batch_size]]
        full = torch.tensor(rows, dtype=torch.long, device=device)  # (B, T)
        if context_windows is not None:  # the encoder part of each row from its partner window
            ctx = [docs[d][1][s : s + spec.encoder] for d, s in context_windows[i : i + batch_size]]
            full = torch.cat([torch.tensor(ctx, dtype=torch.long, device=device).reshape(len(rows), spec.encoder),
                              full[:, spec.encoder :]], dim=1)  # (B, T): partner's context ++ own decoder tokens
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


# --- mismatched-context controls -------------------------------------------------------------


def pair_windows(docs: list[Any], windows: list[tuple[int, int]], total: int, control: str,
                 seed: int) -> tuple[list[int | None], dict[str, int]]:
    """The partner (an index into `windows`) whose context each window reads in `control`
    (PAIRING_RULES), or None; and the pair counts by kind.

    A document is identified by its index in `docs` (for prepare-data rows, by the row's
    `doc_id`). Deterministic: the same windows and seed give the same pairs.
    """
    if control not in CONTROLS:
        raise CepeError(f"baselines: unknown control {control!r} (known: {', '.join(CONTROLS)})")
    labels = [Doc(*docs[d]) for d, _ in windows]
    source = [doc.source for doc in labels]
    document = [doc.document if doc.document is not None else d for doc, (d, _) in zip(labels, windows)]
    by_source: dict[str, list[int]] = {}
    for j, src in enumerate(source):
        by_source.setdefault(src, []).append(j)
    rng = random.Random(f"{seed}:{control}:{total}")
    partners: list[int | None] = []
    counts = {"same_source_other_document": 0, "same_document_other_half": 0, "other_source": 0, "unpaired": 0}
    for j, (d, start) in enumerate(windows):
        if control == "other-source":
            candidates = [k for k in range(len(windows)) if source[k] != source[j]]
            kind = "other_source"
        else:
            same = by_source[source[j]]
            candidates = [k for k in same if document[k] != document[j]]
            kind = "same_source_other_document"
            if not candidates and len({document[k] for k in same}) == 1:
                # one document in this source: its first half against its second half
                half = len(docs[d][1]) // 2
                side = 0 if start + total <= half else 1 if start >= half else None
                candidates = [] if side is None else [
                    k for k in same if (windows[k][1] >= half if side == 0 else windows[k][1] + total <= half)]
                kind = "same_document_other_half"
        if candidates:
            partners.append(rng.choice(candidates))
            counts[kind] += 1
        else:
            partners.append(None)
            counts["unpaired"] += 1
    return partners, counts


def summarize(nlls: dict[str, list[float | None]], sources: list[str], heldout: dict[str, bool],
              samples: int, seed: int) -> dict[str, Any]:
    """Differences against CEPE and the context use for one length, pooled and per source.

    nlls: {variant: per-window NLL in window order, None where the variant did not score that
    window (no partner, or no full-context score)}. Returns {"differences": {variant: ...},
    "context_use": ..., "by_source": {source: {"heldout_source", "n_windows", "ppl": {...},
    "context_use"}}}, intervals from `bootstrap` (95%, resampling windows, seeded).
    """
    from pipeline.evaluate import bootstrap

    kw = {"samples": samples, "seed": seed}
    cepe = nlls.get("cepe")

    def rows(names: tuple[str, ...], keep: list[int]) -> list[list[float]] | None:
        if any(n not in nlls for n in names):
            return None
        idx = [i for i in keep if all(nlls[n][i] is not None for n in names)]
        return [[nlls[n][i] for i in idx] for n in names] if idx else None

    def context_use(keep: list[int]) -> dict[str, Any] | None:
        cols = rows(("cepe", "other-document", "decoder-only", "full-context"), keep)
        return bootstrap.ratio_of_mean_gains(*cols, **kw) if cols else None

    everyone = list(range(len(sources)))
    out: dict[str, Any] = {"differences": {}, "context_use": None, "by_source": {}}
    if cepe is None:
        return out
    for variant in nlls:
        if variant != "cepe":
            cols = rows((variant, "cepe"), everyone)
            if cols:
                out["differences"][variant] = bootstrap.mean_difference(*cols, **kw)
    out["context_use"] = context_use(everyone)
    for src in sorted(set(sources)):
        keep = [i for i, s in enumerate(sources) if s == src]
        entry: dict[str, Any] = {"heldout_source": bool(heldout.get(src)), "n_windows": len(keep), "ppl": {}}
        for variant, values in nlls.items():
            mine = [values[i] for i in keep if values[i] is not None]
            entry["ppl"][variant] = round(perplexity(mine), 4) if mine else None
        entry["context_use"] = context_use(keep)
        out["by_source"][src] = entry
    return out


def perplexity(nlls: Iterable[float]) -> float:
    """exp(mean over windows of the per-window mean NLL)."""
    values = list(nlls)
    return math.exp(sum(values) / len(values)) if values else float("nan")


def variants_for(cepe: bool, baselines: list[str]) -> list[str]:
    """The variants a run scores, in BASELINES order (the controls only for a CEPE model)."""
    for name in baselines:
        if name not in BASELINES:
            raise CepeError(f"baselines: unknown baseline {name!r} (known: {', '.join(BASELINES)})")
    return (["cepe"] if cepe else []) + [b for b in BASELINES if b in baselines and (cepe or b not in CONTROLS)]


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
