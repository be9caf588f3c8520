"""`cepe warmup`: teach the new cross-attention to copy from the encoder (docs/method.md §2.2).

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
from typing import Any, Literal

from pipeline.config import ConfigError, field
from pipeline.errors import CepeError
from pipeline.train.lm_stage import (LmStageOptions, check_data_tokenizer, lm_task, load_checked, require_model_type,
                                     resolve_model_dir)

SPECIAL_ENCODERS = ("decoder-layers", "random")
# Read only with `encoder: random`; a params section with another encoder leaves them out.
RANDOM_ENCODER_KEYS = ("encoder_hidden_size", "encoder_intermediate_size", "encoder_heads")
# EncoderSpec field -> this section's key (a random encoder keeps the spec's 512 positions).
ENCODER_KEYS = {"layers": "encoder_layers", "hidden_size": "encoder_hidden_size",
                "intermediate_size": "encoder_intermediate_size", "heads": "encoder_heads"}


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
        spec = self.encoder_spec()
        if problem := spec.problem(ENCODER_KEYS, divisible=False):
            raise ConfigError(problem)
        if self.num_cross_attn_layers < 0:
            raise ConfigError(f"num_cross_attn_layers: expected 0 (all) or a positive count, got {self.num_cross_attn_layers}")
        if self.encoder == "random" and (problem := spec.problem(ENCODER_KEYS)):
            raise ConfigError(problem)

    @classmethod
    def unread_keys(cls, values: dict[str, Any]) -> frozenset[str]:
        """Keys a params section leaves out unless its `encoder` is random (pipeline/stages/registry.py)."""
        return frozenset() if values.get("encoder") == "random" else frozenset(RANDOM_ENCODER_KEYS)

    def encoder_spec(self):
        """The shape of an `encoder: random` (its layer count also serves `decoder-layers`)."""
        from pipeline.model.encoder import EncoderSpec

        return EncoderSpec(**{field: getattr(self, key) for field, key in ENCODER_KEYS.items()})


def build_model(config: WarmupConfig):
    """The CEPE model of a warm-up: decoder (fp32, frozen) + encoder + initialised cross-attention."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.model import CepeForCausalLM, encoder_from_decoder_layers, load_encoder

    decoder_dir = resolve_model_dir(config.decoder, "decoder")
    require_model_type(decoder_dir, "decoder", None)
    torch.manual_seed(config.seed)
    decoder = load_checked(lambda: AutoModelForCausalLM.from_pretrained(
        decoder_dir, dtype=torch.float32, attn_implementation=config.attn_implementation), decoder_dir, "decoder")
    encoder: Any = None
    encoder_config = None
    if config.encoder == "decoder-layers":
        if config.encoder_layers > decoder.config.num_hidden_layers:
            raise ConfigError(f"encoder_layers: {config.encoder_layers} exceeds the decoder's "
                              f"{decoder.config.num_hidden_layers} layers")
        encoder = encoder_from_decoder_layers(decoder, config.encoder_layers)
    elif config.encoder == "random":
        encoder_config = config.encoder_spec().config_values()
    else:
        encoder_dir = resolve_model_dir(config.encoder, "encoder")
        require_model_type(encoder_dir, "encoder", "cepe_encoder")
        encoder = load_checked(lambda: load_encoder(encoder_dir, attn_implementation=config.attn_implementation),
                               encoder_dir, "encoder")
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


def run(config: WarmupConfig, resume: str | None = None) -> dict[str, Any]:
    """Warm up cross-attention and encoder on duplicate windows; writes `<output>/model` etc."""
    from pipeline.train.collate import open_shards
    from pipeline.train.loop import process_state, run_training

    train = open_shards(config.data, "train", layouts=("duplicate",))
    val = open_shards(config.data, "validation", layouts=("duplicate",))
    decoder_dir = resolve_model_dir(config.decoder, "decoder")
    require_model_type(decoder_dir, "decoder", None)
    if config.encoder not in SPECIAL_ENCODERS:
        require_model_type(resolve_model_dir(config.encoder, "encoder"), "encoder", "cepe_encoder")
    process_state()  # before any model loads: launched CPU processes must join one gloo group
    model = build_model(config)
    check_data_tokenizer([train, val], model, decoder_dir, "decoder", model.decoder.config.vocab_size)
    return run_training(lm_task(model, train, val, config, stage="warmup"), config, resume=resume)
