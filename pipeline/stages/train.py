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

from pipeline.config import ConfigError
from pipeline.train.lm_stage import (LAYOUTS, MainStageOptions, check_data_tokenizer, lm_task, load_model,
                                     require_model_type, resolve_model_dir)


@dataclass
class TrainConfig(MainStageOptions):
    """Main training; defaults are the paper's recipe (LR 3e-4, 20K steps), params.yaml the CPU one."""


def run(config: TrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Train; writes `<output>/model`, metrics.json, steps.tsv, validation.tsv, checkpoints/."""
    from pipeline.train.collate import ConcatExamples, ContextMasking, open_shards
    from pipeline.train.loop import process_state, run_training

    trains = [open_shards(d, "train", layouts=LAYOUTS) for d in config.data]
    vals = [open_shards(d, "validation", layouts=LAYOUTS) for d in config.data]
    shapes = {tuple(len(x) for x in (t[0]["input_ids"], t[0]["encoder_input_ids"])) for t in trains}
    if len(shapes) > 1:
        raise ConfigError(f"data: the shard directories have different window shapes {sorted(shapes)}")
    model_dir = resolve_model_dir(config.model, "model")
    require_model_type(model_dir, "model", "cepe")
    process_state()  # before any model loads: launched CPU processes must join one gloo group
    model = load_model(config)
    check_data_tokenizer(trains + vals, model, model_dir, "model", model.decoder.config.vocab_size)
    masking = (ContextMasking(config.context_mask_prob, config.context_mask_full_prob, config.seed)
               if config.context_masking else None)
    train = trains[0] if len(trains) == 1 else ConcatExamples(trains)
    val = vals[0] if len(vals) == 1 else ConcatExamples(vals)
    task = lm_task(model, train, val, config, context_masking=masking, stage="train")
    return run_training(task, config, resume=resume)
