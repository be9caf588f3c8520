"""Retrieval-augmented language modelling (evaluation.md 1.2): retrieved passages as CEPE's context.

Windows are the ppl task's (`pipeline/evaluate/ppl.py`: documents tokenized with the model's
tokenizer, windows of `decoder_len` tokens at stride `stride`, a seeded `max_windows` of them).
The window's tokens before its scored part (the first `decoder_len - eval_window`) are the query,
decoded to text; the index (`cepe index`, pipeline/evaluate/retrieval.py) returns its top
passages, never one of the window's own document (same doc_key): a window cannot read its own
text back from the index (a copy of it in another document still can). Each window is scored
on its last `eval_window` tokens, for every k in `ralm_passages`:

- `cepe` (CEPE models): the window in the decoder, the top-k passages in the encoder, one
  passage per chunk (k = 0: the decoder alone);
- `in-decoder`: the top-k passages concatenated before the window in the decoder (the best one
  nearest the window), skipped where k passages + the window exceed the decoder's positions
  (k = 0: the decoder alone again).

PPL = exp(mean over windows of the mean NLL of the scored tokens), as the ppl task.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import CepeError
from pipeline.evaluate.ppl import perplexity, window_nll
from pipeline.evaluate.retrieval import Hit, PassageIndex

VARIANTS = ("cepe", "in-decoder")


def queries_for(docs: list[tuple[str, list[int]]], windows: list[tuple[int, int]], decoder_len: int,
                eval_window: int, tokenizer: Any) -> list[str]:
    """The query text of each window: its tokens before the scored part, decoded."""
    q = decoder_len - eval_window
    return [tokenizer.decode(docs[d][1][s : s + q], skip_special_tokens=True) for d, s in windows]


def score(model: Any, docs: list[tuple[str, list[int]]], windows: list[tuple[int, int]], hits: list[list[Hit]],
          index: PassageIndex, k: int, variant: str, decoder_len: int, eval_window: int, chunk_len: int,
          batch_size: int, pad_id: int) -> list[float]:
    """Per-window mean NLL for one k and one variant, in window order."""
    import torch

    device = next(model.parameters()).device
    nlls: list[float | None] = [None] * len(windows)
    if variant == "in-decoder" or k == 0:
        for i, (d, s) in enumerate(windows):  # one at a time: the rows differ in length
            context = [t for h in reversed(hits[i][:k]) for t in index.passage_ids(h.index)]
            row = torch.tensor([context + docs[d][1][s : s + decoder_len]], dtype=torch.long, device=device)  # (1, T)
            nlls[i] = float(window_nll(model, row, eval_window)[0])
        return [float(x) for x in nlls]  # type: ignore[arg-type]
    if variant != "cepe":
        raise CepeError(f"ralm: unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    # windows with the same number of passages batch together (an all-padding chunk has no key)
    groups: dict[int, list[int]] = {}
    for i in range(len(windows)):
        groups.setdefault(min(k, len(hits[i])), []).append(i)
    for n, members in groups.items():
        for start in range(0, len(members), max(1, batch_size)):
            batch = members[start : start + batch_size]
            dec = torch.tensor([docs[windows[i][0]][1][windows[i][1] : windows[i][1] + decoder_len] for i in batch],
                               dtype=torch.long, device=device)  # (B, D)
            if n == 0:
                nll = window_nll(model, dec, eval_window)
            else:
                enc = torch.full((len(batch), n, chunk_len), pad_id, dtype=torch.long)  # (B, n, L)
                mask = torch.zeros_like(enc)
                for b, i in enumerate(batch):
                    for j, h in enumerate(hits[i][:n]):
                        ids = index.passage_ids(h.index)[:chunk_len]
                        enc[b, j, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                        mask[b, j, : len(ids)] = 1
                nll = window_nll(model, dec, eval_window, enc.to(device), mask.to(device))
            for i, x in zip(batch, nll):
                nlls[i] = float(x)
    return [float(x) for x in nlls]  # type: ignore[arg-type]


def summarize(nlls: list[float], k: int, hits: list[list[Hit]]) -> dict[str, Any]:
    mean = sum(nlls) / len(nlls)
    return {"ppl": round(perplexity(nlls), 4), "nll": round(mean, 6), "n_windows": len(nlls),
            "passages_mean": round(sum(min(k, len(h)) for h in hits) / max(len(hits), 1), 2)}


def markdown_table(results: dict[str, dict[str, Any]], variants: list[str]) -> str:
    """One row per k, one column per variant: PPL (windows)."""
    lines = ["| passages | " + " | ".join(variants) + " |", "|" + "---|" * (len(variants) + 1)]
    for k, row in results.items():
        cells = []
        for v in variants:
            r = row.get(v)
            cells.append("–" if not r or r.get("ppl") is None else f"{r['ppl']:.3f} ({r['n_windows']})")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
