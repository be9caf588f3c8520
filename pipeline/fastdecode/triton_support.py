"""Plumbing shared by every decode kernel module: whether Triton kernels run here, launch
arithmetic (ranges per sequence, the key-mask argument), and registration as torch ops.

Kernels are registered as `torch.ops.cepe.<name>` so that torch.compile treats each as one opaque
call instead of tracing the Triton launches; `register_op` also gives each its fake (shape-only)
implementation.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

LOG2E = 1.4426950408889634  # the kernels work in log2 units: 2^(x log2 e) = e^x

_TRITON: bool | None = None


def triton_available() -> bool:
    """Whether Triton imports (probed once; a plain global, so torch.compile traces the check)."""
    global _TRITON
    if _TRITON is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON = True
        except Exception:
            _TRITON = False
    return _TRITON


def interpreted() -> bool:
    """Triton's own interpreter switch (TRITON_INTERPRET=1): the kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernels_run(device: torch.device, requires_grad: bool) -> bool:
    """Triton on a CUDA device (or its interpreter), and no gradient wanted (no backward here)."""
    if not triton_available() or (requires_grad and torch.is_grad_enabled()):
        return False
    return device.type == "cuda" or interpreted()


@functools.lru_cache(maxsize=None)
def multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(context_len: int, batch: int, query_blocks: int, device: torch.device, waves: int = 1) -> int:
    """Context ranges per sequence: `waves` programs per multiprocessor, each range >= 256 rows.

    Fewer ranges mean smaller partial sums (splits x queries x width float32 per sequence, merged
    by a combine kernel); more keep every multiprocessor busy.
    """
    sms = multiprocessors(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 8
    want = max(1, -(-waves * sms // (query_blocks * batch)))
    return max(1, min(want, -(-context_len // 256)))


def mask_argument(mask: torch.Tensor | None, placeholder: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """A (B, S) key mask as the kernels read it (uint8, its two strides); without a mask, any
    tensor and zero strides (the kernels are compiled with HAS_MASK=False and never read it)."""
    if mask is None:
        return placeholder, (0, 0)
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return mask, (mask.stride(0), mask.stride(1))


def register_op(name: str, fake: Callable[..., torch.Tensor]) -> Callable[[Callable], Callable]:
    """Decorator: register `fn` as the torch op `cepe::<name>` (pure: mutates nothing) with
    `fake` as its shape-only implementation (what torch.compile traces)."""

    def wrap(fn: Callable) -> Callable:
        op = torch.library.custom_op(f"cepe::{name}", mutates_args=())(fn)
        op.register_fake(fake)
        return op

    return wrap
