"""CEPED examples: shard windows cut to the student's decoder input, joined with the teacher's targets.

For each data example (a prevdoc window: `input_ids` = the decoder part, `encoder_input_ids` =
the context chunks before it), CEPED needs

- the student's input: `input_ids[:decoder_len]` and the encoder chunks (as they are);
- the teacher's targets for those `decoder_len` positions, either read from precomputed shards
  (`TeacherLogits`, index-aligned with the data) or computed on the fly from the teacher's own
  input row (`teacher_input_ids`, built here from the *unmasked* context, so training-time
  context masking in the collate function never hides context from the teacher).

Alignment is verified, not assumed. `check_alignment` compares the logits manifest with the data
manifest and the run's settings before training starts (data build, tokenizer, split, geometry,
temperature), and spot-checks the first and last row of every shard; then every example served
compares the hash of the tokens the teacher read (stored per row) with the hash of the tokens
this example would give the teacher, so a shuffled or foreign shard fails at its first row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.data.shards import MANIFEST
from pipeline.errors import CepeError
from pipeline.train.teacher import (
    IDS, PROBS, ROW_HASH, TAIL, TEACHER_ATTENTION_MASK, TEACHER_INPUT_IDS, teacher_row,
)
from pipeline.train.teacher_shards import TeacherLogits


class CepedExamples(torch.utils.data.Dataset):
    """A data split seen by CEPED: student input + teacher targets (stored) or teacher rows (online).

    Args:
        data: map-style dataset of shard examples (`input_ids` (T,), `encoder_input_ids` (n, L),
            optionally `attention_mask`, `encoder_attention_mask`).
        context_len, decoder_len: the teacher's window split (context tokens + decoder tokens).
        logits: the split's precomputed `TeacherLogits` (precomputed mode), row i for example i.
        with_teacher_rows: add `teacher_input_ids` / `teacher_attention_mask` (W,) (online mode).
        pad_token_id: left padding of teacher rows whose context is shorter than `context_len`.
    """

    def __init__(self, data: Any, context_len: int, decoder_len: int, logits: TeacherLogits | None = None,
                 with_teacher_rows: bool = False, pad_token_id: int = 0, where: str = ""):
        if logits is not None and len(logits) > len(data):
            raise CepeError(f"{logits.root}: split {logits.split!r} holds {len(logits)} rows of teacher logits "
                            f"but the data split holds {len(data)} windows")
        # Logits computed with `max_windows` cover the first rows of the split only: serve those.
        self.length = len(data) if logits is None else len(logits)
        self.data, self.logits = data, logits
        self.context_len, self.decoder_len = context_len, decoder_len
        self.with_teacher_rows, self.pad_token_id = with_teacher_rows, pad_token_id
        self.where = where

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        ex = dict(self.data[index])
        if "encoder_input_ids" not in ex:
            raise CepeError(f"{self.where or 'data'}: examples have no encoder_input_ids (CEPED needs prevdoc-style "
                            f"windows with context, not {ex.get('layout', 'this layout')!r})")
        row = teacher_row(ex["input_ids"], ex["encoder_input_ids"], self.context_len, self.decoder_len,
                          ex.get("encoder_attention_mask"), self.pad_token_id)
        ex["input_ids"] = np.asarray(ex["input_ids"])[: self.decoder_len]
        if "attention_mask" in ex:
            ex["attention_mask"] = np.asarray(ex["attention_mask"])[: self.decoder_len]
        if self.logits is not None:
            stored = self.logits[index]
            if stored[ROW_HASH] != row.hash:
                shard, r = self.logits.locate(index)
                raise CepeError(
                    f"{self.logits.root / self.logits.split / self.logits.files[shard]} row {r}: the teacher logits "
                    f"were computed from other tokens than data window {index} of {self.where or 'the data'} "
                    f"(misaligned shards: another data build, tokenizer, split or order); recompute them"
                )
            ex[PROBS], ex[IDS], ex[TAIL] = stored[PROBS], stored[IDS], stored[TAIL]
        if self.with_teacher_rows:
            ex[TEACHER_INPUT_IDS], ex[TEACHER_ATTENTION_MASK] = row.input_ids, row.attention_mask
        return ex


def check_alignment(
    logits: TeacherLogits,
    data_manifest: dict[str, Any],
    data_manifest_sha256: str,
    *,
    context_len: int,
    decoder_len: int,
    temperature: float,
    data_root: str | Path = "",
    data_shards: list[dict[str, Any]] | None = None,
) -> None:
    """Refuse logits that were not computed for this data, split and geometry; before training.

    Checks, each failing with a message naming both sides: the data build (manifest fingerprint and
    checksum), the tokenizer, the row structure of the split (`data_shards`: the data split's
    manifest entries; the logits shards must be the same files with the same rows, the last one
    possibly cut short when the teacher covered only a prefix), the teacher window
    (`teacher_context_len`, `decoder_len`) and the temperature.

    Raises:
        CepeError: on the first mismatch.
    """
    m = logits.manifest
    where = f"{logits.root / MANIFEST}"
    data = m.get("data", {})
    src = f"{data_root}/manifest.json" if data_root else "the data manifest"
    ours, theirs = _tokenizer_id(data.get("tokenizer")), _tokenizer_id(data_manifest.get("tokenizer"))
    if ours != theirs:
        raise CepeError(f"{where}: computed on windows tokenized with {ours} but {src} was tokenized with {theirs}")
    if data.get("fingerprint") != data_manifest.get("fingerprint") or data.get("manifest_sha256") != data_manifest_sha256:
        raise CepeError(
            f"{where}: computed for another data build (data fingerprint {str(data.get('fingerprint'))[:12]}, "
            f"manifest sha256 {str(data.get('manifest_sha256'))[:12]}) than {src} "
            f"(fingerprint {str(data_manifest.get('fingerprint'))[:12]}, sha256 {data_manifest_sha256[:12]}); "
            f"recompute with `cepe teacher-logits`"
        )
    if data_shards is not None:
        names = [Path(e["path"]).name for e in data_shards]
        rows = [int(e["rows"]) for e in data_shards]
        for i, (name, n) in enumerate(zip(logits.files, logits.rows)):
            if i >= len(names) or name != names[i]:
                raise CepeError(f"{where}: split {logits.split!r} shard {i} is {name} but the data split's is "
                                f"{names[i] if i < len(names) else 'missing'} (logits of another split or build)")
            last = i == len(logits.files) - 1
            if n != rows[i] and not (last and n < rows[i]):
                raise CepeError(f"{where}: {logits.split}/{name} holds {n} rows but the data shard holds {rows[i]}")
    for key, want in (("teacher_context_len", context_len), ("decoder_len", decoder_len)):
        if int(m.get(key, -1)) != int(want):
            raise CepeError(f"{where}: {key} is {m.get(key)} but this run uses {key}={want}; "
                            f"recompute the logits or set {key}: {m.get(key)}")
    if float(m.get("temperature", 1.0)) != float(temperature):
        raise CepeError(f"{where}: teacher probabilities were taken at temperature {m.get('temperature')} "
                        f"but this run uses temperature={temperature}")


def spot_check(examples: CepedExamples) -> None:
    """Read the first and last row of every logits shard through `examples` (hash check)."""
    logits = examples.logits
    if logits is None:
        return
    for i, rows in enumerate(logits.rows):
        for r in {0, rows - 1} if rows else set():
            examples[int(logits.offsets[i]) + r]


def _tokenizer_id(tok: Any) -> str:
    if isinstance(tok, dict):
        return f"{tok.get('name', '?')} (sha256 {str(tok.get('sha256', tok.get('hash', '?')))[:12]})"
    return str(tok)
