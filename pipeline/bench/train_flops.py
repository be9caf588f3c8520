"""FLOPs of one CEPE training step, counted from the shapes (what the train bench's MFU divides by).

A training step of a CEPE stage is: the encoder over its chunks, the frozen decoder with
cross-attention over the decoder tokens, the loss, the backward pass, and AdamW on the trainable
parameters. What the backward pass must compute follows from what trains:

- the encoder and the cross-attention train: every matmul of theirs is counted three times its
  forward (forward, gradient of the input, gradient of the weight), attention cores included
  (forward QK^T and PV; backward dQ, dK, dV, dP);
- the frozen decoder needs no weight gradients, only the activation gradients that carry the
  loss down to the lowest cross-attention: each frozen linear layer costs one forward's worth in
  the backward pass (dX = dY W^T), each self-attention core two (dQ, dK, dV, dP: there are no
  weights in it), the output head one (d hidden = d logits W^T);
- below the lowest cross-attention nothing needs a gradient: the self-attention of the layer that
  holds the first cross-attention and every layer under it get no backward pass at all (autograd
  does not reach them: their inputs and weights do not require gradients).

Counted as in `costs` (docs/performance.md): matmul FLOPs as 2 x multiply-adds; norms, RoPE,
softmax, the loss and the optimiser are left out; causal attention counts the keys each query sees
(half the square) unless `dense_causal` (the masked square, which eager attention computes).
Gradient-checkpointing recomputation is not model FLOPs; it is reported apart (`recompute`), so
MFU is the same with and without checkpointing and HFU = (total + recompute) / time.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.bench.costs import Shape, causal_attention_flops, cross_attention_flops, encoder_flops


@dataclass(frozen=True)
class StepShape:
    """What one micro-batch holds: `batch` sequences of `decoder_tokens`, each with `n_chunks`
    encoder chunks of `chunk_len`; an online teacher (CEPED) reads `teacher_tokens` per sequence
    and keeps the logits of its last `teacher_logits` positions."""

    batch: int
    decoder_tokens: int
    n_chunks: int
    chunk_len: int
    teacher_tokens: int = 0
    teacher_logits: int = 0

    @property
    def context_tokens(self) -> int:
        return self.n_chunks * self.chunk_len


def _self_attention_core(dec: Shape, tokens: int, layers: int, dense_causal: bool) -> int:
    """QK^T and PV of `layers` causal self-attention layers over `tokens` tokens."""
    one = Shape(layers=layers, hidden=dec.hidden, heads=dec.heads, kv_heads=dec.kv_heads,
                head_dim=dec.head_dim, ffn=dec.ffn, vocab=dec.vocab)
    if dense_causal:
        return 4 * layers * dec.heads * dec.head_dim * tokens * tokens
    return causal_attention_flops(one, tokens)


def _attention_projections(dec: Shape) -> int:
    """Weights of q, k, v, o of one decoder layer."""
    return 2 * dec.hidden * dec.heads * dec.head_dim + 2 * dec.hidden * dec.kv_heads * dec.head_dim


def _frozen_forward(dec: Shape, tokens: int, logits: int, dense_causal: bool) -> int:
    """The decoder's own forward (no cross-attention) over `tokens`, logits at `logits` positions."""
    linear = 2 * dec.layers * dec.linear_params_per_layer * tokens
    head = 2 * dec.hidden * dec.vocab * logits
    return linear + head + _self_attention_core(dec, tokens, dec.layers, dense_causal)


def train_step_flops(
    dec: Shape,
    enc: Shape,
    step: StepShape,
    cross_layers: int,
    *,
    form: str = "projected",
    train_encoder: bool = True,
    checkpointing: str = "none",
    dense_causal: bool = False,
) -> dict[str, int]:
    """FLOPs of one micro-batch's forward + backward, by part (see the module docstring).

    Args:
        cross_layers: cross-attention in the last `cross_layers` decoder layers.
        form: the cross-attention form the forward runs (training runs `projected`: many queries).
        checkpointing: none | decoder | all, for the `recompute` entry only (decoder: each decoder
            layer that gets a backward pass is run forward again, cross-attention included; all:
            the encoder's layers too).
    Returns:
        encoder_forward, encoder_backward, decoder_forward (frozen layers + output head),
        cross_forward, decoder_backward (activation gradients only), cross_backward,
        teacher_forward, total (the sum: model FLOPs), recompute (checkpointing's extra forward).
    """
    b, t, s = step.batch, step.decoder_tokens, step.context_tokens
    first = dec.layers - cross_layers  # index of the lowest layer with cross-attention
    if not 0 <= first < dec.layers:
        raise ValueError(f"cross_layers: expected 1..{dec.layers}, got {cross_layers}")

    enc_fwd = encoder_flops(enc, step.n_chunks, step.chunk_len, batch=b)
    dec_fwd = b * _frozen_forward(dec, t, t, dense_causal)  # training keeps every position's logits
    cross_fwd = cross_attention_flops(dec, enc, t, s, form, cross_layers, b)

    # Frozen decoder, backward: layers above `first` whole (linears 1x, attention core 2x), layer
    # `first` its MLP only (its self-attention sits below the cross-attention), the head 1x.
    above = dec.layers - first - 1
    mlp = 3 * dec.hidden * dec.ffn
    dec_bwd_linear = 2 * t * (above * dec.linear_params_per_layer + mlp)
    dec_bwd_attention = 2 * _self_attention_core(dec, t, above, dense_causal) if above else 0
    dec_bwd = b * (dec_bwd_linear + dec_bwd_attention + 2 * dec.hidden * dec.vocab * t)

    # Trained parts, backward: 2x forward; with a frozen encoder the k/v projections of its states
    # need their weight gradients only (no gradient of phi), and the encoder no backward at all.
    cross_bwd = 2 * cross_fwd
    enc_bwd = 2 * enc_fwd if train_encoder else 0
    if not train_encoder:
        inner = dec.heads * dec.head_dim
        cross_bwd -= b * cross_layers * 2 * 2 * s * enc.hidden * inner

    teacher = 0
    if step.teacher_tokens:
        teacher = b * _frozen_forward(dec, step.teacher_tokens, step.teacher_logits or step.teacher_tokens, dense_causal)

    parts = {
        "encoder_forward": enc_fwd,
        "encoder_backward": enc_bwd,
        "decoder_forward": dec_fwd,
        "cross_forward": cross_fwd,
        "decoder_backward": dec_bwd,
        "cross_backward": cross_bwd,
        "teacher_forward": teacher,
    }
    parts["total"] = sum(parts.values())

    recompute = 0
    if checkpointing in ("decoder", "all"):
        # every checkpointed decoder layer from `first` up runs its forward again in the backward
        layer_linear = 2 * t * dec.linear_params_per_layer
        rec_layers = dec.layers - first
        recompute += b * (rec_layers * layer_linear + _self_attention_core(dec, t, rec_layers, dense_causal)) + cross_fwd
    if checkpointing == "all" and train_encoder:
        recompute += enc_fwd
    elif checkpointing not in ("none", "decoder", "all"):
        raise ValueError(f"checkpointing: expected none, decoder or all, got {checkpointing!r}")
    parts["recompute"] = recompute
    return parts


__all__ = ["StepShape", "train_step_flops"]
