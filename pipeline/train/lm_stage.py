"""What the stages that train a CEPE model with the LM loss share (warmup, train, distill).

Their options (`LmStageOptions`; `MainStageOptions` for the main-stage recipe that `cepe train`
and `cepe distill` both follow), where a stage output's model lives, the validation window, the
warm-up's model loaded for further training, and the training-loop task of an LM stage.
"""

from __future__ import annotations

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
    for candidate in (p, p / "model"):
        if (candidate / "config.json").is_file():
            return candidate
    raise CepeError(f"{key}: {path} holds no saved model (no config.json there or in model/)")


def eval_window(requested: int, window: int) -> int:
    """The validation window: the last `requested` tokens, at most window - 1 (the first token of a
    window has no prediction)."""
    return max(1, min(requested, window - 1))


def load_model(config: MainStageOptions):
    """The warm-up's CEPE model in fp32 (the loop casts the frozen decoder to bf16 on GPU)."""
    import torch

    from pipeline.model import CepeForCausalLM

    path = resolve_model_dir(config.model, "model")
    model = CepeForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=config.attn_implementation)
    model.set_encoder_trainable(config.train_encoder)
    return model


def lm_task(model: Any, train: Any, val: Any, config: LmStageOptions, *, context_masking: Any = None,
            stage: str) -> Any:
    """The loop task of an LM stage (warm-up and main training share it)."""
    from pipeline.train.collate import LmCollator, manifest_value
    from pipeline.train.loop import TrainTask
    from pipeline.train.losses import causal_lm_loss, eval_last_tokens_nll

    window = int(manifest_value(train, "decoder_len", 0) or len(train[0]["input_ids"]))
    last = eval_window(config.eval_last_tokens, window)
    counts = model.parameter_counts() if hasattr(model, "parameter_counts") else {}
    return TrainTask(
        model=model, train_data=train, collate=LmCollator(context_masking=context_masking),
        compute_loss=causal_lm_loss, val_data=val, val_collate=LmCollator(eval_last=last),
        eval_nll=eval_last_tokens_nll,
        extra_metrics={"stage": stage, "eval_last_tokens": last, "decoder_len": window,
                       **{f"params_{k}": v for k, v in counts.items()}})
