"""Facts about a `transformers` decoder that several rooms need, each answered in one place.

- `is_cepe_model`: a CEPE model announces itself by `config.model_type == "cepe"`.
- `decoder_of`: the plain decoder inside a CEPE model (`model.decoder`), or the model itself.
- `decoder_body` / `decoder_layers`: the module holding `embed_tokens`, `layers` and `norm`, and
  its layers, for a causal LM, its base model, or a CEPE model (its wrapped decoder's).
- `check_pre_norm_layers`: whether every layer is the pre-norm attention/MLP form that CEPE's
  layer forward (`pipeline/model/cepe.py`, `CrossAttentionLayerMixin`) re-implements.
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


# The submodules of a layer computing h += self_attn(input_layernorm(h)); h += mlp(post_attention_layernorm(h)).
PRE_NORM_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def check_pre_norm_layers(model: nn.Module) -> None:
    """A CepeError (one line) unless every decoder layer holds exactly the four parts of the
    pre-norm form (besides a `cross_attn` already added): CEPE runs the layer as that form, so a
    layer with more parts (Gemma-2's norms after attention and around the MLP, OLMo-2's post-norms,
    dropout modules) or fewer (parallel attention and MLP) would run wrongly, not fail."""
    decoder = decoder_of(model)
    kind = getattr(getattr(decoder, "config", None), "model_type", None) or type(decoder).__name__
    for i, layer in enumerate(decoder_layers(decoder)):
        parts = {name for name, _ in layer.named_children()} - {"cross_attn"}
        extra, missing = sorted(parts - set(PRE_NORM_PARTS)), sorted(set(PRE_NORM_PARTS) - parts)
        if extra or missing:
            found = "; ".join(s for s in (f"has {', '.join(extra)}" if extra else "",
                                          f"lacks {', '.join(missing)}" if missing else "") if s)
            raise CepeError(f"decoder: {kind} layers are not the pre-norm attention/MLP form CEPE wraps "
                            f"({', '.join(PRE_NORM_PARTS)}): layer {i} {found}")
