"""What the stages that train a CEPE model with the LM loss share (warmup, train, distill).

Their options (`LmStageOptions`; `MainStageOptions` for the main-stage recipe that `cepe train`
and `cepe distill` both follow), where a stage output's model lives, the validation window, the
warm-up's model loaded for further training, and the training-loop task of an LM stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, field
from pipeline.errors import CepeError
from pipeline.train.loop import LoopOptions

LAYOUTS = ("prevdoc", "concat")  # a `mix` directory of them is read as it is


@dataclass
class LmStageOptions(LoopOptions):
    """Options shared by the stages that train a CEPE model with the LM loss."""

    attn_implementation: str = field("sdpa", help="Attention backend: sdpa, eager or flash_attention_2.")
    train_encoder: bool = field(True, help="Train the encoder too (the paper does); cross-attention always trains.")
    eval_last_tokens: int = field(256, help="Validation scores the last N tokens of each held-out window (at most window-1).")
    save_decoder: bool = field(True, help="Write the frozen decoder's weights into model/ too (else model/ refers to its path).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_last_tokens < 1:
            raise ConfigError(f"eval_last_tokens: expected an integer >= 1, got {self.eval_last_tokens}")


@dataclass
class MainStageOptions(LmStageOptions):
    """Options of the stages that train a warmed-up CEPE model on prevdoc/concat windows (train,
    distill); defaults are the paper's main stage (LR 3e-4, 20K steps)."""

    data: list[str] = field(default_factory=lambda: ["data/shards/mix"],
                            help="Shard directories of prevdoc/concat windows (or their mix), read as one dataset.")
    output: str = field("runs/train", help="Output directory: model/, checkpoints/, metrics.json, steps.tsv.")
    model: str = field("runs/warmup/model", help="The warm-up's CEPE model (its output directory or model/).")
    context_masking: bool = field(True, help="Mask encoder chunks at random for robustness (docs/method.md §2.3).")
    context_mask_prob: float = field(0.3, help="Probability that a chunk is masked at all.")
    context_mask_full_prob: float = field(0.03, help="Probability that a chunk is masked entirely (part of context_mask_prob).")
    max_steps: int = field(20_000, help="Optimiser steps to train for.")
    batch_size: int = field(1, help="Sequences per process per micro-batch.")
    grad_accum: int = field(16, help="Micro-batches accumulated per optimiser step.")
    lr: float = field(3e-4, help="Peak learning rate (AdamW).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data:
            raise ConfigError("data: expected at least one shard directory")
        if not 0 <= self.context_mask_prob <= 1:
            raise ConfigError(f"context_mask_prob: expected a probability, got {self.context_mask_prob}")
        if not 0 <= self.context_mask_full_prob <= self.context_mask_prob:
            raise ConfigError(f"context_mask_full_prob: expected a probability <= context_mask_prob "
                              f"({self.context_mask_prob}), got {self.context_mask_full_prob}")
        if not self.model:
            raise ConfigError("model: expected the warm-up's output directory")


def resolve_model_dir(path: str, key: str) -> Path:
    """A stage output directory or its `model/`: whichever holds a config.json."""
    p = Path(path)
    if not p.exists():
        raise CepeError(f"{key}: no such directory: {path}")
    for candidate in (p, p / "model"):
        if (candidate / "config.json").is_file():
            return candidate
    raise CepeError(f"{key}: {path} holds no saved model (no config.json there or in model/)")


# What each kind of saved model directory is, by its config.json `model_type`, and which stage
# takes it: for the one-line error when a directory is given where another kind belongs.
_MODEL_KINDS = {"cepe": ("a CEPE model", "train / distill --model"),
                "cepe_encoder": ("a CEPE encoder (pretrain-encoder output)", "warmup --encoder")}


def model_type_of(directory: Path, key: str) -> str:
    """The `model_type` of a saved model directory's config.json (one line if unreadable)."""
    path = directory / "config.json"
    try:
        value = json.loads(path.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise CepeError(f"{key}: {path} is not a readable model config ({exc})") from None
    return str(value or "?")


def require_model_type(directory: Path, key: str, wanted: str | None) -> None:
    """`directory` must hold the kind of model `key` takes: `wanted` is a model_type, or None
    for a plain decoder (anything but a CEPE model or encoder).

    Raises:
        CepeError: naming what the directory holds and where that kind of model belongs.
    """
    found = model_type_of(directory, key)
    ok = found == wanted if wanted else found not in _MODEL_KINDS
    if ok:
        return
    what, where = _MODEL_KINDS.get(found, (f"a plain {found} decoder", "warmup --decoder"))
    expected = _MODEL_KINDS[wanted][0] if wanted else "a plain decoder (cepe convert-decoder)"
    raise CepeError(f"{key}: {directory} holds {what}, expected {expected}; that kind of model goes to {where}")


def check_weight_files(directory: Path, key: str) -> None:
    """Every safetensors file of a model directory must be whole (header and data present).

    A truncated `model.safetensors` otherwise fails deep inside `from_pretrained`.
    """
    from safetensors import SafetensorError, safe_open

    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError, ValueError) as exc:
            raise CepeError(f"{key}: {path} is unreadable ({str(exc).splitlines()[0]}); truncated or corrupt: "
                            f"write it again (the stage that made it, or cepe convert-decoder)") from None


def load_checked(load: Any, directory: Path, key: str) -> Any:
    """`load()` with a model directory's loading errors as one line naming the directory."""
    from safetensors import SafetensorError

    check_weight_files(directory, key)
    try:
        return load()
    except (OSError, SafetensorError, EnvironmentError) as exc:
        raise CepeError(f"{key}: cannot load {directory}: {str(exc).strip().splitlines()[0]}") from None


def tokenizer_dirs(model: Any, directory: Path) -> list[Path]:
    """Where a model's tokenizer may be: its own directory, then its decoder's source."""
    dirs = [directory]
    source = getattr(getattr(model, "config", None), "decoder_name_or_path", None)
    if source and Path(source).is_dir():
        dirs.append(Path(source))
    return dirs


def check_data_tokenizer(datasets: list[Any], model: Any, directory: Path, key: str, vocab_size: int) -> None:
    """Every shard dataset a stage reads must be tokenized as `model` reads (one shared check,
    `pipeline.data.shards.check_tokenizer`)."""
    from pipeline.data.shards import check_tokenizer
    from pipeline.train.collate import manifest_value

    for data in datasets:
        check_tokenizer(manifest_value(data, "tokenizer"), key=str(getattr(data, "root", "data")),
                        tokenizer_dirs=tokenizer_dirs(model, directory), vocab_size=vocab_size, model=key)


def eval_window(requested: int, window: int) -> int:
    """The validation window: the last `requested` tokens, at most window - 1 (the first token of a
    window has no prediction)."""
    return max(1, min(requested, window - 1))


def load_model(config: MainStageOptions):
    """The warm-up's CEPE model in fp32 (the loop casts the frozen decoder to bf16 on GPU)."""
    import torch

    from pipeline.model import CepeForCausalLM

    path = resolve_model_dir(config.model, "model")
    require_model_type(path, "model", "cepe")
    model = load_checked(lambda: CepeForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=config.attn_implementation), path, "model")
    model.set_encoder_trainable(config.train_encoder)
    return model


def _first(data: Any) -> str:
    return str(data[0] if isinstance(data, (list, tuple)) and data else data)


def lm_task(model: Any, train: Any, val: Any, config: LmStageOptions, *, context_masking: Any = None,
            stage: str) -> Any:
    """The loop task of an LM stage (warm-up and main training share it); its `model/` holds the
    data's tokenizer and records the chunk length and window trained with (model_output.py)."""
    from pipeline.train.collate import LmCollator, manifest_value
    from pipeline.train.flops import cepe_model_flops
    from pipeline.train.model_output import model_saver
    from pipeline.train.loop import TrainTask
    from pipeline.train.losses import causal_lm_loss, eval_last_tokens_nll

    window = int(manifest_value(train, "decoder_len", 0) or len(train[0]["input_ids"]))
    last = eval_window(config.eval_last_tokens, window)
    counts = model.parameter_counts() if hasattr(model, "parameter_counts") else {}
    n_chunks, chunk_len = (int(manifest_value(train, k, 0) or 0) for k in ("n_chunks", "chunk_len"))
    flops = cepe_model_flops(model, decoder_len=window, n_chunks=n_chunks, chunk_len=chunk_len) if n_chunks else None
    return TrainTask(
        model=model, train_data=train, collate=LmCollator(context_masking=context_masking),
        compute_loss=causal_lm_loss, val_data=val, val_collate=LmCollator(eval_last=last),
        eval_nll=eval_last_tokens_nll, flops_per_example=flops, save_model=model_saver(train, _first(getattr(config, "data", "data"))),
        extra_metrics={"stage": stage, "eval_last_tokens": last, "decoder_len": window,
                       **{f"params_{k}": v for k, v in counts.items()}})
