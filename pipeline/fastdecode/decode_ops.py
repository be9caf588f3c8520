"""A decoding step's memory-bound products on a GPU: one token's weight products, and one query
per head over the KV cache.

At batch 1 a decoding step reads every weight once and the whole KV cache once; each byte feeds
one multiply-add, so a kernel's worth is the bandwidth it reaches. On an H200 with LLaMA-2-7B
shapes (docs/results/bench_diagnostics.md, `benchmarks/decode_ops.py`):

- `linear` (the `gemv` kernel): cuBLAS runs a 1 x 4096 by 4096 x 4096 product as a split-K
  matmul plus a reduction kernel, 12.4 us for 32 MB (2.7 TB/s). One program per BLOCK_N rows of
  the weight, products summed per element and reduced once at the end, reads it at about
  3.1 TB/s, and the wider matrices of the packed projections (`decode_packing`) at 3.8-4.0.
  `gated_linear` computes SiLU(gate) x up as the down projection reads it (27 vs 31 us with the
  separate elementwise kernel); `absorbed_query` / `absorbed_value` are the absorbed
  cross-attention's 32 per-head products (4.4 and 4.1 us against cuBLAS's batched 4.8 and 5.1).
- `kv_attention` (flash-decoding: `kv_partial`, `kv_combine`): with the static cache's mask,
  sdpa runs cuDNN, which reads a 128K cache at 4.3 TB/s but a 4K one (the CEPE decoder's window)
  at 2.3 TB/s. Here each head's cached positions are split into ranges so that every
  multiprocessor has several programs, and a second kernel merges the ranges exactly: 26 against
  30 us at 4K (at 128K cuDNN stays faster, 491 against 518 us). Registered with `transformers` as the attention implementation "cepe_decode":
  one-token steps with a boolean (or no) mask take the kernel, everything else is sdpa's.

Both are torch ops (`torch.ops.cepe.*`), opaque to torch.compile. Nothing here runs without a
GPU (or Triton's interpreter), with autograd recording, or when `settings.current().kernels` is
off (`CEPE_DECODE_KERNELS=0` sets that default): those cases take F.linear and sdpa, which compute
the same thing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pipeline.fastdecode import settings
from pipeline.fastdecode.triton_support import (
    LOG2E, interpreted, kernels_run, mask_argument, num_splits, register_op,
)

ATTENTION_NAME = "cepe_decode"  # the transformers attention implementation registered here


def enabled() -> bool:
    """Whether `settings.current()` lets these kernels run (`CEPE_DECODE_KERNELS=0`: off)."""
    return settings.current().kernels


def _kernels():
    from pipeline.fastdecode import decode_kernels as k

    return k


def _runs_here(*tensors: torch.Tensor) -> bool:
    """The kernels are on and run on these tensors' device with no gradient wanted."""
    return enabled() and kernels_run(tensors[0].device, any(t.requires_grad for t in tensors))


# ---------------------------------------------------------------------------------------------
# One token's weight product
# ---------------------------------------------------------------------------------------------
def gemv_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One row times a 2-D weight on a device where the kernel runs (no gradient wanted)."""
    return x.numel() == x.shape[-1] and weight.dim() == 2 and weight.stride(-1) == 1 and _runs_here(x, weight)


def gemv_config(n: int, k: int) -> dict:
    """Rows per program, columns per step, warps and stages: the fastest measured on an H200 for
    the LLaMA-2-7B shapes (benchmarks/decode_ops.py)."""
    if interpreted():
        return dict(BLOCK_N=4, BLOCK_K=64, num_warps=1, num_stages=1)
    if k > 4096:
        return dict(BLOCK_N=8, BLOCK_K=512, num_warps=8, num_stages=3)
    if 8192 <= n < 16384:
        return dict(BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=3)
    return dict(BLOCK_N=2, BLOCK_K=1024, num_warps=4, num_stages=3)


def _gemv(weight: torch.Tensor, x: torch.Tensor, config: dict | None = None, gated: bool = False) -> torch.Tensor:
    """y (B, N) = weight (B, N, K) x (B, K) per b, float32 sums; a 2-D weight is shared by all b.
    gated: x is (B, 2K), gate then up, and the vector is silu(gate) * up."""
    import triton

    shared = weight.dim() == 2
    n, k = weight.shape[-2:]
    bsz = x.shape[0]
    x = x.contiguous()
    y = torch.empty(bsz, n, device=x.device, dtype=x.dtype)
    cfg = dict(config or gemv_config(n, k))
    block_n = cfg.pop("BLOCK_N")
    _kernels().gemv[(triton.cdiv(n, block_n), bsz)](
        weight, x, y, n, k, 0 if shared else weight.stride(0), weight.stride(-2), x.stride(0), y.stride(0),
        BLOCK_N=block_n, GATED=gated, **cfg)
    return y


def gemv(x: torch.Tensor, weight: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """x (1, K) @ weight (N, K)^T -> (1, N) in x's dtype, float32 sums (the `gemv` kernel)."""
    return _gemv(weight, x.reshape(1, -1), config)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with one-token products on a GPU through the `gemv` kernel."""
    if gemv_usable(x, weight):
        y = torch.ops.cepe.gemv(x.reshape(1, -1), weight, False).view(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def is_silu(act: torch.nn.Module) -> bool:
    return type(act).__name__ in ("SiLU", "SiLUActivation")


def gated_linear(gate_up: torch.Tensor, weight: torch.Tensor, act: torch.nn.Module) -> torch.Tensor:
    """F.linear(act(gate) * up, weight) with gate_up = (gate, up) on the last axis: a SwiGLU
    MLP's down projection. One token with SiLU on a GPU: one kernel (the gate computed as it is
    read); otherwise the elementwise product, then `linear`."""
    width = gate_up.shape[-1] // 2
    if is_silu(act) and gemv_usable(gate_up[..., :width], weight):
        y = torch.ops.cepe.gemv(gate_up.reshape(1, -1), weight, True)
        return y.view(*gate_up.shape[:-1], weight.shape[0])
    gate, up = gate_up.split(width, dim=-1)
    return linear(act(gate) * up, weight)


def _gemv_fake(x: torch.Tensor, weight: torch.Tensor, gated: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[-2])


@register_op("gemv", _gemv_fake)
def _gemv_op(x: torch.Tensor, weight: torch.Tensor, gated: bool) -> torch.Tensor:
    return _gemv(weight, x, gated=gated)


# ---------------------------------------------------------------------------------------------
# The absorbed cross-attention's per-head products (one token)
# ---------------------------------------------------------------------------------------------
def heads_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """x (B, H, T, ·) with B x T = 1 on a device where the kernels run."""
    return x.shape[0] * x.shape[2] == 1 and weight.is_contiguous() and _runs_here(x, weight)


def absorbed_query(q: torch.Tensor, w_k: torch.Tensor) -> torch.Tensor:
    """einsum("bhtd,hde->bhte", q, w_k): every head's query times its W_k block (one kernel for
    one token on a GPU: 32 x (128 x 1024) here, which cuBLAS runs as a batched product)."""
    if heads_usable(q, w_k):
        heads, d, e = w_k.shape
        return torch.ops.cepe.head_gemv_t(q.reshape(heads, d), w_k).view(1, heads, 1, e)
    return torch.einsum("bhtd,hde->bhte", q, w_k)


def absorbed_value(ctx: torch.Tensor, w_v: torch.Tensor) -> torch.Tensor:
    """einsum("bhte,hde->bhtd", ctx, w_v): every head's context row times its W_v block."""
    if heads_usable(ctx, w_v):
        heads, d, e = w_v.shape
        return torch.ops.cepe.head_gemv(ctx.reshape(heads, e), w_v).view(1, heads, 1, d)
    return torch.einsum("bhte,hde->bhtd", ctx, w_v)


def _head_config() -> dict:
    if interpreted():
        return dict(BLOCK_N=4, BLOCK_K=32, num_warps=1, num_stages=1)
    return dict(BLOCK_N=2, BLOCK_K=512, num_warps=2, num_stages=1)


def _head_gemv_fake(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[1])


@register_op("head_gemv", _head_gemv_fake)
def _head_gemv_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _gemv(weight, x, _head_config())


def _head_gemv_t_fake(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(weight.shape[0], weight.shape[2])


@register_op("head_gemv_t", _head_gemv_t_fake)
def _head_gemv_t_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y (H, N) = x (H, D) per head times weight (H, D, N)."""
    import triton

    heads, d, n = weight.shape
    x = x.contiguous()
    y = torch.empty(heads, n, device=x.device, dtype=x.dtype)
    cfg = dict(BLOCK_D=16, BLOCK_N=32, num_warps=1) if interpreted() else dict(BLOCK_D=128, BLOCK_N=64, num_warps=2)
    block_n = cfg.pop("BLOCK_N")
    _kernels().gemv_t[(triton.cdiv(n, block_n), heads)](
        weight, x, y, d, n, weight.stride(0), weight.stride(1), x.stride(0), y.stride(0), BLOCK_N=block_n, **cfg)
    return y


# ---------------------------------------------------------------------------------------------
# One query per head over the KV cache
# ---------------------------------------------------------------------------------------------
def kv_config() -> dict:
    """Positions per tile, warps, pipeline stages, and programs per multiprocessor."""
    if interpreted():
        return dict(BLOCK_S=16, num_warps=1, num_stages=1, waves=1)
    return dict(BLOCK_S=32, num_warps=4, num_stages=3, waves=4)


def kv_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                 scale: float, splits: int | None = None, config: dict | None = None) -> torch.Tensor:
    """softmax(scale q k^T) v for one query per head.

    query (B, H, 1, D); key, value (B, H_kv, L, D), H a multiple of H_kv; mask (B, L) bool
    (True = attend; every row needs one) or None. Returns (B, 1, H, D) in query's dtype, the
    layout transformers' attention functions return.
    """
    import triton

    bsz, heads, _, d = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    cfg = dict(config or kv_config())
    waves = cfg.pop("waves")
    if splits is None:
        splits = num_splits(length, bsz * kv_heads, 1, query.device, waves)  # ranges of >= 256 positions
    split_len = -(-length // splits)
    q, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query[:, :, 0], key, value))  # q (B, H, D)
    acc = torch.empty(bsz, heads, splits, d, device=query.device, dtype=torch.float32)
    stat_max = torch.empty(bsz, heads, splits, device=query.device, dtype=torch.float32)
    stat_sum = torch.empty_like(stat_max)
    mask_u8, mask_strides = mask_argument(mask, key)
    k = _kernels()
    k.kv_partial[(splits, kv_heads, bsz)](
        q, key, value, mask_u8, acc, stat_max, stat_sum,
        length, split_len, heads // kv_heads, scale * LOG2E,
        q.stride(0), q.stride(1),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        *mask_strides,
        acc.stride(0), acc.stride(1), acc.stride(2),
        stat_max.stride(0), stat_max.stride(1),
        D=d, BLOCK_G=max(16, triton.next_power_of_2(heads // kv_heads)), HAS_MASK=mask is not None, **cfg,
    )
    out = torch.empty(bsz, 1, heads, d, device=query.device, dtype=query.dtype)
    k.kv_combine[(heads, bsz)](
        acc, stat_max, stat_sum, out, splits,
        acc.stride(0), acc.stride(1), acc.stride(2),
        stat_max.stride(0), stat_max.stride(1),
        out.stride(0), out.stride(2),
        D=d, SPLITS_PAD=triton.next_power_of_2(splits), num_warps=1 if interpreted() else 4,
    )
    return out


def _kv_attention_fake(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
    bsz, heads, _, d = query.shape
    return query.new_empty(bsz, 1, heads, d)


@register_op("kv_attention", _kv_attention_fake)
def _kv_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    return kv_attention(query, key, value, mask, scale)


def kv_usable(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """One query per head, a power-of-two head width, a boolean (B, 1, 1, L) mask or none, and a
    device where the kernels run."""
    if query.shape[2] != 1 or key.shape[-1] & (key.shape[-1] - 1):
        return False
    if attention_mask is not None and (attention_mask.dtype != torch.bool or attention_mask.dim() != 4
                                       or attention_mask.shape[1] != 1 or attention_mask.shape[2] != 1):
        return False
    return _runs_here(query, key)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The "cepe_decode" attention implementation: `kv_attention` for one-token steps of plain
    softmax attention, sdpa's function for everything else (logit soft-capping, attention sinks,
    dropout, several queries; same arguments and result layout, (B, T, H, D))."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = all(kwargs.get(name) is None for name in ("softcap", "s_aux", "sinks"))  # options the kernel lacks
    if dropout == 0.0 and plain and kv_usable(query, key, attention_mask):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        mask = attention_mask[:, 0, 0, : key.shape[2]] if attention_mask is not None else None  # (B, L)
        return torch.ops.cepe.kv_attention(query, key, value, mask, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register_attention() -> str:
    """Register "cepe_decode" with transformers (attention function and sdpa's mask builder);
    idempotent. Returns the name to pass as `attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
