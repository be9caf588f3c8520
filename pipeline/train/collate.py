"""Batching shard examples for the loop: causal-LM/CEPE batches, MLM batches, context masking.

The loop hands a collate function a list of examples, each the dict a shard reader returns plus
two keys the loop adds: `_epoch` and `_index` (which pass over the data, which example). All
randomness here (MLM masks, the encoder-context robustness masking) is drawn from a generator
seeded by `(seed, purpose, epoch, index)`, never from a global RNG: an example is masked the
same way whichever process, worker or resumed run collates it, so a run killed and resumed sees
exactly the batches an uninterrupted run sees.

Extra per-example data (e.g. a teacher's top-k ids/probabilities for distillation) travels the
same way: give the loop a dataset whose examples carry the extra keys (`ZipDataset` joins
index-aligned datasets) and `collate_lm` stacks every array-valued key it does not know into a
(B, ...) tensor, unchanged.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.train.losses import IGNORE_INDEX, mask_for_mlm

PRIVATE_KEYS = ("_epoch", "_index")
_TEXT_KEYS = ("domain", "layout", "doc_id")


def example_rng(seed: int, purpose: str, example: dict[str, Any]) -> np.random.Generator:
    """A generator that depends only on (seed, purpose, epoch, index) of one example."""
    salt = zlib.crc32(purpose.encode())
    return np.random.default_rng([seed, salt, int(example.get("_epoch", 0)), int(example.get("_index", 0))])


@dataclass(frozen=True)
class ContextMasking:
    """Encoder-context robustness masking of docs/method.md §2.3 (CEPE `data.py`, `mask_prob`).

    For each chunk of each example draw u ~ U(0, 1): if u < `full_prob` the whole chunk is masked;
    elif u < `prob` a random suffix of n ~ U{1..L-1} tokens is masked; else the chunk is kept.
    "Masked" means `encoder_attention_mask` = 0 there: the encoder and the cross-attention ignore
    those tokens, as in the official code. The paper-code values are prob 0.3 and full_prob
    0.3 * 0.1 = 0.03.
    """

    prob: float = 0.3
    full_prob: float = 0.03
    seed: int = 0

    def apply(self, mask: np.ndarray, example: dict[str, Any]) -> np.ndarray:
        """Args: mask (n_chunks, L) of 0/1. Returns a masked copy."""
        rng = example_rng(self.seed, "context-mask", example)
        n_chunks, length = mask.shape
        out = mask.copy()
        u = rng.random(n_chunks)
        suffix = rng.integers(1, max(length, 2), size=n_chunks)  # n ~ U{1..L-1}
        for i in range(n_chunks):
            if u[i] < self.full_prob:
                out[i] = 0
            elif u[i] < self.prob:
                out[i, length - suffix[i] :] = 0
        return out


def _stack(values: list[Any], dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.as_tensor(np.stack([np.asarray(v) for v in values]), dtype=dtype)


def collate_lm(
    examples: Sequence[dict[str, Any]],
    *,
    context_masking: ContextMasking | None = None,
    eval_last: int | None = None,
    use_encoder: bool = True,
) -> dict[str, torch.Tensor]:
    """Stack decoder windows (and their encoder chunks) into a CEPE batch.

    Args:
        examples: dicts with `input_ids` (T,) and optionally `encoder_input_ids` (n, L),
            `attention_mask` (T,), `encoder_attention_mask` (n, L), and any extra arrays.
        context_masking: robustness masking of the encoder input (training only).
        eval_last: score only the last `eval_last` tokens (validation); None scores all.
        use_encoder: False drops the encoder input (the decoder-alone baseline).

    Returns:
        `input_ids` (B, T) int64, `attention_mask` (B, T), `labels` (B, T) with -100 on padding
        (and outside the eval window), `encoder_input_ids` (B, n, L), `encoder_attention_mask`
        (B, n, L), plus extra keys stacked as they are.
    """
    batch: dict[str, torch.Tensor] = {}
    input_ids = _stack([e["input_ids"] for e in examples], torch.long)  # (B, T)
    if "attention_mask" in examples[0]:
        attention = _stack([e["attention_mask"] for e in examples], torch.long)
    else:
        attention = torch.ones_like(input_ids)
    labels = input_ids.masked_fill(attention == 0, IGNORE_INDEX)
    if eval_last is not None:
        labels[:, : labels.shape[1] - eval_last] = IGNORE_INDEX
    batch.update(input_ids=input_ids, attention_mask=attention, labels=labels)

    if use_encoder and "encoder_input_ids" in examples[0]:
        enc_ids, enc_masks = [], []
        for e in examples:
            ids = np.asarray(e["encoder_input_ids"])  # (n, L)
            mask = np.asarray(e["encoder_attention_mask"]) if "encoder_attention_mask" in e else np.ones_like(ids)
            if context_masking is not None:
                mask = context_masking.apply(mask, e)
            enc_ids.append(ids)
            enc_masks.append(mask)
        batch["encoder_input_ids"] = _stack(enc_ids, torch.long)  # (B, n, L)
        batch["encoder_attention_mask"] = _stack(enc_masks, torch.long)  # (B, n, L)

    known = {"input_ids", "attention_mask", "encoder_input_ids", "encoder_attention_mask", "labels"}
    for key in examples[0]:
        if key in known or key in PRIVATE_KEYS or key in _TEXT_KEYS:
            continue
        value = examples[0][key]
        if isinstance(value, (np.ndarray, torch.Tensor, int, float, list)):
            batch[key] = _stack([e[key] for e in examples])
    return batch


@dataclass(frozen=True)
class MlmCollator:
    """Picklable MLM collate function (DataLoader workers need one): masks each example with
    its own seeded generator (see module docstring) and stacks them.

    Returns `input_ids` (B, T) with `[MASK]` substituted, `attention_mask` (B, T) and `labels`
    (B, T) holding the original ids at masked positions, -100 elsewhere.
    """

    mask_token_id: int
    special_ids: frozenset[int]
    probability: float = 0.3
    seed: int = 0

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, labels = [], []
        for e in examples:
            rng = example_rng(self.seed, "mlm", e)
            m, lab = mask_for_mlm(
                e["input_ids"], mask_token_id=self.mask_token_id, special_ids=self.special_ids,
                probability=self.probability, rng=rng,
            )
            ids.append(m)
            labels.append(lab)
        input_ids = _stack(ids, torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": _stack(labels, torch.long)}


@dataclass(frozen=True)
class LmCollator:
    """Picklable wrapper around `collate_lm` with fixed options."""

    context_masking: ContextMasking | None = None
    eval_last: int | None = None
    use_encoder: bool = True

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_lm(examples, context_masking=self.context_masking, eval_last=self.eval_last,
                          use_encoder=self.use_encoder)


class ZipDataset(torch.utils.data.Dataset):
    """Index-aligned datasets joined into one: example i is the merged dict of each dataset's
    example i (later datasets win on a clashing key). Used to attach precomputed per-example
    data, such as a teacher's top-k columns, to the shard examples."""

    def __init__(self, *datasets: Any):
        lengths = {len(d) for d in datasets}
        if len(lengths) != 1:
            raise ValueError(f"ZipDataset: datasets are not index-aligned (lengths {sorted(lengths)})")
        self.datasets = datasets

    def __len__(self) -> int:
        return len(self.datasets[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for d in self.datasets:
            merged.update(d[index])
        return merged


class ConcatExamples(torch.utils.data.Dataset):
    """Several shard datasets read as one (the prevdoc + concat mixture, by size, as CEPE's
    uniform sampling over its combined streams)."""

    def __init__(self, datasets: Sequence[Any]):
        self.datasets = list(datasets)
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        which = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return self.datasets[which][int(index - self.offsets[which])]


# ---------------------------------------------------------------------------------------------
# opening shard directories for a stage


def open_shards(root: str, split: str, *, layouts: tuple[str, ...], key: str = "data") -> Any:
    """The `split` of a shard directory, checked before any work: it exists, holds one of
    `layouts` (a `mix` directory counts as its parts), and is not empty. Errors name the config
    `key` the directory came from."""
    from pathlib import Path

    from pipeline.data.shards import ShardDataset
    from pipeline.errors import CepeError

    if not (Path(root) / "manifest.json").is_file():
        raise CepeError(f"{key}: {root} is not a shard directory (no manifest.json); run `cepe prepare-data` first")
    try:
        dataset = ShardDataset(root, split)
    except CepeError as exc:
        raise CepeError(f"{key}: {exc}") from None
    manifest = dataset.manifest
    parts = set(manifest.get("layouts") or {}) or {manifest.get("layout")}
    if not parts or not parts <= set(layouts):
        found = manifest.get("layout")
        raise CepeError(f"{key}: {root} holds {found!r} windows; this stage reads {' or '.join(map(repr, layouts))}")
    if split == "train" and len(dataset) == 0:
        raise CepeError(f"{key}: {root} has no {split} windows")
    return dataset


def manifest_value(dataset: Any, name: str, default: Any = None) -> Any:
    """A manifest field of a shard dataset (None for datasets without a manifest)."""
    manifest = getattr(dataset, "manifest", None) or {}
    return manifest.get(name, default)
