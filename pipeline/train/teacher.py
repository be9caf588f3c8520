"""CEPED's teacher: which model it is, what it reads, and the top-k it leaves for the student.

The teacher is an instruction-tuned decoder that reads the whole context *inside its own window*:
the last `context_len` encoder-context tokens followed by the first `decoder_len` decoder tokens
(`prev_token_ids[-2048:] + token_ids[:2048]` in the paper, exactly Llama-2-Chat's 4096 window,
docs/method.md §2.4). Its next-token distribution at each of the `decoder_len` decoder positions
is the student's target: the student sees the same decoder tokens, and the context only through
its encoder. Position t of the teacher's decoder segment and position t of the student's decoder
input both predict token t+1, so the two line up one to one; the last position is kept, as the
reference implementation keeps it.

Per position we keep the `k` largest probabilities (sorted), their token ids and the tail mass,
computed in fp32 from the logits and stored as fp16 probabilities and int32 ids
(`data/calculate_logits.py` of the reference code does the same, as MDS pickles). Storage
(`TeacherLogitsWriter` / `TeacherLogits`) mirrors the data shards one file for one file and one
row for one row; `pipeline.train.teacher_align` checks that correspondence before training.

`OnlineTeacher` produces the same tensors on the fly from a model held in memory, for users who
cannot store terabytes of logits; it rounds to the storage dtypes too, so that both paths give the
student exactly the same targets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import CepeError

# Short names for the chat models of the Llama family (and close relatives that share its
# architecture in `transformers`), resolved to hub ids. The teacher is also the student's frozen
# decoder, so these are the decoders CEPED is meant to extend.
TEACHERS: dict[str, str] = {
    "llama-2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "llama-2-13b-chat": "meta-llama/Llama-2-13b-chat-hf",
    "llama-2-70b-chat": "meta-llama/Llama-2-70b-chat-hf",
    "llama-3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
    "vicuna-7b": "lmsys/vicuna-7b-v1.5",
    "tinyllama-1.1b-chat": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.2",
    "qwen2.5-0.5b-instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m-instruct": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b-instruct": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
}

# Columns of a logits shard: per row, n positions x k entries, flattened (fixed-size lists).
PROBS, IDS, TAIL, ROW_HASH = "topk_probs", "topk_ids", "tail", "row_hash"
PROB_DTYPE, ID_DTYPE = np.float16, np.int32
LOGITS_FORMAT = "cepe-teacher-logits"


@dataclass(frozen=True)
class TeacherRef:
    """A resolved `--teacher`: what the user typed, and what `from_pretrained` gets."""

    name: str
    resolved: str
    is_local: bool


def resolve_teacher(name: str) -> TeacherRef:
    """`llama-2-7b-chat` -> `meta-llama/Llama-2-7b-chat-hf`; a local directory is used as is.

    A string with a `/` that is not a directory is taken as a hub id (`org/model`), which only
    works with network access; anything else must be a known short name.

    Raises:
        CepeError: for an unknown short name, listing the known ones.
    """
    text = str(name).strip()
    if not text:
        raise CepeError(f"teacher: expected a short name ({', '.join(TEACHERS)}) or a model directory, got an empty value")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CepeError(f"teacher: {path} is a directory without config.json (expected a save_pretrained model directory)")
        return TeacherRef(text, str(path.resolve()), True)
    key = text.lower()
    if key in TEACHERS:
        return TeacherRef(text, TEACHERS[key], False)
    if "/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1:
        return TeacherRef(text, text, False)
    raise CepeError(
        f"teacher: unknown teacher {text!r} (not a directory); known short names: {', '.join(TEACHERS)}"
    )


def same_teacher(ref: TeacherRef, recorded: dict[str, Any], *, student_source: str | None = None,
                 student_fingerprint: str | None = None) -> bool:
    """Whether a logits manifest's `teacher` record is the teacher `ref` names.

    Identity is what the registry resolves to, not the string typed: a hub id equals a hub id,
    a directory equals the same directory (both resolved). One more case is the same teacher:
    `ref` is the student's own decoder directory and the recorded weights fingerprint is that
    decoder's (the default CEPED set-up, wherever the directory is now).
    """
    theirs = str(recorded.get("resolved") or "")
    if ref.is_local:
        mine = Path(ref.resolved).resolve()
        if theirs and Path(theirs).expanduser().is_absolute() and Path(theirs).expanduser().resolve() == mine:
            return True
        if student_source and Path(student_source).expanduser().exists() \
                and Path(student_source).expanduser().resolve() == mine:
            return bool(student_fingerprint) and recorded.get("fingerprint") == student_fingerprint
        return False
    return theirs == ref.resolved


def max_window(config: Any) -> int:
    """The teacher's maximum number of positions (`max_position_embeddings`)."""
    value = getattr(config, "max_position_embeddings", None)
    if not value:
        raise CepeError(f"teacher: its config has no max_position_embeddings; cannot check the window")
    return int(value)


def check_window(context_len: int, decoder_len: int, max_positions: int, where: str = "teacher") -> None:
    """The teacher must see context + decoder input in one window of its own.

    Raises:
        CepeError: naming both lengths and the teacher's maximum.
    """
    if context_len < 0 or decoder_len < 1:
        raise CepeError(f"{where}: expected teacher_context_len >= 0 and decoder_len >= 1, got {context_len} and {decoder_len}")
    if context_len + decoder_len > max_positions:
        raise CepeError(
            f"{where}: teacher_context_len + decoder_len = {context_len} + {decoder_len} = "
            f"{context_len + decoder_len} exceeds the teacher's max_position_embeddings {max_positions}"
        )


# ------------------------------------------------------------------------------------------
# What the teacher reads


def row_hash(tokens: np.ndarray) -> int:
    """A 63-bit hash of a token sequence (int32 bytes), stored per row to verify alignment."""
    digest = hashlib.blake2b(np.ascontiguousarray(tokens, dtype=np.int32).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class TeacherRow:
    """What the teacher reads for one window, left-padded to `context_len + decoder_len`.

    input_ids, attention_mask: (W,) int64 with W = context_len + decoder_len; the decoder segment
    is always the last `decoder_len` entries, rows with less real context are padded on the left.
    hash: `row_hash` of the real tokens (what the stored logits are checked against).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    hash: int


def teacher_row(
    input_ids: np.ndarray | torch.Tensor,
    encoder_input_ids: np.ndarray | torch.Tensor,
    context_len: int,
    decoder_len: int,
    encoder_attention_mask: np.ndarray | torch.Tensor | None = None,
    pad_token_id: int = 0,
) -> TeacherRow:
    """`context[-context_len:] + decoder[:decoder_len]` for one window.

    Args:
        input_ids: (T,) the decoder part of the window, T >= decoder_len.
        encoder_input_ids: (n, L) or (n*L,) the context chunks, in text order.
        encoder_attention_mask: same shape, 0 on padding; padded context tokens are skipped.
            Pass the shard's own mask, never one with training-time context masking applied:
            the teacher reads the full context.
    """
    ids = _numpy(input_ids).reshape(-1)
    if ids.shape[0] < decoder_len:
        raise CepeError(f"decoder_len: {decoder_len} exceeds the {ids.shape[0]} decoder tokens of each window")
    ctx = _numpy(encoder_input_ids).reshape(-1)  # (n*L,): the chunks back in text order
    if encoder_attention_mask is not None:
        ctx = ctx[_numpy(encoder_attention_mask).reshape(-1).astype(bool)]
    kept = ctx[max(len(ctx) - context_len, 0) :] if context_len > 0 else ctx[:0]
    seq = np.concatenate([kept, ids[:decoder_len]]).astype(np.int64)
    width = context_len + decoder_len
    out = np.full(width, pad_token_id, dtype=np.int64)
    mask = np.zeros(width, dtype=np.int64)
    out[width - len(seq) :] = seq
    mask[width - len(seq) :] = 1
    return TeacherRow(out, mask, row_hash(seq))


def stack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Model inputs for a (B, W) batch of teacher rows: positions count real tokens only
    (`cumsum(mask) - 1`, so a row with less context gets the positions it would have alone), and
    the attention mask is dropped when nothing is padded (lets fused attention kernels run)."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    mask = None if bool(attention_mask.all()) else attention_mask
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ------------------------------------------------------------------------------------------
# Top-k + tail


def topk_with_tail(logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest probabilities of `softmax(logits / T)`, their ids and the remaining mass.

    Computed in fp32 whatever the logits' dtype (the reference takes the softmax in the model's
    dtype; fp32 costs nothing here and keeps the tail exact to ~1e-7).

    Args:
        logits: (..., V).
    Returns:
        probs (..., k) fp32 sorted descending, ids (..., k) int64, tail (..., ) fp32 >= 0.
    """
    if not 0 < k <= logits.shape[-1]:
        raise CepeError(f"k: expected 1..{logits.shape[-1]} (the vocabulary size), got {k}")
    probs = F.softmax(logits.float() / temperature, dim=-1)
    top, ids = torch.topk(probs, k, dim=-1, sorted=True)
    tail = (1.0 - top.sum(-1)).clamp_min(0.0)
    return top, ids, tail


def to_storage(probs: torch.Tensor, ids: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to the stored dtypes (fp16 probabilities, int32 ids)."""
    return probs.to(torch.float16), ids.to(torch.int32), tail.to(torch.float16)


@torch.no_grad()
def teacher_topk(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    decoder_len: int,
    k: int,
    temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Run the teacher on (B, W) rows and keep the top-k at its decoder positions.

    Args:
        input_ids, attention_mask: (B, W) teacher rows (`teacher_row`), decoder segment last.

    Returns:
        `topk_probs` (B, n, k) fp16, `topk_ids` (B, n, k) int32, `tail` (B, n) fp16 on the
        model's device, and `nll` (B,) fp32: the teacher's summed next-token NLL over the n-1
        decoder positions that have a target (a sanity check of what the student is taught).
    """
    device = next(model.parameters()).device
    n = decoder_len
    inputs = stack_rows(input_ids.to(device), attention_mask.to(device))
    out = model(**inputs, logits_to_keep=n, use_cache=False)
    logits = out.logits[:, -n:]  # (B, n, V): position t predicts decoder token t+1
    probs, ids, tail = topk_with_tail(logits, k, temperature)
    if n > 1:
        targets = inputs["input_ids"][:, -n + 1 :]  # (B, n-1)
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none").sum(-1)
    else:
        nll = torch.zeros(logits.shape[0], device=device)
    p, i, t = to_storage(probs, ids, tail)
    return {PROBS: p, IDS: i, TAIL: t, "nll": nll}


TEACHER_INPUT_IDS, TEACHER_ATTENTION_MASK = "teacher_input_ids", "teacher_attention_mask"


class OnlineTeacher:
    """A teacher held in memory that turns a batch's teacher rows into top-k targets on the fly.

    The rows (`teacher_input_ids` / `teacher_attention_mask`, (B, W)) are built per example from
    the unmasked shard data (`pipeline.train.ceped_data.CepedExamples(with_teacher_rows=True)`),
    so training-time context masking never hides context from the teacher. The output is exactly
    what `TeacherLogits` serves for the same rows (same assembly, same fp32 top-k, same fp16/int32
    rounding): precomputed and online distillation see the same numbers.

    `model=None` means "the model passed at call time": `DistillLoss` then passes the student's
    frozen decoder, which is the teacher itself when the student extends the teacher's weights.
    A teacher with its own model is moved to the batch's device at the first call.
    """

    def __init__(self, model: Any, context_len: int, decoder_len: int, k: int, temperature: float = 1.0,
                 max_positions: int | None = None) -> None:
        if model is not None:
            max_positions = max_window(model.config)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
        if max_positions is not None:
            check_window(context_len, decoder_len, max_positions)
        self.model = model
        self.context_len, self.decoder_len, self.k, self.temperature = context_len, decoder_len, k, temperature

    def __call__(self, batch: dict[str, torch.Tensor], model: Any = None) -> dict[str, torch.Tensor]:
        """Returns `topk_probs` (B, n, k), `topk_ids` (B, n, k) and `tail` (B, n)."""
        if TEACHER_INPUT_IDS not in batch:
            raise KeyError(f"online teacher: the batch has no {TEACHER_INPUT_IDS!r} (build the dataset with teacher rows)")
        model = self.model if self.model is not None else model
        if model is None:
            raise ValueError("online teacher: no model")
        device = batch[TEACHER_INPUT_IDS].device
        if next(model.parameters()).device != device:
            model.to(device)
        was_training = model.training
        model.eval()
        try:
            out = teacher_topk(model, batch[TEACHER_INPUT_IDS], batch[TEACHER_ATTENTION_MASK],
                               self.decoder_len, self.k, self.temperature)
        finally:
            model.train(was_training)
        return {PROBS: out[PROBS], IDS: out[IDS], TAIL: out[TAIL]}


# ------------------------------------------------------------------------------------------
# Identity of a model's weights


def weights_fingerprint(model: torch.nn.Module, skip: tuple[str, ...] = ("cross_attn",)) -> str:
    """A cheap, dtype-independent fingerprint of a decoder's weights.

    Hashes every parameter's name, shape and its first 256 values rounded to bf16, so the same
    checkpoint loaded in fp32 on a CPU and in bf16 on a GPU gives the same fingerprint, while a
    different fine-tune does not. Parameters whose name contains one of `skip` (a CEPE model's
    added cross-attention) are left out: the student's frozen decoder then fingerprints like the
    plain teacher.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if any(s in name for s in skip) or not torch.is_floating_point(tensor):
            continue
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        sample = tensor.detach().reshape(-1)[:256].to("cpu", torch.bfloat16).view(torch.int16).numpy()
        h.update(sample.tobytes())
    return h.hexdigest()[:16]

