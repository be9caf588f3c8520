"""Where and in what precision a stage runs: one reading of the `device` / `dtype` options.

`device: auto` is the GPU when there is one, else the CPU; `dtype: auto` is bfloat16 on a GPU and
float32 on a CPU. A named GPU without one, or an unknown dtype, is a one-line `CepeError` naming
the option.
"""

from __future__ import annotations

from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(name: str = "auto", option: str = "device") -> Any:
    """`name` ("auto", "cpu", "cuda", "cuda:N", ...) as a torch.device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        from pipeline.errors import CepeError

        raise CepeError(f"{option}: expected auto, cpu or cuda[:N], got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        from pipeline.errors import CepeError

        raise CepeError(f"{option}: {name!r} requested but no CUDA device is available")
    return device


def resolve_dtype(name: str, device: Any = "cpu", option: str = "dtype") -> Any:
    """`name` (one of DTYPES) as a torch.dtype; "auto" depends on `device` (a torch.device or str)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if getattr(device, "type", str(device)).startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        from pipeline.errors import CepeError

        raise CepeError(f"{option}: expected auto, float32, bfloat16 or float16, got {name!r}") from None
