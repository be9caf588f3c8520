"""`cepe teacher-logits`: the teacher's top-k on every decoder position, stored once (docs/method.md §2.4).

The teacher (an instruction-tuned decoder; by default the same decoder the CEPE student wraps)
reads `context[-teacher_context_len:] + decoder_input[:decoder_len]` of each prevdoc window
inside its own window; its top-k probabilities, their ids and the tail mass at the `decoder_len`
decoder positions go to Arrow shards that mirror the data shards file for file, row for row
(`pipeline.train.teacher_shards`). This is the expensive pass of CEPED, so it is its own DVC
stage and `cepe distill` reuses its output as long as data, teacher and these settings stand.

Output: `<output>/manifest.json` (teacher name, resolved path/id and weight fingerprint, k,
temperature, window split, the data manifest's fingerprint and sha256, the tokenizer, per split
the shard files and rows, and the teacher's own perplexity on the decoder tokens as a sanity
check) and `<output>/<split>/shard-NNNNN.arrow`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, config_hash, field, to_dict
from pipeline.data.shards import write_manifest
from pipeline.devices import DTYPES, resolve_device
from pipeline.io import atomic_directory
from pipeline.train.teacher import LOGITS_FORMAT, check_window, max_window, resolve_teacher, weights_fingerprint
from pipeline.train.teacher_setup import (
    CEPED_LAYOUTS, check_geometry, check_teacher_geometry, check_tokenizer, data_identity, load_teacher, shard_structure,
)
from pipeline.train.teacher_shards import LOGITS_VERSION


@dataclass
class TeacherLogitsConfig:
    """Where the windows come from, which teacher reads them, and what is kept of its output."""

    data: str = field("data/shards/prevdoc", help="Shard directory of prevdoc windows (cepe prepare-data).")
    output: str = field("data/teacher-logits", help="Directory to write: manifest.json + <split>/shard-NNNNN.arrow.")
    teacher: str = field("models/decoder", help="Teacher: a model directory or a short name (llama-2-7b-chat, ...).")
    splits: list[str] = field(default_factory=lambda: ["train", "validation"], help="Data splits to compute.")
    k: int = field(50, help="Top-k probabilities kept per position (the tail mass is kept too).")
    temperature: float = field(1.0, help="Softmax temperature of the teacher (distill must use the same).")
    teacher_context_len: int = field(2048, help="Context tokens the teacher reads before the decoder input.")
    decoder_len: int = field(2048, help="Decoder positions per window (the student's decoder input length).")
    max_windows: int = field(0, help="Cover only the first N windows of each split (0: all); distill then trains on those.")
    batch_size: int = field(1, help="Windows per teacher forward pass.")
    dtype: str = field("auto", help="Teacher weights dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")
    attn_implementation: str = field("sdpa", help="Attention backend of the teacher: sdpa, eager or flash_attention_2.")
    progress: bool = field(True, help="Show a progress bar.")

    def __post_init__(self) -> None:
        check_teacher_geometry(self)
        if self.max_windows < 0:
            raise ConfigError(f"max_windows: expected an integer >= 0 (0: all windows), got {self.max_windows}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected an integer >= 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not self.splits:
            raise ConfigError("splits: expected at least one split name")
        if not str(self.teacher).strip():
            raise ConfigError("teacher: expected a model directory or a short name")


def run(config: TeacherLogitsConfig) -> dict[str, Any]:
    """Compute and write the teacher's top-k shards; returns the manifest's summary."""
    from pipeline.train.collate import open_shards
    from pipeline.train.teacher_pass import compute_split

    resolve_teacher(config.teacher)  # an unknown short name fails before anything is read
    manifest, manifest_sha = data_identity(config.data)
    check_geometry(manifest, config.teacher_context_len, config.decoder_len)
    datasets = {split: open_shards(config.data, split, layouts=CEPED_LAYOUTS) for split in config.splits}
    structures = {split: shard_structure(ds, config.max_windows) for split, ds in datasets.items()}

    start = time.time()
    device = resolve_device()
    ref, model = load_teacher(config.teacher, config.dtype, config.attn_implementation, device)
    check_window(config.teacher_context_len, config.decoder_len, max_window(model.config))
    check_tokenizer(model, manifest, ref)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    if isinstance(pad, list):
        pad = pad[0]

    out: dict[str, Any] = {
        "format": LOGITS_FORMAT,
        "version": LOGITS_VERSION,
        "teacher": {"name": ref.name, "resolved": ref.resolved, "fingerprint": weights_fingerprint(model),
                    "vocab_size": int(model.config.vocab_size),
                    "max_position_embeddings": max_window(model.config),
                    "dtype": str(next(model.parameters()).dtype).replace("torch.", "")},
        "k": config.k,
        "temperature": config.temperature,
        "teacher_context_len": config.teacher_context_len,
        "decoder_len": config.decoder_len,
        "max_windows": config.max_windows,
        "dtypes": {"topk_probs": "float16", "topk_ids": "int32", "tail": "float16", "row_hash": "int64"},
        "data": {"root": str(config.data), "fingerprint": manifest.get("fingerprint"),
                 "manifest_sha256": manifest_sha, "tokenizer": manifest.get("tokenizer"),
                 "layout": manifest.get("layout")},
        "config": to_dict(config),
        "config_hash": config_hash(config),
        "splits": {},
    }
    with atomic_directory(config.output) as tmp:
        for split in config.splits:
            entry = compute_split(
                model, datasets[split], structures[split], Path(tmp) / split,
                context_len=config.teacher_context_len, decoder_len=config.decoder_len, k=config.k,
                temperature=config.temperature, batch_size=config.batch_size, pad_token_id=int(pad),
                progress=config.progress, desc=f"teacher-logits {split}")
            entry["data_rows"] = len(datasets[split])
            out["splits"][split] = entry
        out["seconds"] = round(time.time() - start, 2)
        write_manifest(tmp, out)
    return {
        "output": str(config.output),
        "teacher": ref.resolved,
        "rows": {s: e["rows"] for s, e in out["splits"].items()},
        "teacher_ppl": {s: e["teacher_ppl"] for s, e in out["splits"].items()},
        "mean_tail": {s: e["mean_tail"] for s, e in out["splits"].items()},
        "seconds": out["seconds"],
    }
