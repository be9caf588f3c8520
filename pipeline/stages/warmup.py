"""`cepe warmup`: teach the new cross-attention to copy from the encoder (cepe-method.md 2.2).

The frozen decoder is wrapped with cross-attention in its layers (q, k, v and the norm copied
from self-attention, the o-projection zero so the model starts as the plain decoder) and an
encoder: a `pretrain-encoder` output, the decoder's own first layers run bidirectionally
(`encoder: decoder-layers`), or a random one (`encoder: random`). It trains on `duplicate`
windows, where the encoder sees the decoder's own tokens, so the loss can fall towards zero
only by reading through cross-attention. The output's `model/` is the CEPE model `cepe train`
starts from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config import ConfigError, field
from pipeline.errors import CepeError
from pipeline.train.loop import LoopOptions

SPECIAL_ENCODERS = ("decoder-layers", "random")


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
class WarmupConfig(LmStageOptions):
    """Warm-up; defaults are the paper's recipe (LR 5e-4, 4000 steps), params.yaml the CPU one."""

    data: str = field("data/shards/duplicate", help="Shard directory of `duplicate` windows.")
    output: str = field("runs/warmup", help="Output directory: model/, checkpoints/, metrics.json, steps.tsv.")
    decoder: str = field("models/decoder", help="The decoder to wrap: a directory saved by save_pretrained (cepe convert-decoder).")
    encoder: str = field("runs/encoder/model", help="A pretrain-encoder output (its directory or model/), decoder-layers, or random.")
    encoder_layers: int = field(4, help="Layers of a decoder-layers or random encoder.")
    encoder_hidden_size: int = field(1024, help="Width of a random encoder.")
    encoder_intermediate_size: int = field(4096, help="FFN width of a random encoder.")
    encoder_heads: int = field(16, help="Attention heads of a random encoder.")
    num_cross_attn_layers: int = field(0, help="Cross-attention in the last N decoder layers (0: all, the paper).")
    init_mode: Literal["zero", "copy", "normal"] = field("zero", help="o-projection init of the cross-attention (zero: the paper run).")
    max_steps: int = field(4000, help="Optimiser steps to train for.")
    batch_size: int = field(1, help="Sequences per process per micro-batch.")
    grad_accum: int = field(32, help="Micro-batches accumulated per optimiser step.")
    lr: float = field(5e-4, help="Peak learning rate (AdamW).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.decoder:
            raise ConfigError("decoder: expected the decoder directory")
        if not self.encoder:
            raise ConfigError(f"encoder: expected a directory or one of {', '.join(SPECIAL_ENCODERS)}")
        for key in ("encoder_layers", "encoder_hidden_size", "encoder_intermediate_size", "encoder_heads"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected an integer >= 1, got {getattr(self, key)}")
        if self.num_cross_attn_layers < 0:
            raise ConfigError(f"num_cross_attn_layers: expected 0 (all) or a positive count, got {self.num_cross_attn_layers}")
        if self.encoder == "random" and self.encoder_hidden_size % self.encoder_heads:
            raise ConfigError(f"encoder_heads: {self.encoder_heads} does not divide encoder_hidden_size {self.encoder_hidden_size}")


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


def build_model(config: WarmupConfig):
    """The CEPE model of a warm-up: decoder (fp32, frozen) + encoder + initialised cross-attention."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.model import CepeForCausalLM, encoder_from_decoder_layers, load_encoder

    decoder_dir = resolve_model_dir(config.decoder, "decoder")
    torch.manual_seed(config.seed)
    decoder = AutoModelForCausalLM.from_pretrained(decoder_dir, dtype=torch.float32,
                                                   attn_implementation=config.attn_implementation)
    encoder: Any = None
    encoder_config = None
    if config.encoder == "decoder-layers":
        if config.encoder_layers > decoder.config.num_hidden_layers:
            raise ConfigError(f"encoder_layers: {config.encoder_layers} exceeds the decoder's "
                              f"{decoder.config.num_hidden_layers} layers")
        encoder = encoder_from_decoder_layers(decoder, config.encoder_layers)
    elif config.encoder == "random":
        encoder_config = dict(hidden_size=config.encoder_hidden_size, intermediate_size=config.encoder_intermediate_size,
                              num_hidden_layers=config.encoder_layers, num_attention_heads=config.encoder_heads,
                              num_key_value_heads=config.encoder_heads)
    else:
        encoder = load_encoder(resolve_model_dir(config.encoder, "encoder"), attn_implementation=config.attn_implementation)
        if encoder.config.vocab_size <= decoder.config.vocab_size:
            raise CepeError(f"encoder: {config.encoder} has vocabulary {encoder.config.vocab_size}; a CEPE encoder "
                            f"shares the decoder's {decoder.config.vocab_size} ids plus [MASK]")
    model = CepeForCausalLM.from_decoder(
        decoder, encoder=encoder, encoder_config=encoder_config,
        num_cross_attn_layers=config.num_cross_attn_layers or None, init_mode=config.init_mode,
        train_encoder=config.train_encoder, attn_implementation=config.attn_implementation,
        save_decoder=config.save_decoder)
    model.config.decoder_name_or_path = str(decoder_dir)
    return model


def lm_task(model: Any, train: Any, val: Any, config: LmStageOptions, *, context_masking: Any = None,
            stage: str) -> Any:
    """The loop task of an LM stage (warm-up and main training share it)."""
    from pipeline.train.collate import LmCollator, manifest_value
    from pipeline.train.loop import TrainTask
    from pipeline.train.losses import causal_lm_loss, eval_last_tokens_nll

    from pipeline.train.flops import cepe_model_flops

    window = int(manifest_value(train, "decoder_len", 0) or len(train[0]["input_ids"]))
    last = eval_window(config.eval_last_tokens, window)
    counts = model.parameter_counts() if hasattr(model, "parameter_counts") else {}
    n_chunks, chunk_len = (int(manifest_value(train, k, 0) or 0) for k in ("n_chunks", "chunk_len"))
    flops = cepe_model_flops(model, decoder_len=window, n_chunks=n_chunks, chunk_len=chunk_len) if n_chunks else None
    return TrainTask(
        model=model, train_data=train, collate=LmCollator(context_masking=context_masking),
        compute_loss=causal_lm_loss, val_data=val, val_collate=LmCollator(eval_last=last),
        eval_nll=eval_last_tokens_nll, flops_per_example=flops,
        extra_metrics={"stage": stage, "eval_last_tokens": last, "decoder_len": window,
                       **{f"params_{k}": v for k, v in counts.items()}})


def run(config: WarmupConfig, resume: str | None = None) -> dict[str, Any]:
    """Warm up cross-attention and encoder on duplicate windows; writes `<output>/model` etc."""
    from pipeline.train.collate import open_shards
    from pipeline.train.loop import run_training, save_config

    train = open_shards(config.data, "train", layouts=("duplicate",))
    val = open_shards(config.data, "validation", layouts=("duplicate",))
    resolve_model_dir(config.decoder, "decoder")
    if config.encoder not in SPECIAL_ENCODERS:
        resolve_model_dir(config.encoder, "encoder")
    save_config(config)
    model = build_model(config)
    return run_training(lm_task(model, train, val, config, stage="warmup"), config, resume=resume)
