"""Analytic matmul FLOPs of one training example, and the device peak they are measured against.

Counting rules (a multiply-add is 2 FLOPs; element-wise work, norms and softmax are not counted):
- a linear layer of P weights over N tokens costs 2 P N forward;
- attention of T queries over S keys with width d (heads x head_dim) costs 4 T S d forward
  (Q K^T and the product with V); causal self-attention counts half of it;
- backward: a matmul's backward computes one product per operand that needs a gradient. A
  trained linear layer needs both (input and weight): 2x its forward; a frozen one through which
  the gradient still flows needs the input's only: 1x; attention has two activation operands:
  2x. So trained parts cost 3x forward, the frozen decoder 2x (linear) / 3x (attention) where the
  gradient passes, 1x below the lowest cross-attention layer (nothing trainable under it), and a
  frozen encoder 1x.

These are the model FLOPs of MFU (no recomputation counted, as with gradient checkpointing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Dense bf16 tensor-core peaks (spec sheets, without sparsity), by a substring of
# torch.cuda.get_device_name(); the first match wins, so the more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("GH200", 989.4e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)


@dataclass(frozen=True)
class Stack:
    """What a transformer stack's FLOPs depend on (Llama-shaped: q, k, v, o, gate, up, down)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def from_config(cls, config: Any) -> "Stack":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, config.hidden_size, heads,
                   getattr(config, "num_key_value_heads", None) or heads, head_dim, config.intermediate_size)

    @property
    def attn_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def layer_weights(self) -> int:
        """Matmul weights of one layer: q and o (hidden x heads*head_dim), k and v (kv heads), the MLP."""
        kv = self.kv_heads * self.head_dim
        return 2 * self.hidden * self.attn_width + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate


def _linear(weights: int, tokens: int) -> float:
    return 2.0 * weights * tokens


def _attention(queries: int, keys: int, width: int, causal: bool) -> float:
    return 4.0 * queries * keys * width / (2 if causal else 1)


def cepe_example_flops(decoder: Stack, vocab_size: int, encoder: Stack, n_cross: int, *, decoder_len: int,
                       n_chunks: int, chunk_len: int, train_encoder: bool) -> float:
    """Forward + backward FLOPs of one CEPE training window (warm-up, train, distill).

    The frozen decoder reads `decoder_len` tokens; cross-attention (trained, in the last `n_cross`
    decoder layers) reads the encoder's `n_chunks * chunk_len` states; the encoder runs each
    chunk bidirectionally on its own. Teacher passes (CEPED online) are not counted.
    """
    T, S = decoder_len, n_chunks * chunk_len
    below = decoder.layers - n_cross  # layers under the lowest cross-attention: forward only
    layer_lin = _linear(decoder.layer_weights, T)
    layer_attn = _attention(T, T, decoder.attn_width, causal=True)
    dec = below * (layer_lin + layer_attn) + n_cross * (2 * layer_lin + 3 * layer_attn)
    dec += 2 * _linear(decoder.hidden * vocab_size, T)  # lm_head, frozen, gradient flows into it
    x_width = decoder.attn_width  # cross-attention: q/o over the decoder, k/v over the encoder states
    cross = _linear(2 * decoder.hidden * x_width, T) + _linear(2 * encoder.hidden * x_width, S)
    cross += _attention(T, S, x_width, causal=False)
    enc = encoder.layers * (_linear(encoder.layer_weights, S)
                            + n_chunks * _attention(chunk_len, chunk_len, encoder.attn_width, causal=False))
    return dec + 3 * n_cross * cross + (3 if train_encoder else 1) * enc


def mlm_example_flops(encoder: Stack, vocab_size: int, seq_len: int) -> float:
    """Forward + backward FLOPs of one masked-LM sequence: every part trained (3x forward).

    The MLM head is counted as its vocabulary projection over every position (the loss reads
    only the masked ones, but the head runs on all of them).
    """
    layers = encoder.layers * (_linear(encoder.layer_weights, seq_len)
                               + _attention(seq_len, seq_len, encoder.attn_width, causal=False))
    return 3 * (layers + _linear(encoder.hidden * vocab_size, seq_len))


def cepe_model_flops(model: Any, *, decoder_len: int, n_chunks: int, chunk_len: int) -> float:
    """`cepe_example_flops` for a `CepeForCausalLM` (its configs, cross-attention layers, whether
    the encoder trains)."""
    cfg = model.config
    encoder_trains = any(p.requires_grad for p in model.encoder.parameters())
    return cepe_example_flops(Stack.from_config(cfg.decoder_config), cfg.decoder_config.vocab_size,
                              Stack.from_config(cfg.encoder_config), len(model.cross_attention_layers()),
                              decoder_len=decoder_len, n_chunks=n_chunks, chunk_len=chunk_len,
                              train_encoder=encoder_trains)


def device_peak_flops(device: Any = None) -> dict[str, Any]:
    """`{"device_name", "peak_flops_per_s", "peak_source"}` of the CUDA device (bf16 dense from
    PEAK_BF16_FLOPS); on CPU, or a GPU not in the table, the peak is None (no MFU is claimed)."""
    import torch

    if not torch.cuda.is_available() or (device is not None and getattr(device, "type", "cuda") != "cuda"):
        return {"device_name": "cpu", "peak_flops_per_s": None, "peak_source": None}
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return {"device_name": name, "peak_flops_per_s": peak, "peak_source": f"bf16 dense spec sheet ({key})"}
    return {"device_name": name, "peak_flops_per_s": None, "peak_source": None}
