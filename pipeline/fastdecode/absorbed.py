"""The absorbed cross-attention, one dispatcher for all its paths (what `cross_attention.py` calls).

Per head h, score_h = (q_h W_k,h) . phi_s / sqrt(d) and out_h = (sum_s p_hs phi_s) W_v,h^T
(docs/method.md §1.5). All heads attend to the one shared phi, so the H*T queries form one "head"
of width E. The paths, in the order they are tried:

1. the one-pass Triton kernel (`absorbed_decode.fused_attention`): few queries on a GPU, where
   `absorbed_decode.usable` allows it (`settings.current().fused`) and the caller did not ask for
   the two-matmul form;
2. two plain matmuls over phi (phi read twice) while the score matrix stays small, its softmax
   the blocked `absorbed_decode.row_softmax` on a GPU and torch's elsewhere: sdpa has no fused
   kernel for a head width of E (1024) and its fallback is an order of magnitude slower here;
3. the caller's attention backend (`attend`, sdpa or eager) with phi as keys and values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.fastdecode import absorbed_decode, decode_ops

# Above this many (query x context) scores path 3 is taken instead of materialising the score
# matrix (a float32 matrix of this size is 256 MB).
DIRECT_MAX_SCORES = 64 * 1024 * 1024

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], torch.Tensor]


def absorbed_attention(q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, phi: torch.Tensor,
                       key_mask: torch.Tensor | None, scale: float, attend: Attend, fused: bool = True,
                       direct_max_scores: int = DIRECT_MAX_SCORES) -> torch.Tensor:
    """Cross-attention without projecting the context.

    Args:
        q: (B, H, T, d) queries (projected, not yet scaled).
        w_k, w_v: (H, d, E) the key and value projections, per head.
        phi: (B, S, E) encoder states.
        key_mask: (B, 1, 1, S) bool (True = attend; every row has one) or None.
        scale: the softmax scale (1 / sqrt(d)).
        attend: `attend(q, k, v, key_mask, scale)` non-causal attention, for path 3.
        fused: False keeps to the torch paths (the form "absorbed_matmul").
    Returns:
        (B, H, T, d).
    """
    bsz, heads, q_len, d = q.shape
    e = w_k.shape[-1]
    q_abs = decode_ops.absorbed_query(q, w_k)  # (B, H, T, E)
    q_abs = q_abs.reshape(bsz, heads * q_len, e)  # (B, H*T, E): one head over phi
    ctx_len = phi.shape[1]
    mask = key_mask[:, 0, 0] if key_mask is not None else None  # (B, S)
    if fused and absorbed_decode.usable(q_abs.device, heads * q_len, ctx_len, q_abs.requires_grad):
        ctx = absorbed_decode.absorbed_attention(q_abs, phi, mask, scale=scale)  # (B, H*T, E)
    elif heads * q_len * ctx_len <= direct_max_scores:
        if absorbed_decode.softmax_usable(q_abs):  # a GPU: the blocked softmax, scale folded in
            scores = torch.matmul(q_abs, phi.transpose(1, 2))  # (B, H*T, S)
            probs = absorbed_decode.row_softmax(scores, scale, mask)
        else:
            scores = torch.matmul(q_abs * scale, phi.transpose(1, 2))  # (B, H*T, S)
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask[:, 0], torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(phi.dtype)  # fp32 inside
        ctx = torch.matmul(probs, phi)  # (B, H*T, E)
    else:
        kv = phi[:, None]  # (B, 1, S, E): keys and values are phi itself
        ctx = attend(q_abs[:, None], kv, kv, key_mask, scale)[:, 0]  # (B, H*T, E)
    ctx = ctx.view(bsz, heads, q_len, e)  # (B, H, T, E)
    return decode_ops.absorbed_value(ctx, w_v)  # (B, H, T, d)
