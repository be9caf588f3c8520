"""Held-out comparison for CEPED: student vs the same decoder alone, both measured against the teacher.

For each held-out window the teacher reads context + decoder input in its own window (as when its
targets were made); the student reads the decoder input with the context through its encoder; the
baseline is the student's frozen decoder reading only the decoder input (the CEPE model with no
encoder input *is* that decoder). Per model we report

- `ppl`: exp of the mean next-token NLL over all decoder positions that have a target, and
  `ppl_last<N>` over the last N positions only (the paper's LM protocol scores the last 256);
- `kl`: the training objective's KL(teacher || model) over the teacher's top-k, `drop` mode
  (un-renormalised, tail dropped), averaged per position;
- `kl_full`: the exact KL(teacher || model) over the whole vocabulary, averaged per position.

Everything is summed over positions and divided once at the end, so the numbers do not depend on
the batch size.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.train.distill import topk_kl_per_token
from pipeline.train.teacher import stack_rows, teacher_row, topk_with_tail


@torch.no_grad()
def compare_with_teacher(
    student: Any,
    teacher: Any,
    windows: Sequence[dict[str, Any]],
    *,
    context_len: int,
    decoder_len: int,
    k: int = 50,
    temperature: float = 1.0,
    batch_size: int = 4,
    last: int = 256,
    pad_token_id: int = 0,
    autocast: Any = None,
    progress: bool = False,
) -> dict[str, float]:
    """Perplexities and KLs of the student, the decoder alone and the teacher on `windows`.

    Args:
        student: a `CepeForCausalLM` (its decoder without encoder input is the baseline).
        teacher: the teacher model (may be `student.decoder` itself).
        windows: shard examples (`input_ids` (T,), `encoder_input_ids` (n, L), ...), T >= decoder_len.
        autocast: a context-manager factory for the forward passes (e.g. bf16 on GPU), or None.

    Returns:
        `val_ppl_{student,decoder_only,teacher}`, `val_ppl_last{N}_*`, `val_kl_{student,decoder_only}`,
        `val_kl_full_{student,decoder_only}`, `val_windows`, `val_positions`.
    """
    import contextlib

    from tqdm.auto import tqdm

    device = next(student.parameters()).device
    ctx = autocast if autocast is not None else contextlib.nullcontext
    was = student.training, teacher.training
    student.eval()
    teacher.eval()
    names = ("student", "decoder_only", "teacher")
    sums = {f"{w}_{m}": 0.0 for w in ("nll", "nll_last") for m in names}
    sums.update({f"{w}_{m}": 0.0 for w in ("kl", "kl_full") for m in names[:2]})
    tokens = tokens_last = positions = 0
    last = min(last, decoder_len - 1)
    for lo in tqdm(range(0, len(windows), batch_size), disable=not progress, desc="held-out", unit="batch"):
        batch = [windows[i] for i in range(lo, min(lo + batch_size, len(windows)))]
        rows = [teacher_row(ex["input_ids"], ex["encoder_input_ids"], context_len, decoder_len,
                            ex.get("encoder_attention_mask"), pad_token_id) for ex in batch]
        t_inputs = stack_rows(torch.from_numpy(np.stack([r.input_ids for r in rows])).to(device),
                              torch.from_numpy(np.stack([r.attention_mask for r in rows])).to(device))
        ids = torch.as_tensor(np.stack([np.asarray(ex["input_ids"])[:decoder_len] for ex in batch]),
                              dtype=torch.long, device=device)  # (B, n)
        enc = torch.as_tensor(np.stack([np.asarray(ex["encoder_input_ids"]) for ex in batch]), dtype=torch.long,
                              device=device)
        enc_mask = None
        if "encoder_attention_mask" in batch[0]:
            enc_mask = torch.as_tensor(np.stack([np.asarray(ex["encoder_attention_mask"]) for ex in batch]),
                                       dtype=torch.long, device=device)
        with ctx():
            t_logits = teacher(**t_inputs, logits_to_keep=decoder_len, use_cache=False).logits[:, -decoder_len:]
            s_logits = student(input_ids=ids, encoder_input_ids=enc, encoder_attention_mask=enc_mask).logits
            d_logits = student(input_ids=ids).logits
        log_pt = F.log_softmax(t_logits.float() / temperature, -1)  # (B, n, V)
        probs, top_ids, tail = topk_with_tail(t_logits, k, temperature)
        probs, tail = probs.half().float(), tail.half().float()  # the stored precision, as in training
        targets = ids[:, 1:]  # (B, n-1): position t predicts token t+1
        for name, logits in (("student", s_logits), ("decoder_only", d_logits), ("teacher", t_logits)):
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")  # (B, n-1)
            sums[f"nll_{name}"] += float(nll.double().sum())
            sums[f"nll_last_{name}"] += float(nll[:, -last:].double().sum())
            if name == "teacher":
                continue
            sums[f"kl_{name}"] += float(topk_kl_per_token(logits, probs, top_ids, tail, "drop", temperature).double().sum())
            log_p = F.log_softmax(logits.float() / temperature, -1)
            sums[f"kl_full_{name}"] += float((log_pt.exp() * (log_pt - log_p)).sum(-1).double().sum())
            del log_p
        tokens += targets.numel()
        tokens_last += targets[:, -last:].numel()
        positions += ids.numel()
    student.train(was[0])
    teacher.train(was[1])
    out: dict[str, float] = {"val_windows": len(windows), "val_positions": positions, "val_tokens": tokens}
    for name in names:
        out[f"val_ppl_{name}"] = math.exp(sums[f"nll_{name}"] / tokens)
        out[f"val_ppl_last{last}_{name}"] = math.exp(sums[f"nll_last_{name}"] / tokens_last)
    for name in names[:2]:
        out[f"val_kl_{name}"] = sums[f"kl_{name}"] / positions
        out[f"val_kl_full_{name}"] = sums[f"kl_full_{name}"] / positions
    return out
