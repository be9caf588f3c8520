"""Model shapes the benchmark builds with random weights: named presets or a config on disk.

The benchmark measures speed and memory, which depend on the shapes only, so it never needs
real weights: `llama-2-7b` and `cepe-435m` are the paper's decoder and encoder
(docs/method.md §1.1), `tiny` pairs run in seconds on a CPU (tests, CI), and `smollm2-135m` is
the packaged real decoder's shape. A path instead of a name reads a `config.json` (or a model
directory's) and builds that shape.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pipeline.errors import CepeError

DECODER_PRESETS: dict[str, dict[str, Any]] = {
    # LLaMA-2-7B: 32 layers, 4096 wide, 32 heads (MHA), FFN 11008, vocab 32000, 4K window.
    "llama-2-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # LLaMA-2-13B: 40 layers, 5120 wide, 40 heads (MHA), FFN 13824 (the FSDP scaling runs' larger shape).
    "llama-2-13b": dict(
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # SmolLM2-135M (the decoder docs/offline.md packages): GQA 9/3 heads, tied embeddings.
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # For CPU tests: GQA so that the KV-cache arithmetic is exercised with kv_heads != heads.
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
}

# Fields of `pipeline.model.EncoderSpec` (the shape of a fresh encoder) per preset.
ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's MLM encoder (hyen/LLaMA-MLM-Large): 24 layers, 1024 wide, 16 heads, FFN 4096.
    "cepe-435m": {},  # = EncoderSpec() = pipeline.model.PAPER_ENCODER's shape
    "tiny": dict(layers=2, hidden_size=32, intermediate_size=64, heads=4),
}


def _read_config_dict(spec: str, what: str) -> dict[str, Any]:
    path = Path(spec)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        names = ", ".join(DECODER_PRESETS if what == "decoder" else ENCODER_PRESETS)
        raise CepeError(f"bench.{what}: {spec!r} is neither a preset ({names}) nor a config.json or model directory")
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CepeError(f"{file} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(values, dict):
        raise CepeError(f"{file}: expected a JSON object of config fields")
    return values


def decoder_config(spec: str) -> Any:
    """A decoder config (`PretrainedConfig`) from a preset name or a config path; sdpa attention."""
    from transformers import AutoConfig, LlamaConfig

    if spec in DECODER_PRESETS:
        config = LlamaConfig(**copy.deepcopy(DECODER_PRESETS[spec]))
    else:
        values = _read_config_dict(spec, "decoder")
        model_type = values.pop("model_type", "llama")
        if model_type == "cepe":  # a saved CEPE model: benchmark its decoder
            values = dict(values["decoder_config"])
            model_type = values.pop("model_type", "llama")
        try:
            config = AutoConfig.for_model(model_type, **values)
        except (KeyError, ValueError) as exc:
            raise CepeError(f"bench.decoder: {spec}: cannot build a config of type {model_type!r} ({exc})") from None
    config._attn_implementation = "sdpa"
    return config


def encoder_config(spec: str, decoder_vocab_size: int) -> Any:
    """An encoder config over the decoder's vocabulary (+ [MASK]) from a preset or a config path."""
    from pipeline.model import EncoderSpec, build_encoder_config

    if spec in ENCODER_PRESETS:
        config = build_encoder_config(decoder_vocab_size, **EncoderSpec(**ENCODER_PRESETS[spec]).config_values())
    else:
        values = _read_config_dict(spec, "encoder")
        if values.get("model_type") == "cepe":
            values = dict(values["encoder_config"])
        keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                "rope_parameters", "tie_word_embeddings")
        config = build_encoder_config(decoder_vocab_size, **{k: values[k] for k in keep if k in values})
    config._attn_implementation = "sdpa"
    return config


def long_context_config(config: Any, max_positions: int) -> Any:
    """The decoder as a long-context model would be: YaRN RoPE scaling from its native window to
    `max_positions` (as YaRN-Llama-2-7b-128k, the paper's 128K baseline). Costs are unchanged by
    the scaling; it is there so the full-attention side is the model one would actually run."""
    config = copy.deepcopy(config)
    native = int(config.max_position_embeddings)
    if max_positions <= native:
        return config
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    factor = float(-(-max_positions // native))  # ceil: 131072 / 4096 -> 32
    config.rope_parameters = {
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": factor,
        "original_max_position_embeddings": native,
    }
    config.max_position_embeddings = int(native * factor)
    return config
