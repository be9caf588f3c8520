"""The `model/` a training stage writes: weights, the tokenizer, and the geometry trained with.

A trained model directory must stand alone: `cepe generate` / `cepe serve` load it with nothing
else, and must chunk context as training did. The loop's `save_model` hook
(pipeline/train/loop.py) is given `model_saver(...)`, which saves the tokenizer the shards were
made with (named in their manifest and checked by its sha256) beside the weights and records
chunk length, decoder window and tokenizer identity in a CEPE model's config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from pipeline.errors import CepeError


def shard_manifest(dataset: Any) -> dict[str, Any]:
    """The shard manifest under a dataset, through the wrappers training puts around one
    (`ConcatExamples.datasets`, `CepedExamples.data`); {} when there is none."""
    seen = 0
    while dataset is not None and seen < 8:
        manifest = getattr(dataset, "manifest", None)
        if isinstance(manifest, dict) and manifest:
            return manifest
        inner = getattr(dataset, "datasets", None)
        dataset = inner[0] if inner else getattr(dataset, "data", None)
        seen += 1
    return {}


def manifest_tokenizer(manifest: dict[str, Any], where: str) -> Any:
    """The tokenizer a shard manifest names, loaded and checked against its recorded sha256."""
    from pipeline.data.tokenize import load_tokenizer, tokenizer_hash

    record = manifest.get("tokenizer") or {}
    name = record.get("name")
    if not name:
        raise CepeError(f"{where}/manifest.json: records no tokenizer name; rebuild the shards with cepe prepare-data")
    tok = load_tokenizer(name)
    sha = record.get("sha256")
    if sha and tokenizer_hash(tok) != sha:
        raise CepeError(f"{where}/manifest.json: tokenizer {name!r} now loads with sha256 {tokenizer_hash(tok)[:12]}, "
                        f"the shards were made with {sha[:12]}; save the model with the tokenizer of its data")
    return tok


def model_saver(train_data: Any, where: str) -> Callable[[Any, Path, dict[str, Any] | None], None]:
    """The `save_model` hook of a stage training on `train_data` (read from `where`).

    The tokenizer is loaded now, before training, so that a tokenizer that no longer loads is
    said at the start (then model/ is written without one) and not after hours of training."""
    manifest = shard_manifest(train_data)
    tokenizer = None
    if (manifest.get("tokenizer") or {}).get("name"):
        try:
            tokenizer = manifest_tokenizer(manifest, where)
        except CepeError as exc:  # the run can go on; its model/ then needs --tokenizer to be used
            print(f"warning: model/ will hold no tokenizer: {exc}", flush=True)
    example = train_data[0] if len(train_data) else {}
    enc = example.get("encoder_input_ids")
    chunk_len = int(enc.shape[-1]) if enc is not None and getattr(enc, "ndim", 0) >= 1 else None
    ids = example.get("input_ids")
    decoder_len = int(len(ids)) if ids is not None else None

    def save(model: Any, directory: Path, state_dict: dict[str, Any] | None) -> None:
        if hasattr(model, "record_training_geometry"):  # a CEPE model
            model.record_training_geometry(chunk_len, decoder_len, manifest.get("tokenizer"))
            model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True, tokenizer=tokenizer)
            return
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)  # pretrain-encoder's
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    return save
