"""The expensive teacher pass: read data windows, run the teacher, write top-k shards.

Separate from the stage (`pipeline.stages.teacher_logits`) so that tests and the GPU experiment
script can run it on any map-style dataset with a known shard structure.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pipeline.train.teacher import IDS, PROBS, ROW_HASH, TAIL, teacher_row, teacher_topk
from pipeline.train.teacher_shards import write_logits_shard


def _chunks(model: Any, examples: Any, start: int, rows: int, *, context_len: int, decoder_len: int, k: int,
            temperature: float, batch_size: int, pad_token_id: int, stats: dict[str, float],
            progress: Any = None) -> Iterator[dict[str, np.ndarray]]:
    for lo in range(start, start + rows, batch_size):
        hi = min(lo + batch_size, start + rows)
        built = []
        for i in range(lo, hi):
            ex = examples[i]
            built.append(teacher_row(ex["input_ids"], ex["encoder_input_ids"], context_len, decoder_len,
                                     ex.get("encoder_attention_mask"), pad_token_id))
        ids = torch.from_numpy(np.stack([r.input_ids for r in built]))
        mask = torch.from_numpy(np.stack([r.attention_mask for r in built]))
        out = teacher_topk(model, ids, mask, decoder_len, k, temperature)
        stats["nll_sum"] += float(out["nll"].double().sum())
        stats["tokens"] += (decoder_len - 1) * len(built)
        stats["tail_sum"] += float(out[TAIL].double().sum())
        stats["positions"] += decoder_len * len(built)
        if progress is not None:
            progress.update(len(built))
        yield {
            PROBS: out[PROBS].cpu().numpy(),
            IDS: out[IDS].cpu().numpy(),
            TAIL: out[TAIL].cpu().numpy(),
            ROW_HASH: np.array([r.hash for r in built], dtype=np.int64),
        }


def compute_split(
    model: Any,
    examples: Any,
    shards: Sequence[tuple[str, int]],
    out_dir: str | os.PathLike[str],
    *,
    context_len: int,
    decoder_len: int,
    k: int,
    temperature: float = 1.0,
    batch_size: int = 1,
    pad_token_id: int = 0,
    progress: bool = True,
    desc: str = "teacher",
) -> dict[str, Any]:
    """Write `out_dir/<file>` for each `(file, rows)` data shard, rows taken from `examples` in order.

    Args:
        examples: map-style dataset whose rows are the shards' rows back to back (global index).
        shards: the data split's shard files and row counts, in reading order.

    Returns:
        the manifest entry of the split (`rows`, `shards`) plus the teacher's statistics on the
        decoder positions: `teacher_nll` (mean next-token NLL), `teacher_ppl`, `mean_tail` (the
        average probability mass outside the top-k), `seconds`.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(r for _, r in shards)
    stats = {"nll_sum": 0.0, "tokens": 0.0, "tail_sum": 0.0, "positions": 0.0}
    t0 = time.perf_counter()
    written = []
    start = 0
    with tqdm(total=total, desc=desc, unit="win", disable=not progress, dynamic_ncols=True) as bar:
        for name, rows in shards:
            got = write_logits_shard(out / name, decoder_len, k, _chunks(
                model, examples, start, rows, context_len=context_len, decoder_len=decoder_len, k=k,
                temperature=temperature, batch_size=batch_size, pad_token_id=pad_token_id, stats=stats,
                progress=bar))
            written.append({"file": name, "rows": got})
            start += rows
    nll = stats["nll_sum"] / stats["tokens"] if stats["tokens"] else float("nan")
    return {
        "rows": total,
        "shards": written,
        "teacher_nll": nll,
        "teacher_ppl": math.exp(nll) if stats["tokens"] else float("nan"),
        "mean_tail": stats["tail_sum"] / stats["positions"] if stats["positions"] else float("nan"),
        "seconds": time.perf_counter() - t0,
    }
