"""`cepe pretrain-encoder`: masked-language-model pretraining of the CEPE encoder (cepe-method.md 2.1).

The encoder is a bidirectional Llama over the decoder's vocabulary plus `[MASK]`, trained from
scratch (`init: random`, the paper) or from the decoder's own embeddings and lower layers
(`init: decoder-layers`). Each `mlm` shard window has 30% of its non-special tokens replaced by
`[MASK]` (always; no 80/10/10) and the loss is the cross-entropy on those positions. The output
directory's `model/` is a `CepeEncoderForMaskedLM` that `cepe warmup` reads as its encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config import ConfigError, field
from pipeline.errors import CepeError
from pipeline.train.loop import LoopOptions


@dataclass
class PretrainEncoderConfig(LoopOptions):
    """MLM pretraining; defaults are the paper's recipe, params.yaml holds the CPU-sized one."""

    data: str = field("data/shards/mlm", help="Shard directory of `mlm` windows (cepe prepare-data).")
    output: str = field("runs/encoder", help="Output directory: model/, checkpoints/, metrics.json, steps.tsv.")
    init: Literal["random", "decoder-layers"] = field(
        "random", help="random: a fresh encoder of the sizes below; decoder-layers: the decoder's embeddings and first num_layers layers.")
    decoder: str = field("", help="Decoder directory for init decoder-layers.")
    num_layers: int = field(24, help="Encoder layers.")
    hidden_size: int = field(1024, help="Encoder width (init random).")
    intermediate_size: int = field(4096, help="Encoder FFN width (init random).")
    num_heads: int = field(16, help="Encoder attention heads (init random).")
    max_position_embeddings: int = field(512, help="Encoder positions (init random).")
    mlm_probability: float = field(0.3, help="Fraction of tokens replaced by [MASK].")
    attn_implementation: str = field("sdpa", help="Attention backend: sdpa, eager or flash_attention_2.")
    max_steps: int = field(100_000, help="Optimiser steps to train for.")
    batch_size: int = field(16, help="Sequences per process per micro-batch.")
    grad_accum: int = field(16, help="Micro-batches accumulated per optimiser step.")
    lr: float = field(1e-3, help="Peak learning rate (AdamW).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.mlm_probability < 1:
            raise ConfigError(f"mlm_probability: expected a fraction in (0, 1), got {self.mlm_probability}")
        if self.init == "decoder-layers" and not self.decoder:
            raise ConfigError("decoder: init decoder-layers needs the decoder directory")
        for key in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "max_position_embeddings"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected an integer >= 1, got {getattr(self, key)}")
        if self.init == "random" and self.hidden_size % self.num_heads:
            raise ConfigError(f"num_heads: {self.num_heads} does not divide hidden_size {self.hidden_size}")


def special_token_ids(info: dict[str, Any]) -> frozenset[int]:
    """BOS, EOS and pad ids from a shard manifest's tokenizer record (never masked)."""
    ids = {info.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return frozenset(int(i) for i in ids if i is not None)


def build_mlm_model(config: PretrainEncoderConfig, vocab_size: int):
    """A `CepeEncoderForMaskedLM` over `vocab_size` decoder ids + `[MASK]` (id `vocab_size`)."""
    import torch

    from pipeline.model import CepeEncoderForMaskedLM, build_encoder_config, encoder_from_decoder_layers

    torch.manual_seed(config.seed)
    if config.init == "decoder-layers":
        from transformers import AutoModelForCausalLM

        decoder = AutoModelForCausalLM.from_pretrained(config.decoder, dtype=torch.float32)
        if decoder.config.vocab_size != vocab_size:
            raise CepeError(f"decoder: {config.decoder} has vocabulary {decoder.config.vocab_size}, "
                            f"the shards {vocab_size}")
        encoder = encoder_from_decoder_layers(decoder, config.num_layers)
        econf = encoder.config
        econf._attn_implementation = config.attn_implementation
        model = CepeEncoderForMaskedLM(econf)
        model.model.load_state_dict(encoder.state_dict())
        model.tie_weights()
        return model
    econf = build_encoder_config(
        vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads, max_position_embeddings=config.max_position_embeddings)
    econf._attn_implementation = config.attn_implementation
    return CepeEncoderForMaskedLM(econf)


def run(config: PretrainEncoderConfig, resume: str | None = None) -> dict[str, Any]:
    """Pretrain the encoder; writes `<output>/model`, metrics.json, steps.tsv, checkpoints/."""
    from pipeline.train.collate import MlmCollator, manifest_value, open_shards
    from pipeline.train.flops import Stack, mlm_example_flops
    from pipeline.train.loop import TrainTask, run_training, save_config
    from pipeline.train.losses import eval_mlm_nll, mlm_loss

    train = open_shards(config.data, "train", layouts=("mlm",))
    val = open_shards(config.data, "validation", layouts=("mlm",))
    info = manifest_value(train, "tokenizer", {}) or {}
    if "vocab_size" not in info:
        raise CepeError(f"data: {config.data}/manifest.json records no tokenizer vocab_size")
    window = int(manifest_value(train, "decoder_len", 0) or 0)
    if config.init == "random" and window > config.max_position_embeddings:
        raise ConfigError(f"max_position_embeddings: {config.max_position_embeddings} is shorter than the "
                          f"{window}-token mlm windows of {config.data}")
    save_config(config)
    vocab = int(info["vocab_size"])
    model = build_mlm_model(config, vocab)
    mask_id = int(model.config.mask_token_id)
    collate = MlmCollator(mask_token_id=mask_id, special_ids=special_token_ids(info),
                          probability=config.mlm_probability, seed=config.seed)
    # Validation masks are fixed: the same seeded collator on the held-out windows every time.
    flops = mlm_example_flops(Stack.from_config(model.config), model.config.vocab_size, window) if window else None
    task = TrainTask(model=model, train_data=train, collate=collate, compute_loss=mlm_loss,
                     val_data=val, val_collate=collate, eval_nll=eval_mlm_nll, flops_per_example=flops,
                     token_roles={"input_ids": "encoder"},
                     extra_metrics={"stage": "pretrain-encoder", "init": config.init,
                                    "encoder_params": sum(p.numel() for p in model.model.parameters())})
    return run_training(task, config, resume=resume)
