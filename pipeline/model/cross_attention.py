"""Cross-attention from the decoder's hidden states to the encoder's states, in two forms.

The module (docs/method.md §1.3): its own RMSNorm, `q = W_q norm(h)` from the decoder state,
`K = W_k phi`, `V = W_v phi` projected straight from the encoder width to all of the decoder's
heads, no positional encoding, no gate, no causal mask, the encoder's key-padding mask, then
`W_o`. The decoder layer adds the result to its residual stream.

Two mathematically equal forms:
- projected (the paper's): K and V are materialised for all S context tokens, per layer, per
  call. Cheap when many queries share them (training, prefill).
- absorbed: per head, fold W_k into the query (q' = q W_k,h, width H_enc) and apply W_v after the
  weighted sum over phi itself. Nothing of size S x H*d is ever built; each step reads only the
  encoder states, which all layers share. This is what makes generation over a long context
  cheap: the projected form re-projects 124K x 1024 states in every layer for every new token.
`form="auto"` picks absorbed when it needs fewer FLOPs (few queries: T (H_enc - d) < H_enc d)
and the context has at least `absorbed_min_context` tokens (measured faster from 2K on, H200).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.fastdecode import absorbed

# "absorbed_matmul": the absorbed form kept to torch's matmuls (no one-pass kernel), for
# comparisons (pipeline/bench, benchmarks/); "auto" never picks it.
FORMS = ("auto", "projected", "absorbed", "absorbed_matmul")


LEAN_NORMS = True  # see lean_norm


def lean_norm(norm: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`norm(hidden_states)`; while training, recomputed in the backward pass instead of keeping
    its intermediates.

    A Llama-family RMSNorm computes in fp32 and keeps an fp32 copy of its bf16 input for the
    backward pass (and, with a trainable weight, its bf16 normalised output too): at 4096 tokens x
    4096 that is 64 MB per frozen norm and 96 MB for the cross-attention's, where the bf16 input
    kept instead is 32 MB: 128 MB per CEPE layer, about 4 GB over LLaMA-2-7B's 32 layers at one
    4096-token sequence. The recomputation runs the same module forward on the same input under the
    same autocast state: the loss and every gradient are unchanged, bitwise (tests/test_bench_train.py); the cost
    is a few elementwise kernels per norm. Outside training (or without gradients) it is the plain
    call. `LEAN_NORMS = False` turns it off.
    """
    needs_grad = hidden_states.requires_grad or any(p.requires_grad for p in norm.parameters())
    if LEAN_NORMS and norm.training and needs_grad and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(norm, hidden_states, use_reentrant=False, preserve_rng_state=False)
    return norm(hidden_states)


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class KeyMask:
    """The encoder's key-padding mask in the form every cross-attention layer uses.

    key_mask: (B, 1, 1, S) bool (True = attend) or None when every context token is real (then
        sdpa keeps its fused kernels and nothing is masked); rows with no real token at all
        attend everywhere, so their softmax stays finite.
    keep_rows: (B,) bool, False for examples whose context is entirely padding (their
        cross-attention output is zeroed), or None when every example has context.
    """

    key_mask: torch.Tensor | None = None
    keep_rows: torch.Tensor | None = None

    @classmethod
    def build(cls, padding_mask: torch.Tensor | None) -> "KeyMask":
        if padding_mask is None or bool(padding_mask.all()):
            return cls()
        valid = padding_mask.bool()
        has_any = valid.any(dim=-1)  # (B,)
        keep_rows = None
        if not bool(has_any.all()):
            keep_rows = has_any
            valid = valid | ~has_any[:, None]  # empty contexts attend everywhere, then are zeroed
        return cls(valid[:, None, None, :], keep_rows)


class CepeCrossAttention(nn.Module):
    """Cross-attention sublayer: (B, T, D) decoder states x (B, S, E) encoder states -> (B, T, D)."""

    is_causal = False  # the shared attention helpers read this; cross-attention is never causal
    # Above this many (query x context) scores the absorbed form goes through sdpa instead of
    # materialising the score matrix (pipeline/fastdecode/absorbed.py).
    ABSORBED_DIRECT_MAX_SCORES = absorbed.DIRECT_MAX_SCORES
    # Without autograd the projected form builds K and V for a group of heads at a time, at most
    # this many bytes: at 124K context K and V of all 32 heads are 2 GB in bf16, the largest
    # allocation of a CEPE prefill (it decides the whole-process peak). Heads are independent,
    # so the result is the same.
    PROJECTED_KV_MAX_BYTES = 256 * 1024 * 1024

    def __init__(
        self,
        hidden_size: int,
        encoder_hidden_size: int,
        num_heads: int,
        head_dim: int,
        norm: nn.Module,
        attn_implementation: str = "sdpa",
        form: str = "auto",
        absorbed_min_context: int = 1024,
    ):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"cross_attn_form: expected one of {FORMS}, got {form!r}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.encoder_hidden_size = encoder_hidden_size
        self.scaling = head_dim**-0.5
        self.attn_implementation = attn_implementation
        self.form = form
        self.absorbed_min_context = absorbed_min_context
        self.norm = copy.deepcopy(norm)  # the decoder's RMSNorm class and eps; weights set by init
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(encoder_hidden_size, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(encoder_hidden_size, num_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    # ------------------------------------------------------------------ selection
    def choose_form(self, num_queries: int, context_len: int) -> str:
        if self.form != "auto":
            return self.form
        e, d = self.encoder_hidden_size, self.head_dim
        fewer_flops = num_queries * max(e - d, 0) < e * d
        return "absorbed" if fewer_flops and context_len >= self.absorbed_min_context else "projected"

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_padding_mask: torch.Tensor | None = None,
        form: str | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: (B, T, D) decoder residual stream (normed here).
            encoder_hidden_states: (B, S, E).
            encoder_padding_mask: (B, S) bool, True for real context tokens; None = all real; or
                a `KeyMask` built once for all layers (the model does this: building one
                inspects the mask, a host-device sync).
            form: force "projected" or "absorbed" (tests, benchmarks), or "absorbed_matmul" (the
                absorbed form without the fused decode kernel); default by `choose_form`.
        Returns:
            (B, T, D), to be added to the residual stream. Rows whose context is entirely padding
            get exactly zero.
        """
        bsz, q_len, _ = hidden_states.shape
        ctx_len = encoder_hidden_states.shape[1]
        x = lean_norm(self.norm, hidden_states)
        q = self.q_proj(x).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        phi = encoder_hidden_states.to(q.dtype)

        if not isinstance(encoder_padding_mask, KeyMask):
            encoder_padding_mask = KeyMask.build(encoder_padding_mask)
        key_mask, keep_rows = encoder_padding_mask.key_mask, encoder_padding_mask.keep_rows

        chosen = form if form not in (None, "auto") else self.choose_form(q_len, ctx_len)
        if chosen in ("absorbed", "absorbed_matmul"):
            out = self._absorbed(q, phi, key_mask, fused=chosen == "absorbed")
        else:
            out = self._projected(q, phi, key_mask)
        out = out.transpose(1, 2).reshape(bsz, q_len, self.num_heads * self.head_dim)  # (B, T, H*d)
        out = self.o_proj(out)
        if keep_rows is not None:
            out = out * keep_rows[:, None, None].to(out.dtype)
        return out

    def _projected(self, q: torch.Tensor, phi: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, H, T, d), phi (B, S, E) -> (B, H, T, d) with K, V = W_k phi, W_v phi materialised."""
        bsz, ctx_len, _ = phi.shape
        heads, d = self.num_heads, self.head_dim
        group = heads
        if not torch.is_grad_enabled():
            per_head = 2 * bsz * ctx_len * d * phi.element_size()  # K and V of one head
            group = max(1, min(heads, self.PROJECTED_KV_MAX_BYTES // per_head))
            while heads % group:
                group -= 1
        if group == heads:
            k = self.k_proj(phi).view(bsz, ctx_len, heads, d).transpose(1, 2)  # (B, H, S, d)
            v = self.v_proj(phi).view(bsz, ctx_len, heads, d).transpose(1, 2)  # (B, H, S, d)
            return self._attend(q, k, v, key_mask, self.scaling)
        outs = []
        for h0 in range(0, heads, group):
            rows = slice(h0 * d, (h0 + group) * d)  # the output rows of W_k, W_v that feed these heads
            k = F.linear(phi, self.k_proj.weight[rows]).view(bsz, ctx_len, group, d).transpose(1, 2)  # (B, g, S, d)
            v = F.linear(phi, self.v_proj.weight[rows]).view(bsz, ctx_len, group, d).transpose(1, 2)  # (B, g, S, d)
            outs.append(self._attend(q[:, h0 : h0 + group], k, v, key_mask, self.scaling))
            del k, v
        return torch.cat(outs, dim=1)  # (B, H, T, d)

    def _absorbed(self, q: torch.Tensor, phi: torch.Tensor, key_mask: torch.Tensor | None, fused: bool = True) -> torch.Tensor:
        """Same result without projecting the context: q (B, H, T, d), phi (B, S, E) -> (B, H, T, d),
        by `pipeline.fastdecode.absorbed` (the one-pass kernel unless `fused` is False)."""
        heads, d, e = self.num_heads, self.head_dim, self.encoder_hidden_size
        w_k = self.k_proj.weight.view(heads, d, e)  # (H, d, E)
        w_v = self.v_proj.weight.view(heads, d, e)  # (H, d, E)
        return absorbed.absorbed_attention(q, w_k, w_v, phi, key_mask, self.scaling, self._attend, fused=fused,
                                           direct_max_scores=self.ABSORBED_DIRECT_MAX_SCORES)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """Non-causal attention with a key-padding mask, by the configured backend.

        q (B, h, T, d_q), k (B, h, S, d_q), v (B, h, S, d_v), key_mask (B, 1, 1, S) bool or None.
        """
        impl = self.attn_implementation
        if impl == "flash_attention_2" and q.is_cuda and key_mask is None and q.shape[-1] == v.shape[-1] <= 256:
            from flash_attn import flash_attn_func

            # flash-attn takes (B, T, h, d); with a padding mask we fall through to sdpa, which on
            # Hopper runs its own fused kernels with a boolean mask.
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=False)
            return out.transpose(1, 2)
        if impl == "eager":
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, h, T, S)
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask, torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            return torch.matmul(probs, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=False, scale=scale)

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_from_self_attention(self, layer: nn.Module, o_mode: str = "zero") -> None:
        """The paper's initialisation (docs/method.md §1.4) from the decoder layer it sits in.

        q <- self-attention q; k, v <- the first E input columns of self-attention k, v, with
        grouped-query heads repeated to every query head (as `repeat_kv` pairs them); norm <-
        post-attention norm; o <- zero (`zero`), self-attention o (`copy`) or Kaiming-normal
        (`normal`). If the encoder is wider than the decoder, k and v fall back to normal init.
        """
        attn = layer.self_attn
        self.q_proj.weight.copy_(attn.q_proj.weight)
        hidden = attn.k_proj.weight.shape[1]
        e = self.encoder_hidden_size
        if e <= hidden:
            kv_heads = attn.k_proj.weight.shape[0] // self.head_dim
            groups = self.num_heads // kv_heads
            for src, dst in ((attn.k_proj.weight, self.k_proj.weight), (attn.v_proj.weight, self.v_proj.weight)):
                w = src[:, :e].reshape(kv_heads, self.head_dim, e)  # (kv, d, E)
                w = w.repeat_interleave(groups, dim=0)  # (H, d, E): head h reads kv head h // groups
                dst.copy_(w.reshape(self.num_heads * self.head_dim, e))
        else:
            nn.init.normal_(self.k_proj.weight, std=0.02)
            nn.init.normal_(self.v_proj.weight, std=0.02)
        self.norm.weight.copy_(layer.post_attention_layernorm.weight)
        if o_mode == "zero":
            self.o_proj.weight.zero_()
        elif o_mode == "copy":
            self.o_proj.weight.copy_(attn.o_proj.weight)
        elif o_mode == "normal":
            nn.init.kaiming_normal_(self.o_proj.weight, a=math.sqrt(5))
        else:
            raise ValueError(f"cross_attn_init: expected zero, copy or normal, got {o_mode!r}")
