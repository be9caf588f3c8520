"""Greedy decode loops, used identically for CEPE and full attention.

Two loops, so that neither side is measured launch-bound:
- `plain`: the usual `transformers` loop: one eager forward per token with a `DynamicCache`
  (which grows by concatenation). At batch 1 a 7B model spends most of each step launching
  kernels (~100 ms/token whatever the length, docs/performance.md).
- `static`: a preallocated `StaticCache`, a fixed-shape 4-D attention mask and on-device
  position counters, so one step has the same shapes and addresses every time; on CUDA that
  step is captured once as a CUDA graph and replayed (`static+graph`), which removes the launch
  overhead and leaves the bytes each step must read.

The step is the same model call on both sides; CEPE passes its encoder states as an extra
keyword (`step_kwargs`), full attention none. Greedy argmax stays on the device, so no step
waits for the host.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.bench.device import Clock, median


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name the model's forward gives its cache: `past_key_values` (transformers 5.17) or
    `cache` (5.2x, where `past_key_values` is a deprecated alias)."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(output: Any) -> Any:
    for name in ("cache", "past_key_values"):  # 5.2x names it `cache`, 5.17 `past_key_values`
        value = getattr(output, name, None) if not isinstance(output, dict) else output.get(name)
        if value is not None:
            return value
    raise ValueError("the model returned no cache (use_cache=True was passed)")


def attention_implementation(model: torch.nn.Module) -> str:
    """The decoder self-attention backend (a CEPE model's is its wrapped decoder's)."""
    decoder = getattr(model, "decoder", model)
    return getattr(decoder.config, "_attn_implementation", None) or "sdpa"


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) -> (B, 1): the argmax of the last position, on the device."""
    return logits[:, -1].argmax(dim=-1, keepdim=True)


@dataclass
class DecodeResult:
    loop: str
    batch: int
    steps: int
    ms_per_token: float  # median over steps of one step's time (all B sequences advance one token)
    ms_mean: float
    tokens: torch.Tensor | None = field(default=None, repr=False)  # (B, warmup + steps), greedy ids
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out = {
            "loop": self.loop,
            "batch": self.batch,
            "steps": self.steps,
            "ms_per_token": float(f"{self.ms_per_token:.5g}"),
            "ms_mean": float(f"{self.ms_mean:.5g}"),
            "tokens_per_s": float(f"{self.batch * 1000.0 / self.ms_per_token:.5g}") if self.ms_per_token > 0 else None,
        }
        out.update(self.extra)
        return out


# ---------------------------------------------------------------------------------------------
# Plain loop
# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def plain_decode(
    model: torch.nn.Module,
    cache: Any,
    first: torch.Tensor,
    steps: int,
    clock: Clock,
    step_kwargs: dict[str, Any] | None = None,
) -> DecodeResult:
    """`steps` greedy tokens after `first` (B, 1), with the model's usual dynamic cache."""
    kwargs = dict(step_kwargs or {})
    kwargs[cache_kwarg(model)] = cache
    token = first
    marks: list[tuple[Any, Any]] = []
    tokens = []
    for _ in range(steps):
        start = clock.mark()
        out = model(input_ids=token, use_cache=True, logits_to_keep=1, **kwargs)
        token = greedy(out.logits)
        marks.append((start, clock.mark()))
        tokens.append(token)
        del out
    clock.sync()
    times = [clock.seconds(a, b) * 1000.0 for a, b in marks]
    return DecodeResult("plain", first.shape[0], steps, median(times), sum(times) / len(times), torch.cat(tokens, dim=1))


# ---------------------------------------------------------------------------------------------
# Static cache (+ CUDA graph)
# ---------------------------------------------------------------------------------------------
def static_cache(config: Any, max_len: int) -> Any:
    from transformers import StaticCache

    return StaticCache(config=config, max_cache_len=max_len)


@torch.inference_mode()
def to_static(dynamic: Any, config: Any, max_len: int) -> Any:
    """Move a filled `DynamicCache` into a `StaticCache` of `max_len` positions, layer by layer,
    freeing each dynamic layer as it goes (peak: the cache plus one layer, not two caches)."""
    cache = static_cache(config, max_len)
    for layer, source in zip(cache.layers, dynamic.layers):
        layer.update(source.keys, source.values)  # allocates max_len, writes 0..n-1, advances to n
        source.keys = source.values = None
    return cache


@torch.inference_mode()
def synthetic_static(config: Any, batch: int, filled: int, max_len: int, device: torch.device, dtype: torch.dtype) -> Any:
    """A `StaticCache` of `batch` sequences whose first `filled` positions count as written (zeros).

    For decode timing the values do not matter, only the shapes: the largest-batch measurement
    uses this instead of prefilling every sequence."""
    from pipeline.bench.costs import Shape

    shape = Shape.of(config)
    cache = static_cache(config, max_len)
    template = torch.empty(batch, shape.kv_heads, 0, shape.head_dim, device=device, dtype=dtype)
    for layer in cache.layers:
        layer.lazy_initialization(template, template)
        layer.cumulative_length.fill_(filled)
    return cache


@torch.inference_mode()
def synthetic_dynamic(config: Any, batch: int, filled: int, device: torch.device, dtype: torch.dtype) -> Any:
    """A `DynamicCache` holding `filled` positions (zeros) for `batch` sequences."""
    from transformers import DynamicCache

    from pipeline.bench.costs import Shape

    shape = Shape.of(config)
    cache = DynamicCache(config=config)
    for idx in range(shape.layers):
        keys = torch.zeros(batch, shape.kv_heads, filled, shape.head_dim, device=device, dtype=dtype)
        cache.update(keys, torch.zeros_like(keys), idx)
        del keys
    return cache


class StaticStep:
    """One greedy decode step with fixed shapes: everything it reads or writes is a buffer.

    State: `token` (B, 1) the last token; `position` (1,) the position it is written at;
    `mask` (B, 1, 1, max_len): for sdpa and cepe_decode bool, True where a key may be attended; for eager
    attention additive (0 or the dtype's minimum). The model receives the 4-D mask as it is
    (transformers passes prepared 4-D masks through), so no mask is built from data inside the
    step and nothing in it synchronises with the host.
    """

    def __init__(self, model: torch.nn.Module, cache: Any, first: torch.Tensor, start: int, step_kwargs: dict[str, Any],
                 dtype: torch.dtype = torch.bfloat16, forward: Any = None):
        self.model = model
        self.forward = model if forward is None else forward  # the model itself, or its torch.compile'd wrapper
        self.kwargs = dict(step_kwargs)
        self.kwargs[cache_kwarg(model)] = cache
        max_len = cache.layers[0].max_cache_len
        batch = first.shape[0]
        self.token = first.clone()
        self.position = torch.full((1,), start, dtype=torch.long, device=first.device)
        impl = attention_implementation(model)
        if impl in ("sdpa", "cepe_decode"):
            self.mask = torch.zeros(batch, 1, 1, max_len, dtype=torch.bool, device=first.device)
            self.allowed: bool | float = True
        elif impl == "eager":
            self.mask = torch.full((batch, 1, 1, max_len), torch.finfo(dtype).min, dtype=dtype, device=first.device)
            self.allowed = 0.0
        else:
            raise ValueError(f"the static-cache loop takes sdpa, cepe_decode or eager attention, not {impl!r}")
        self.mask[..., :start] = self.allowed
        self.batch = batch

    def __call__(self) -> None:
        self.mask.index_fill_(3, self.position, self.allowed)
        out = self.forward(
            input_ids=self.token,
            position_ids=self.position.view(1, 1).expand(self.batch, 1),
            attention_mask=self.mask,
            use_cache=True,
            logits_to_keep=1,
            **self.kwargs,
        )
        self.token.copy_(greedy(out.logits))
        self.position.add_(1)


@torch.inference_mode()
def static_decode(
    model: torch.nn.Module,
    cache: Any,
    first: torch.Tensor,
    start: int,
    steps: int,
    clock: Clock,
    step_kwargs: dict[str, Any] | None = None,
    graph: bool = True,
    warmup: int = 2,
    compile_step: bool = False,
) -> DecodeResult:
    """Greedy tokens with a static cache already holding `start` positions.

    With `graph` (CUDA only) the step is captured after `warmup` eager steps on a side stream and
    replayed `steps` times; otherwise `steps` eager steps run. The cache must have room for
    `start + warmup + steps` positions. Tokens of the warm-up steps are part of the result.

    With `compile_step` the model's forward is `torch.compile`d (inductor, static shapes, no
    CUDA graphs of its own): norms, rotary embeddings, residual adds and activations fuse into
    a few kernels per layer instead of dozens. The warm-up steps compile it (the first is slow);
    the graph then captures the compiled kernels.
    """
    dtype = next(model.parameters()).dtype
    forward = torch.compile(model, dynamic=False) if compile_step else None
    step = StaticStep(model, cache, first, start, step_kwargs or {}, dtype, forward)
    use_graph = graph and first.is_cuda
    generated: list[torch.Tensor] = []
    graph_obj = None
    if use_graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                step()
                generated.append(step.token.clone())
        torch.cuda.current_stream().wait_stream(stream)
        graph_obj = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph_obj):
            step()
        run = graph_obj.replay
    else:
        run = step
    marks: list[tuple[Any, Any]] = []
    for _ in range(steps):
        start_mark = clock.mark()
        run()
        marks.append((start_mark, clock.mark()))
        generated.append(step.token.clone())
    clock.sync()
    times = [clock.seconds(a, b) * 1000.0 for a, b in marks]
    loop = ("static+graph" if use_graph else "static") + ("+compile" if compile_step else "")
    result = DecodeResult(loop, first.shape[0], steps, median(times), sum(times) / len(times), torch.cat(generated, dim=1))
    del graph_obj, step
    return result
