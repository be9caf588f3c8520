"""CEPED's distillation loss: `lm_weight * CE + kl_weight * KL(teacher || student)` over top-k.

The teacher's distribution is not stored whole (a 32K-vocabulary row per token would be
terabytes); for each decoder position we keep its `k` largest probabilities, their token ids and
the tail mass `1 - sum(top-k)` (see `pipeline.train.teacher`). The KL is taken over those `k + 1`
buckets, the way the reference implementation does it (`LlamaForCausalContextLM.forward`):

- the student's probabilities `p_s = softmax(z_s / T)` over the full vocabulary are gathered at
  the teacher's top-k ids, and its own tail is `1 - sum(gathered)`;
- `drop` mode (the paper's run, `kl_modedrop`): the tail bucket is dropped on both sides and the
  KL runs over the `k` un-renormalised probabilities,
  `KL = sum_j p_t,j * (log p_t,j - log p_s,j)`. It is 0 when the student equals the teacher,
  but it is not a divergence between normalised distributions: a student that moves the tail
  mass onto the teacher's top-k scores below 0 (its minimum, `S log S` with `S = sum_j p_t,j`,
  is the renormalised top-k). The CE term keeps the student's tail honest, as in the paper;
- `smooth_<delta>` mode (the reference default, `smooth_1e-6`): the tail is kept and both
  `(k + 1)`-bucket distributions are smoothed as `(p + delta) / (1 + (k + 1) * delta)`, which keeps
  the logarithms finite when a bucket is zero.

The result is averaged per token over the valid decoder positions, i.e. it equals
`nn.KLDivLoss(reduction="batchmean")` on the `(B * n, k)` view when every position is valid
(the last position is included: the teacher predicts past the window as well). Everything is
computed in fp32 whatever the model's dtype.

Temperature: the stored probabilities were computed at the temperature recorded in the logits
manifest, so the student must use the same one (checked where the shards are opened); the KL is
multiplied by `T**2` (the usual distillation convention) so that `kl_weight` keeps its meaning
when `T != 1`. At `T = 1`, the paper's setting, this changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from pipeline.errors import CepeError

_SMOOTH = re.compile(r"^smooth(?:_(?P<delta>[0-9.eE+-]+))?$")
DEFAULT_SMOOTH_DELTA = 1e-6


def parse_kl_mode(mode: str) -> tuple[str, float]:
    """`"drop"` -> `("drop", 0.0)`; `"smooth"` / `"smooth_1e-6"` -> `("smooth", 1e-6)`.

    Raises:
        CepeError: for anything else, naming the accepted forms.
    """
    if mode == "drop":
        return "drop", 0.0
    match = _SMOOTH.match(mode)
    if match:
        text = match.group("delta")
        try:
            delta = float(text) if text is not None else DEFAULT_SMOOTH_DELTA
        except ValueError:
            delta = -1.0
        if delta > 0:
            return "smooth", delta
    raise CepeError(f"kl_mode: expected 'drop' or 'smooth_<delta>' with delta > 0 (e.g. smooth_1e-6), got {mode!r}")


def topk_kl_per_token(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_tail: torch.Tensor | None = None,
    mode: str = "drop",
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(teacher || student) at every position, over the teacher's top-k (+ tail) buckets.

    Args:
        student_logits: (B, n, V) the student's logits at the n decoder positions.
        teacher_probs: (B, n, k) the teacher's top-k probabilities (any float dtype).
        teacher_ids: (B, n, k) their token ids.
        teacher_tail: (B, n) the teacher's remaining mass; needed by `smooth` mode only
            (`1 - sum(teacher_probs)` is used when it is missing).
        mode: `drop` or `smooth_<delta>`.
        temperature: softmax temperature of the student (the teacher's is baked into its probs).

    Returns:
        (B, n) fp32 KL per position, not yet multiplied by `T**2`.
    """
    kind, delta = parse_kl_mode(mode)
    if student_logits.shape[:2] != teacher_probs.shape[:2] or teacher_probs.shape != teacher_ids.shape:
        raise ValueError(
            f"shape mismatch: student logits {tuple(student_logits.shape)}, teacher probs "
            f"{tuple(teacher_probs.shape)}, teacher ids {tuple(teacher_ids.shape)}"
        )
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, n, V)
    log_ps_top = torch.gather(log_ps, -1, teacher_ids.long())  # (B, n, k)
    p_t = teacher_probs.float()  # (B, n, k)
    if kind == "drop":
        # sum_j p_t,j (log p_t,j - log p_s,j); xlogy makes 0 * log 0 = 0 as KLDivLoss does.
        return (torch.xlogy(p_t, p_t) - p_t * log_ps_top).sum(-1)
    # smooth: (k + 1) buckets, the student's tail being 1 - sum of its gathered probabilities.
    if teacher_tail is None:
        teacher_tail = 1.0 - p_t.sum(-1)
    p_s_top = log_ps_top.exp()
    s_full = torch.cat([p_s_top, (1.0 - p_s_top.sum(-1, keepdim=True)).clamp_min(0.0)], dim=-1)  # (B, n, k+1)
    t_full = torch.cat([p_t, teacher_tail.float().unsqueeze(-1)], dim=-1)  # (B, n, k+1)
    buckets = t_full.shape[-1]
    s_full = (s_full + delta) / (1.0 + delta * buckets)
    t_full = (t_full + delta) / (1.0 + delta * buckets)
    return (t_full * (t_full.log() - s_full.log())).sum(-1)


def topk_kl(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_tail: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    mode: str = "drop",
    temperature: float = 1.0,
) -> torch.Tensor:
    """The per-token average of `topk_kl_per_token` over valid positions, times `T**2`.

    Args:
        mask: (B, n) 1 where a position counts (e.g. the decoder's attention mask); all positions
            count when None, which makes this `nn.KLDivLoss(reduction="batchmean")` on the
            `(B * n, k)` view.

    Returns:
        a scalar fp32 tensor.
    """
    per_token = topk_kl_per_token(student_logits, teacher_probs, teacher_ids, teacher_tail, mode, temperature)
    if mask is None:
        mean = per_token.mean()
    else:
        weights = mask.to(per_token.dtype)
        mean = (per_token * weights).sum() / weights.sum().clamp_min(1.0)
    return mean * (temperature**2)


# --------------------------------------------------------------------------------------------
# The loss hook of the training loop: (model, batch) -> (loss, metrics)


def _unwrap(model: Any) -> Any:
    """The bare model under DDP/accelerate wrappers (`.module`)."""
    while hasattr(model, "module"):
        model = model.module
    return model


@dataclass
class DistillLoss:
    """`lm_weight * CE + kl_weight * KL(teacher || student)`, as `compute_loss` for the loop.

    The batch carries the teacher's targets (`topk_probs`, `topk_ids`, `tail`) in precomputed
    mode; in online mode `teacher` (an `OnlineTeacher`) computes them from the batch's teacher
    rows. An `OnlineTeacher` without a model of its own runs the student's frozen decoder with no
    encoder input, which *is* the teacher when the student extends the teacher's own weights (the
    default): no second copy of the weights in memory.

    Metrics: `ce`, `kl` (the unweighted terms), `nll_sum` / `n_tokens` (for exact perplexity).
    """

    lm_weight: float = 1.0
    kl_weight: float = 2.0
    kl_mode: str = "drop"
    temperature: float = 1.0
    teacher: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        parse_kl_mode(self.kl_mode)

    def targets(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.teacher is None:
            return batch
        if getattr(self.teacher, "model", True) is None:
            return self.teacher(batch, model=_unwrap(model).decoder)
        return self.teacher(batch)

    def __call__(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        from pipeline.train.losses import causal_nll, model_inputs
        from pipeline.train.teacher import IDS, PROBS, TAIL

        target = self.targets(model, batch)
        out = model(**model_inputs(batch))
        nll, n_tokens = causal_nll(out.logits, batch["labels"])
        ce = nll / n_tokens.clamp(min=1)
        kl = topk_kl(out.logits, target[PROBS], target[IDS], target.get(TAIL), mask=batch.get("attention_mask"),
                     mode=self.kl_mode, temperature=self.temperature)
        loss = self.lm_weight * ce + self.kl_weight * kl
        return loss, {"ce": ce.detach(), "kl": kl.detach(), "nll_sum": nll.detach(), "n_tokens": n_tokens}
