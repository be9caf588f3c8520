"""`cepe train`: the main CEPE stage (docs/method.md §2.3).

Starts from the warm-up's CEPE model (no re-initialisation) and trains cross-attention and
encoder on `prevdoc` / `concat` windows, whose encoder chunks hold the text right before the
decoder window, with the next-token loss over every decoder position. Encoder-context
robustness masking is on by default: per chunk, u ~ U(0,1); u < 0.03 masks the whole chunk,
u < 0.3 a random suffix (CEPE's `mask_prob 0.3, mask_seq_prob 0.1`). Several shard directories
are read as one dataset, sampled uniformly by window (the paper's 2:1 RP-filter:RP-cat mixture
follows from their sizes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError, field
from pipeline.stages.warmup import LmStageOptions, lm_task, resolve_model_dir

LAYOUTS = ("prevdoc", "concat")  # a `mix` directory of them is read as it is


@dataclass
class TrainConfig(LmStageOptions):
    """Main training; defaults are the paper's recipe (LR 3e-4, 20K steps), params.yaml the CPU one."""

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


def load_model(config: TrainConfig):
    """The warm-up's CEPE model in fp32 (the loop casts the frozen decoder to bf16 on GPU)."""
    import torch

    from pipeline.model import CepeForCausalLM

    path = resolve_model_dir(config.model, "model")
    model = CepeForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=config.attn_implementation)
    model.set_encoder_trainable(config.train_encoder)
    return model


def run(config: TrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Train; writes `<output>/model`, metrics.json, steps.tsv, validation.tsv, checkpoints/."""
    from pipeline.train.collate import ConcatExamples, ContextMasking, open_shards
    from pipeline.train.loop import run_training, save_config

    trains = [open_shards(d, "train", layouts=LAYOUTS) for d in config.data]
    vals = [open_shards(d, "validation", layouts=LAYOUTS) for d in config.data]
    shapes = {tuple(len(x) for x in (t[0]["input_ids"], t[0]["encoder_input_ids"])) for t in trains}
    if len(shapes) > 1:
        raise ConfigError(f"data: the shard directories have different window shapes {sorted(shapes)}")
    resolve_model_dir(config.model, "model")
    save_config(config)
    model = load_model(config)
    masking = (ContextMasking(config.context_mask_prob, config.context_mask_full_prob, config.seed)
               if config.context_masking else None)
    train = trains[0] if len(trains) == 1 else ConcatExamples(trains)
    val = vals[0] if len(vals) == 1 else ConcatExamples(vals)
    task = lm_task(model, train, val, config, context_masking=masking, stage="train")
    return run_training(task, config, resume=resume)
