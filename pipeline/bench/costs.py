"""What CEPE and full attention cost, counted from the configs: FLOPs, bytes kept, bytes read.

Everything here is arithmetic on the model shapes, so the benchmark can say how far each measured
time is from the hardware limit and whether the memory it measured is the memory it expected.
The counts follow docs/performance.md ("CEPE's cost, counted"): matmul FLOPs as 2 x multiply-adds,
forward only; elementwise work (norms, RoPE, softmax) is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shape:
    """The few numbers of a Llama-family transformer that its cost depends on."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool = False

    @classmethod
    def of(cls, config: Any) -> "Shape":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            ffn=config.intermediate_size,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
        )

    # ------------------------------------------------------------------ parameters
    @property
    def layer_params(self) -> int:
        """One decoder layer: q, k, v, o, gate, up, down and its two RMSNorms."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.ffn
        return q_o + k_v + mlp + 2 * self.hidden

    @property
    def params(self) -> int:
        """All parameters (embeddings counted once when tied)."""
        embed = self.vocab * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return self.layers * self.layer_params + embed + head + self.hidden

    @property
    def linear_params_per_layer(self) -> int:
        return self.layer_params - 2 * self.hidden


def cross_attention_params(dec: Shape, enc: Shape, layers: int | None = None) -> int:
    """q (D x H*d), k and v (E x H*d), o (H*d x D) and an RMSNorm(D), in each of `layers` layers."""
    inner = dec.heads * dec.head_dim
    per_layer = 2 * dec.hidden * inner + 2 * enc.hidden * inner + dec.hidden
    return (dec.layers if layers is None else layers) * per_layer


# ---------------------------------------------------------------------------------------------
# Memory model: bytes kept per context token
# ---------------------------------------------------------------------------------------------
def full_bytes_per_token(dec: Shape, dtype_bytes: int = 2) -> int:
    """Full attention keeps K and V of every layer for every token: 2 x layers x kv_heads x d."""
    return 2 * dec.layers * dec.kv_heads * dec.head_dim * dtype_bytes


def cepe_bytes_per_context_token(enc: Shape, dtype_bytes: int = 2) -> int:
    """CEPE keeps one encoder state per context token, shared by all layers (cross-attention K/V
    are not cached). A padded context also keeps a 1-byte padding mask; the benchmark's context
    has no padding and passes none."""
    return enc.hidden * dtype_bytes


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
def causal_attention_flops(shape: Shape, q_len: int, past_len: int = 0) -> int:
    """Scores and weighted sum of causal self-attention, all layers: query i sees past_len + i + 1 keys."""
    keys_seen = q_len * past_len + q_len * (q_len + 1) // 2
    return 4 * shape.layers * shape.heads * shape.head_dim * keys_seen


def decoder_flops(shape: Shape, q_len: int, past_len: int = 0, logits_tokens: int = 1, batch: int = 1) -> int:
    """One decoder forward over `q_len` new tokens after `past_len` cached ones, keeping the logits
    of `logits_tokens` positions (the benchmark keeps only the last)."""
    linear = 2 * shape.layers * shape.linear_params_per_layer * q_len
    head = 2 * shape.hidden * shape.vocab * min(logits_tokens, q_len)
    return batch * (linear + head + causal_attention_flops(shape, q_len, past_len))


def encoder_flops(enc: Shape, n_chunks: int, chunk_len: int, batch: int = 1) -> int:
    """The encoder over `n_chunks` independent chunks: linear layers plus bidirectional attention
    inside each chunk (no output head)."""
    tokens = n_chunks * chunk_len
    linear = 2 * enc.layers * enc.linear_params_per_layer * tokens
    attention = 4 * enc.layers * enc.heads * enc.head_dim * chunk_len * chunk_len * n_chunks
    return batch * (linear + attention)


def cross_attention_flops(
    dec: Shape, enc: Shape, q_len: int, ctx_len: int, form: str = "projected", layers: int | None = None, batch: int = 1
) -> int:
    """Cross-attention of `q_len` queries over `ctx_len` encoder states, in `layers` layers.

    projected: q and o projections, K = W_k phi and V = W_v phi for every context token, then
    scores and weighted sum at head width d.
    absorbed: q and o projections, the query folded through W_k (d -> E per head), scores and
    weighted sum at width E against phi itself, then W_v (E -> d per head).
    """
    n = dec.layers if layers is None else layers
    inner = dec.heads * dec.head_dim
    q_o = 2 * 2 * q_len * dec.hidden * inner
    if form == "projected":
        k_v = 2 * 2 * ctx_len * enc.hidden * inner
        attend = 4 * q_len * ctx_len * inner
        per_layer = q_o + k_v + attend
    elif form == "absorbed":
        fold = 2 * 2 * q_len * dec.heads * dec.head_dim * enc.hidden  # q W_k and ctx W_v^T
        attend = 4 * q_len * dec.heads * ctx_len * enc.hidden
        per_layer = q_o + fold + attend
    else:
        raise ValueError(f"form: expected projected or absorbed, got {form!r}")
    return batch * n * per_layer


# ---------------------------------------------------------------------------------------------
# Bytes one decode step must read (its floor at the device's bandwidth)
# ---------------------------------------------------------------------------------------------
def _decoder_weight_bytes(shape: Shape, dtype_bytes: int) -> int:
    """Weights a decode step reads: every layer and the output head (one embedding row aside)."""
    return dtype_bytes * (shape.layers * shape.layer_params + shape.vocab * shape.hidden + shape.hidden)


def full_decode_step_bytes(dec: Shape, cached_tokens: int, batch: int = 1, dtype_bytes: int = 2) -> int:
    return _decoder_weight_bytes(dec, dtype_bytes) + batch * cached_tokens * full_bytes_per_token(dec, dtype_bytes)


def cepe_decode_step_bytes(
    dec: Shape,
    enc: Shape,
    decoder_tokens: int,
    ctx_len: int,
    form: str,
    batch: int = 1,
    dtype_bytes: int = 2,
    layers: int | None = None,
) -> int:
    """Decoder and cross-attention weights, the decoder's own KV cache, and the encoder states:
    read once per layer in the absorbed form with the fused kernel (`absorbed`), twice as two
    matmuls (`absorbed_matmul`: scores, then the weighted sum); in the projected form read once,
    and K, V (H*d wide) written and read back in every layer."""
    n = dec.layers if layers is None else layers
    weights = _decoder_weight_bytes(dec, dtype_bytes) + dtype_bytes * cross_attention_params(dec, enc, n)
    kv = batch * decoder_tokens * full_bytes_per_token(dec, dtype_bytes)
    phi = batch * ctx_len * enc.hidden * dtype_bytes
    if form == "absorbed":
        context = n * phi
    elif form == "absorbed_matmul":
        context = n * 2 * phi
    else:
        kv_ctx = batch * ctx_len * 2 * dec.heads * dec.head_dim * dtype_bytes
        context = n * (phi + 2 * kv_ctx)
    return weights + kv + context
