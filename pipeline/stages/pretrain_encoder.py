"""`cepe pretrain-encoder`: masked-language-model pretraining of the CEPE encoder (docs/method.md §2.1).

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


# EncoderSpec field -> this section's key.
ENCODER_KEYS = {"layers": "num_layers", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                "heads": "num_heads", "max_position_embeddings": "max_position_embeddings"}


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
        problem = self.encoder_spec().problem(ENCODER_KEYS, divisible=self.init == "random")
        if problem:
            raise ConfigError(problem)

    def encoder_spec(self):
        """The encoder shape these options state (`init: random`; `num_layers` also for decoder-layers)."""
        from pipeline.model.encoder import EncoderSpec

        return EncoderSpec(**{field: getattr(self, key) for field, key in ENCODER_KEYS.items()})


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

        from pipeline.hub import require_local_or_hub
        from pipeline.train.lm_stage import load_checked, resolve_model_dir

        require_local_or_hub(config.decoder, "decoder")
        if Path(config.decoder).exists():
            decoder_dir = resolve_model_dir(config.decoder, "decoder")
            decoder = load_checked(lambda: AutoModelForCausalLM.from_pretrained(decoder_dir, dtype=torch.float32),
                                   decoder_dir, "decoder")
        else:  # a hub name (require_local_or_hub has checked that it can be reached)
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
    econf = build_encoder_config(vocab_size, **config.encoder_spec().config_values())
    econf._attn_implementation = config.attn_implementation
    return CepeEncoderForMaskedLM(econf)


def run(config: PretrainEncoderConfig, resume: str | None = None) -> dict[str, Any]:
    """Pretrain the encoder; writes `<output>/model`, metrics.json, steps.tsv, checkpoints/."""
    from pipeline.train.model_output import model_saver
    from pipeline.train.collate import MlmCollator, manifest_value, open_shards
    from pipeline.train.flops import Stack, mlm_example_flops
    from pipeline.train.loop import TrainTask, process_state, run_training
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
    process_state()  # before any model loads: launched CPU processes must join one gloo group
    vocab = int(info["vocab_size"])
    if config.init == "decoder-layers":  # a random encoder is built from the shards' vocabulary itself
        from pipeline.data.shards import check_tokenizer
        from pipeline.train.lm_stage import require_model_type, resolve_model_dir

        decoder_dir = resolve_model_dir(config.decoder, "decoder")
        require_model_type(decoder_dir, "decoder", None)
        for data in (train, val):
            check_tokenizer(manifest_value(data, "tokenizer"), key=str(data.root), tokenizer_dirs=[decoder_dir],
                            vocab_size=None, model="decoder")
    model = build_mlm_model(config, vocab)
    mask_id = int(model.config.mask_token_id)
    collate = MlmCollator(mask_token_id=mask_id, special_ids=special_token_ids(info),
                          probability=config.mlm_probability, seed=config.seed)
    # Validation masks are fixed: the same seeded collator on the held-out windows every time.
    flops = mlm_example_flops(Stack.from_config(model.config), model.config.vocab_size, window) if window else None
    task = TrainTask(model=model, train_data=train, collate=collate, compute_loss=mlm_loss,
                     val_data=val, val_collate=collate, eval_nll=eval_mlm_nll, flops_per_example=flops,
                     save_model=model_saver(train, config.data), token_roles={"input_ids": "encoder"},
                     extra_metrics={"stage": "pretrain-encoder", "init": config.init,
                                    "encoder_params": sum(p.numel() for p in model.model.parameters())})
    return run_training(task, config, resume=resume)
