"""Shared fixtures: offline mode and tiny random models built from configs (milliseconds)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

TINY_VOCAB = 128
TINY_ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


def tiny_decoder(family: str = "llama", attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    """A tiny random decoder of a `transformers` family (llama, mistral, qwen2)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }
    conf_cls, model_cls = classes[family]
    values = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2 if family != "llama" else 4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    values.update(overrides)
    config = conf_cls(**values)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return model_cls(config).eval()


def tiny_cepe(decoder=None, init_mode: str = "zero", seed: int = 0, **kwargs):
    from pipeline.model import CepeForCausalLM

    decoder = decoder if decoder is not None else tiny_decoder(seed=seed)
    torch.manual_seed(seed + 1)
    return CepeForCausalLM.from_decoder(decoder, encoder_config=dict(TINY_ENCODER), init_mode=init_mode, **kwargs).eval()


@pytest.fixture
def tiny_llama():
    return tiny_decoder("llama")


@pytest.fixture
def cepe_model():
    return tiny_cepe()
