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
from pipeline.devices import DTYPES, resolve_device, resolve_dtype
from pipeline.errors import CepeError
from pipeline.data.shards import write_manifest
from pipeline.io import atomic_directory, sha256_file
from pipeline.train.teacher import LOGITS_FORMAT, check_window, max_window, resolve_teacher, weights_fingerprint
from pipeline.train.teacher_shards import LOGITS_VERSION


# Layouts whose windows carry the context just before the decoder input (the teacher reads both).
CEPED_LAYOUTS = ("prevdoc", "concat")


def check_teacher_geometry(config: Any) -> None:
    """Checks shared by teacher-logits and distill: top-k, temperature and the window split."""
    if config.k < 1:
        raise ConfigError(f"k: expected an integer >= 1, got {config.k}")
    if not config.temperature > 0:
        raise ConfigError(f"temperature: expected a positive number, got {config.temperature}")
    if config.teacher_context_len < 0:
        raise ConfigError(f"teacher_context_len: expected an integer >= 0, got {config.teacher_context_len}")
    if config.decoder_len < 2:
        raise ConfigError(f"decoder_len: expected an integer >= 2, got {config.decoder_len}")


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


# --------------------------------------------------------------------------------------------
# helpers shared with `cepe distill`


def load_teacher(name: str, dtype: str = "auto", attn_implementation: str = "sdpa", device: Any = None) -> tuple[Any, Any]:
    """(TeacherRef, model on `device`, eval mode, frozen) for a `--teacher` value."""
    from transformers import AutoModelForCausalLM

    ref = resolve_teacher(name)
    device = device or resolve_device()
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.resolved, dtype=resolve_dtype(dtype, device),
                                                     attn_implementation=attn_implementation)
    except (OSError, ValueError) as exc:
        hint = "" if ref.is_local else " (a hub id needs network access; or pass a local model directory)"
        raise CepeError(f"teacher: cannot load {ref.resolved}{hint}: {str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return ref, model


def data_identity(root: str | Path) -> tuple[dict[str, Any], str]:
    """(data manifest, its sha256) of a shard directory."""
    from pipeline.data.shards import read_manifest

    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise CepeError(f"data: {root} is not a shard directory (no manifest.json); run `cepe prepare-data` first")
    return read_manifest(root), sha256_file(path)


def shard_structure(dataset: Any, max_windows: int = 0) -> list[tuple[str, int]]:
    """(file name, rows) of the logits shards that mirror a data split's shards, in reading order.

    With `max_windows` the teacher covers only the first `max_windows` rows of the split: the
    shards up to that row, the last one cut short (row i still is data row i).
    """
    out, left = [], max_windows if max_windows > 0 else None
    for entry in dataset.entries:
        rows = int(entry["rows"])
        if left is not None:
            if left <= 0:
                break
            rows = min(rows, left)
            left -= rows
        out.append((Path(entry["path"]).name, rows))
    return out


def data_geometry(manifest: dict[str, Any], key: str = "data") -> tuple[int, int]:
    """(decoder tokens, context tokens) per window from a data manifest."""
    decoder = int(manifest.get("decoder_len", 0))
    context = int(manifest.get("n_chunks", 0)) * int(manifest.get("chunk_len", 0))
    return decoder, context


def check_geometry(manifest: dict[str, Any], context_len: int, decoder_len: int, key: str = "data") -> None:
    """The windows must hold the requested decoder tokens and context tokens."""
    have_dec, have_ctx = data_geometry(manifest, key)
    if have_dec and decoder_len > have_dec:
        raise CepeError(f"decoder_len: {decoder_len} exceeds the {have_dec} decoder tokens of the windows in {key}")
    if context_len > have_ctx:
        raise CepeError(f"teacher_context_len: {context_len} exceeds the {have_ctx} context tokens "
                        f"(n_chunks x chunk_len) of the windows in {key}")


def check_tokenizer(model: Any, manifest: dict[str, Any], ref: Any, key: str = "data") -> None:
    """The teacher must read the data's token ids.

    When the teacher's directory holds a tokenizer, its hash (`pipeline.data.tokenize`) must be the
    one the data manifest records; otherwise (a hub id, a bare weights folder) the teacher's
    vocabulary must at least cover the data tokenizer's.

    Raises:
        CepeError: naming both tokenizers.
    """
    tok = manifest.get("tokenizer") or {}
    if ref.is_local and any((Path(ref.resolved) / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        from pipeline.data.tokenize import load_tokenizer, tokenizer_hash

        theirs = tokenizer_hash(load_tokenizer(ref.resolved))
        if tok.get("sha256") and theirs != tok["sha256"]:
            raise CepeError(
                f"teacher: {ref.resolved} has another tokenizer (sha256 {theirs[:12]}) than the windows in {key} "
                f"({tok.get('name', '?')}, sha256 {str(tok['sha256'])[:12]}); the teacher must read the data's token ids")
        return
    vocab = tok.get("vocab_size")
    teacher_vocab = int(model.config.vocab_size)
    if vocab is not None and int(vocab) > teacher_vocab:
        raise CepeError(f"teacher: {ref.name} has a {teacher_vocab}-token vocabulary but the windows in {key} "
                        f"were tokenized with a {vocab}-token tokenizer ({tok.get('name', '?')}); "
                        f"the teacher must share the data's tokenizer")


# --------------------------------------------------------------------------------------------


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
