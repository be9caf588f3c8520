"""Loading the model and tokenizer under evaluation, and the few facts evaluation needs of them.

Any `AutoModelForCausalLM`-loadable directory works: a plain decoder or a CEPE model
(`pipeline.model` is imported first so the "cepe" model type is registered). Anything that fails
to load becomes a one-line `CepeError` naming the path, not a traceback.
"""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.decoders import decoder_of, is_cepe_model
from pipeline.devices import resolve_device, resolve_dtype
from pipeline.errors import CepeError


def max_positions(model: Any) -> int | None:
    """The decoder's position limit (`max_position_embeddings`), or None if it has none."""
    config = getattr(decoder_of(model), "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_tokenizer(name_or_path: str, option: str = "tokenizer") -> Any:
    """The project's tokenizer loader ("embedded", paths, hub names); `option` is the config key
    the name came from (errors name it)."""
    from pipeline.data.tokenize import load_tokenizer as project_loader

    try:
        tok = project_loader(name_or_path, option)
    except CepeError:
        raise
    except Exception as exc:  # OSError, ValueError, JSON errors from a broken folder
        raise CepeError(f"tokenizer {name_or_path!r} cannot be loaded: {_one_line(exc)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, dtype: str = "auto", device: str = "auto",
               attn_implementation: str | None = "sdpa") -> Any:
    """`AutoModelForCausalLM.from_pretrained` with CEPE registered, in eval mode on `device`."""
    if not name_or_path:
        raise CepeError("model: a model directory or name is required (--model PATH)")
    from pipeline.hub import require_local_or_hub

    require_local_or_hub(name_or_path, "model")
    from transformers import AutoModelForCausalLM

    importlib.import_module("pipeline.model")  # registers CepeForCausalLM when it is present
    dev = resolve_device(device)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype, dev)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except Exception as exc:
        raise CepeError(f"model {name_or_path!r} cannot be loaded: {_one_line(exc)}") from None
    model.to(dev)
    model.eval()
    return model


def describe(model: Any) -> dict[str, Any]:
    """What a run records about the model."""
    return {
        "cepe": is_cepe_model(model),
        "model_type": getattr(model.config, "model_type", None),
        "decoder_type": getattr(decoder_of(model).config, "model_type", None),
        "max_positions": max_positions(model),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "n_params": sum(p.numel() for p in model.parameters()),
    }
