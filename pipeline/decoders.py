"""Facts about a `transformers` decoder that several rooms need, each answered in one place.

- `is_cepe_model`: a CEPE model announces itself by `config.model_type == "cepe"`.
- `decoder_of`: the plain decoder inside a CEPE model (`model.decoder`), or the model itself.
- `decoder_body` / `decoder_layers`: the module holding `embed_tokens`, `layers` and `norm`, and
  its layers, for a causal LM, its base model, or a CEPE model (its wrapped decoder's).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.errors import CepeError


def is_cepe_model(model: Any) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "cepe"


def decoder_of(model: Any) -> Any:
    """The plain decoder inside a CEPE model, or the model itself."""
    return model.decoder if is_cepe_model(model) and hasattr(model, "decoder") else model


def decoder_body(model: nn.Module) -> nn.Module:
    """The decoder's base model (`LlamaModel` of a `LlamaForCausalLM`; itself for a base model)."""
    model = decoder_of(model)
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    if not isinstance(getattr(body, "layers", None), nn.ModuleList):
        raise CepeError(f"{type(model).__name__}: expected decoder layers at .model.layers")
    return body


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM, of its base model, or of a CEPE model."""
    return decoder_body(model).layers
