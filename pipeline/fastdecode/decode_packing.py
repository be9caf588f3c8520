"""Pack a decoder's per-token weight products for decoding: q/k/v as one product, gate/up as one.

At batch 1 every weight product of a decoding step is a matrix-vector product whose time is its
bytes over the bandwidth plus a fixed cost per launch; three 4096 x 4096 products take 37 us on an
H200 where one 12288 x 4096 product takes 26 (`benchmarks/decode_ops.py`). `pack_for_decoding`
gives every self-attention one packed q/k/v weight and every MLP one packed gate/up weight
(copied once and the separate weights freed, so the model's size does not change), and routes every product of the
decoder layers through `decode_ops.linear` (the GEMV kernel for one token on a GPU, F.linear
otherwise). The layers' own forward code still runs:

- attention: the packed product is computed first and handed to the module's original forward
  in place of the hidden states; `q_proj`, `k_proj`, `v_proj` become `PackedSlice`s that return
  their columns of it. That holds for every attention whose forward applies the three
  projections to its `hidden_states` argument (Llama, Mistral, Qwen2, ...); others are left as
  they are.
- MLP: down(act(gate(x)) * up(x)) with gate and up from one product (LlamaMLP-style modules:
  `gate_proj`, `up_proj`, `down_proj`, `act_fn`).

The results are the same products, so logits match the unpacked model up to summation order.
While packed, the state dict names `qkv_proj` and `gate_up_proj` instead of the separate
weights; `unpack_for_decoding` restores them exactly.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from pipeline.decoders import decoder_layers
from pipeline.fastdecode import decode_ops

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


class DecodeLinear(nn.Linear):
    """nn.Linear whose one-token products run the GEMV kernel (same weights, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_ops.linear(x, self.weight, self.bias)


class PackedSlice(nn.Module):
    """Stands in for one of q/k/v_proj of a packed attention: its input is already the packed
    product (..., sum of widths); it returns its own columns [start, stop)."""

    def __init__(self, start: int, stop: int, in_features: int):
        super().__init__()
        self.start, self.stop, self.in_features = start, stop, in_features
        self.out_features = stop - start

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return packed[..., self.start : self.stop]


class PackedAttentionMixin:
    """Runs the packed q/k/v product, then the attention's own forward on it."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return super().forward(self.qkv_proj(hidden_states), *args, **kwargs)


class PackedMLPMixin:
    """down(act(gate) * up) from one gate/up product; with SiLU and one token on a GPU the
    elementwise product is computed inside the down projection's kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (..., 2 x intermediate): gate, then up
        down = self.down_proj
        if type(down) is DecodeLinear and down.bias is None:
            return decode_ops.gated_linear(gate_up, down.weight, self.act_fn)
        gate, up = gate_up.chunk(2, dim=-1)
        return down(self.act_fn(gate) * up)


_CLASSES: dict[tuple[type, type], type] = {}


def _packed_class(mixin: type, base: type) -> type:
    key = (mixin, base)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"Packed{base.__name__}", (mixin, base), {"_unpacked_class": base})
    return _CLASSES[key]


def _linears(module: nn.Module, names: tuple[str, ...]) -> list[nn.Linear] | None:
    found = [getattr(module, name, None) for name in names]
    if not all(isinstance(m, nn.Linear) for m in found):
        return None
    if len({m.in_features for m in found}) != 1 or len({m.bias is None for m in found}) != 1:
        return None
    return found


def _packed_linear(parts: list[nn.Linear]) -> DecodeLinear:
    """One DecodeLinear holding the parts' weights (and biases) stacked by rows; each part's own
    storage is released once copied, so only the parts being packed are ever held twice."""
    first = parts[0]
    grads = first.weight.requires_grad, first.bias is not None and first.bias.requires_grad
    rows = sum(p.out_features for p in parts)
    weight = torch.empty(rows, first.in_features, device=first.weight.device, dtype=first.weight.dtype)
    bias = None if first.bias is None else torch.empty(rows, device=first.bias.device, dtype=first.bias.dtype)
    start = 0
    for part in parts:  # (the callers run without autograd)
        stop = start + part.out_features
        weight[start:stop].copy_(part.weight)
        if bias is not None:
            bias[start:stop].copy_(part.bias)
        part.weight = None  # free it now
        part.bias = None
        start = stop
    packed = DecodeLinear(first.in_features, rows, bias=bias is not None, device="meta")
    packed.weight = nn.Parameter(weight, requires_grad=grads[0])
    packed.bias = None if bias is None else nn.Parameter(bias, requires_grad=grads[1])
    return packed


def _takes_hidden_states(module: nn.Module) -> bool:
    params = list(inspect.signature(type(module).forward).parameters)
    return len(params) > 1 and params[1] == "hidden_states"


def pack_attention(attn: nn.Module) -> bool:
    """Pack one self-attention's q/k/v in place; False (untouched) where the layout is not known."""
    if isinstance(attn, PackedAttentionMixin) or not _takes_hidden_states(attn):
        return False
    parts = _linears(attn, QKV)
    if parts is None:
        return False
    widths = [p.out_features for p in parts]
    in_features = parts[0].in_features
    attn.qkv_proj = _packed_linear(parts)
    start = 0
    for name, width in zip(QKV, widths):
        setattr(attn, name, PackedSlice(start, start + width, in_features))
        start += width
    attn.__class__ = _packed_class(PackedAttentionMixin, type(attn))
    return True


def pack_mlp(mlp: nn.Module) -> bool:
    """Pack one MLP's gate/up (equal widths) in place; False (untouched) where the layout is not known."""
    if isinstance(mlp, PackedMLPMixin) or not hasattr(mlp, "act_fn") or not isinstance(getattr(mlp, "down_proj", None), nn.Linear):
        return False
    parts = _linears(mlp, GATE_UP)
    if parts is None or parts[0].out_features != parts[1].out_features:
        return False
    mlp.gate_up_proj = _packed_linear(parts)
    del mlp.gate_proj, mlp.up_proj
    mlp.__class__ = _packed_class(PackedMLPMixin, type(mlp))
    return True


def _to_decode_linear(module: nn.Module) -> None:
    for child in module.modules():
        if type(child) is nn.Linear:
            child.__class__ = DecodeLinear


@torch.no_grad()
def pack_for_decoding(model: nn.Module) -> dict[str, int]:
    """Pack every decoder layer's q/k/v and gate/up, and route all their remaining products (o,
    down, a CEPE layer's cross-attention q and o) through `DecodeLinear`. Idempotent; returns
    how many attentions and MLPs were packed."""
    counts = {"attention": 0, "mlp": 0}
    for layer in decoder_layers(model):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        counts["attention"] += attn is not None and pack_attention(attn)
        counts["mlp"] += mlp is not None and pack_mlp(mlp)
        _to_decode_linear(layer)
    return counts


@torch.no_grad()
def unpack_for_decoding(model: nn.Module) -> None:
    """Undo `pack_for_decoding`: the separate nn.Linear modules and state-dict keys return, with
    the same values."""
    for layer in decoder_layers(model):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if isinstance(attn, PackedAttentionMixin):
            slices = [getattr(attn, name) for name in QKV]
            _unpack(attn, "qkv_proj", QKV, [s.out_features for s in slices])
            attn.__class__ = attn._unpacked_class
        if isinstance(mlp, PackedMLPMixin):
            _unpack(mlp, "gate_up_proj", GATE_UP, [mlp.gate_up_proj.out_features // 2] * 2)
            mlp.__class__ = mlp._unpacked_class
        for child in layer.modules():
            if type(child) is DecodeLinear:
                child.__class__ = nn.Linear


def _unpack(module: nn.Module, packed_name: str, names: tuple[str, ...], widths: list[int]) -> None:
    packed = getattr(module, packed_name)
    weight, bias = packed.weight, packed.bias
    start = 0
    for name, width in zip(names, widths):
        linear = nn.Linear(packed.in_features, width, bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight[start : start + width].clone(), requires_grad=weight.requires_grad)
        if bias is not None:
            linear.bias = nn.Parameter(bias[start : start + width].clone(), requires_grad=bias.requires_grad)
        setattr(module, name, linear)
        start += width
    delattr(module, packed_name)
