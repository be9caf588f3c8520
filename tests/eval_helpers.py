"""Tiny, file-free models and tokenizers for the evaluation tests (built in milliseconds).

The tokenizer is byte-level (one token per UTF-8 byte, plus <s>, </s>, <pad>), so token counts
are predictable by hand: len(text.encode()) tokens, plus BOS.
"""

from __future__ import annotations

from pathlib import Path

import torch


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    specials = ["<s>", "</s>", "<pad>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": []})
    return fast


def tiny_llama(vocab_size: int = 259, max_positions: int = 4096, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = 257
    model.generation_config.pad_token_id = 258
    return model.eval()


def save_tiny(path: Path, max_positions: int = 4096, seed: int = 0) -> Path:
    """A tiny Llama + byte tokenizer saved as a model directory `cepe evaluate` can load."""
    model = tiny_llama(max_positions=max_positions, seed=seed)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def tiny_cepe(max_positions: int = 4096, seed: int = 0, perturb: float = 0.5):
    """A tiny CEPE model around `tiny_llama`, its cross-attention output made non-zero so that
    the encoder input changes the logits."""
    from pipeline.model import CepeForCausalLM

    decoder = tiny_llama(max_positions=max_positions, seed=seed)
    torch.manual_seed(seed + 1)
    model = CepeForCausalLM.from_decoder(
        decoder, encoder_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4)
    )
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for layer in model.cross_attention_layers():
            w = layer.cross_attn.o_proj.weight
            w.copy_(torch.randn(w.shape, generator=g) * perturb / w.shape[1] ** 0.5)
    return model.eval()


def save_tiny_cepe(path: Path, max_positions: int = 4096, seed: int = 0) -> Path:
    model = tiny_cepe(max_positions=max_positions, seed=seed)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
