"""Losses of the training stages: causal-LM cross-entropy on chosen positions, and MLM.

Every loss here returns the *sum* of token NLLs and the number of tokens it covered, as well as
the mean the optimiser sees. Why sums: validation perplexity is `exp(total NLL / total tokens)`
over all held-out windows (and over all processes), which a mean of means gets wrong whenever
batches score different numbers of tokens (MLM), and the gradient-accumulation average is then
a plain division.

Conventions (as in Hugging Face models): `labels` has the shape of `input_ids`, -100 marks a
position that is not scored, and causal-LM labels are shifted here (the logit at position t
predicts the label at t+1). MLM labels are not shifted.

The `compute_loss(model, batch) -> (loss, metrics)` functions at the bottom are the hooks the
training loop (`pipeline.train.loop`) calls; see that module for the contract.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and the number of scored tokens.

    Args:
        logits: (B, T', V), the logits of the *last* T' positions (T' <= T; a model called with
            `logits_to_keep=T'` returns exactly these).
        labels: (B, T) token ids, -100 where not scored.

    Returns:
        (nll_sum, n_tokens): fp32 scalar tensors. The logit at position t scores `labels[:, t+1]`,
        so with T' < T only the last T'-1 labels can be scored; labels before them must be -100.
    """
    keep = logits.shape[1]
    if keep > labels.shape[1]:
        raise ValueError(f"logits cover {keep} positions but labels only {labels.shape[1]}")
    shifted = labels[:, labels.shape[1] - keep + 1 :]  # (B, T'-1): targets of logits[:, :-1]
    early = labels[:, 1 : labels.shape[1] - keep + 1]
    if early.numel() and bool((early != IGNORE_INDEX).any()):
        raise ValueError("labels score positions whose logits were not computed (raise logits_to_keep)")
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B*(T'-1), V)
    target = shifted.reshape(-1)
    nll = F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, (target != IGNORE_INDEX).sum().to(torch.float32)


def last_tokens_labels(input_ids: torch.Tensor, n_last: int) -> torch.Tensor:
    """Labels that score only the last `n_last` tokens of each window (the paper's eval window).

    Args:
        input_ids: (B, T).
    Returns:
        (B, T) labels: -100 everywhere except the last `n_last` positions.
    """
    if not 0 < n_last < input_ids.shape[1]:
        raise ValueError(f"n_last={n_last} must be in 1..{input_ids.shape[1] - 1} for windows of {input_ids.shape[1]} tokens")
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -n_last:] = input_ids[:, -n_last:]
    return labels


def mlm_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL over masked positions (labels != -100), no shift.

    Args:
        logits: (B, T, V); labels: (B, T).
    """
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, (labels != IGNORE_INDEX).sum().to(torch.float32)


def mask_for_mlm(
    input_ids: np.ndarray,
    *,
    mask_token_id: int,
    special_ids: set[int] | frozenset[int],
    probability: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask one sequence for MLM as CEPE's `MLMDataCollator` does (docs/method.md §2.1).

    Each non-special token is masked independently with `probability`, and a masked token is
    *always* replaced by `[MASK]` (no 80/10/10). Special tokens (BOS, EOS/pad) are never masked.
    If the draw masks nothing, one random non-special token is masked, so that every sequence
    contributes to the loss (a batch of unmasked sequences would have a 0/0 loss).

    Args:
        input_ids: (T,) token ids.
    Returns:
        (masked_ids (T,), labels (T,)): labels are the original ids at masked positions, -100 elsewhere.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    candidates = ~np.isin(ids, np.fromiter(special_ids, dtype=np.int64, count=len(special_ids)))
    masked = (rng.random(ids.shape) < probability) & candidates
    if not masked.any() and candidates.any():
        masked[rng.choice(np.flatnonzero(candidates))] = True
    labels = np.where(masked, ids, IGNORE_INDEX)
    return np.where(masked, mask_token_id, ids), labels


# --------------------------------------------------------------------------------------------
# compute_loss hooks for the loop: (model, batch) -> (mean loss, {name: float})


def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token CE over the scored labels of a CEPE (or plain causal-LM) batch.

    The batch comes from `pipeline.train.collate.collate_lm`: `input_ids`, `attention_mask`,
    `labels` and, for CEPE, `encoder_input_ids` / `encoder_attention_mask`. Any other keys (e.g.
    a teacher's top-k columns) are ignored here.
    """
    out = model(**model_inputs(batch))
    nll, n = causal_nll(out.logits, batch["labels"])
    return nll / n.clamp(min=1), {}


def mlm_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean CE over the masked positions of an MLM batch (`collate_mlm`)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    nll, n = mlm_nll(out.logits, batch["labels"])
    return nll / n.clamp(min=1), {}


MODEL_KEYS = ("input_ids", "attention_mask", "encoder_input_ids", "encoder_attention_mask")


def model_inputs(batch: dict[str, torch.Tensor], keys: tuple[str, ...] = MODEL_KEYS) -> dict[str, torch.Tensor]:
    """The subset of a batch that a CEPE model's `forward` takes (labels are scored here, not inside)."""
    return {k: batch[k] for k in keys if k in batch}


def scored_tail_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T', V) logits of the last T' positions, just enough to score every scored label.

    Validation labels score only the last N tokens of each window (`collate_lm(eval_last=N)`),
    so the model is asked for the last N+1 logits alone (`logits_to_keep`): a (B, T, V) logit
    tensor for a 49K vocabulary would otherwise dominate evaluation memory.
    """
    labels = batch["labels"]
    scored = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    first = int(scored.min()) if scored.numel() else labels.shape[1] - 1
    keep = labels.shape[1] - first + 1
    return model(**model_inputs(batch), logits_to_keep=min(keep, labels.shape[1])).logits


def eval_last_tokens_nll(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL sum, token count) on the scored labels, computing logits only where needed."""
    return causal_nll(scored_tail_logits(model, batch), batch["labels"])


def eval_mlm_nll(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return mlm_nll(out.logits, batch["labels"])
