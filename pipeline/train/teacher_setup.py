"""What CEPED's two stages (teacher-logits, distill) share about the teacher and the data it reads.

The checks of the top-k / temperature / window-split options, loading the teacher, the data
directory's identity and window geometry, whether the teacher reads the data's token ids, and
which logits shards mirror a data split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import ConfigError
from pipeline.devices import resolve_device, resolve_dtype
from pipeline.errors import CepeError
from pipeline.io import sha256_file
from pipeline.train.teacher import resolve_teacher

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


def load_teacher(name: str, dtype: str = "auto", attn_implementation: str = "sdpa", device: Any = None) -> tuple[Any, Any]:
    """(TeacherRef, model on `device`, eval mode, frozen) for a `--teacher` value."""
    from transformers import AutoModelForCausalLM

    from pipeline.hub import require_local_or_hub

    ref = resolve_teacher(name)
    require_local_or_hub(ref.resolved, "teacher")
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
    """The teacher must read the data's token ids (`pipeline.data.shards.check_tokenizer`, the
    check every stage that reads shards makes): its directory's tokenizer, when it has one,
    hashes as the data manifest records; otherwise its vocabulary covers the data's.

    Raises:
        CepeError: naming both tokenizers.
    """
    from pipeline.data.shards import check_tokenizer as check_shards

    dirs = [ref.resolved] if ref.is_local else []
    vocab = int(model.config.vocab_size) if model is not None else None
    check_shards(manifest.get("tokenizer"), key=key, tokenizer_dirs=dirs, vocab_size=vocab,
                 model=f"teacher {ref.name}" if not ref.is_local else "teacher")


# --------------------------------------------------------------------------------------------
