"""The CEPE model: encoder, cross-attention, and the wrapper around an unmodified HF decoder.

Importing this package registers `cepe` and `cepe_encoder` with the transformers Auto classes.
"""

from pipeline.model.cepe import (
    CACHE_KW,
    CepeConfig,
    CepeForCausalLM,
    is_cepe_model,
    load_encoder,
    register_auto_classes,
)
from pipeline.model.cross_attention import CepeCrossAttention
from pipeline.model.encoder import (
    PAPER_ENCODER,
    CepeEncoder,
    CepeEncoderConfig,
    CepeEncoderForMaskedLM,
    EncoderSpec,
    build_encoder_config,
    encoder_from_decoder_layers,
)

register_auto_classes()

__all__ = [
    "CACHE_KW",
    "PAPER_ENCODER",
    "CepeConfig",
    "CepeCrossAttention",
    "CepeEncoder",
    "CepeEncoderConfig",
    "CepeEncoderForMaskedLM",
    "CepeForCausalLM",
    "EncoderSpec",
    "build_encoder_config",
    "encoder_from_decoder_layers",
    "is_cepe_model",
    "load_encoder",
    "register_auto_classes",
]
