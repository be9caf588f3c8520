"""Which decode kernels may run: chosen once (at load or config time), not read at every call.

`CEPE_FUSED_DECODE` ("1": the one-pass absorbed kernel always, "0": never, otherwise "auto": from
`absorbed_decode.FUSED_MIN_CONTEXT` encoder states on) and `CEPE_DECODE_KERNELS` ("0" switches the
GEMV and split-KV kernels off) set the process's default when this module is first imported.
`configure(...)` changes that default; `using(...)` changes it inside a `with` block (tests,
benchmarks, one side of a comparison). The layers read `current()`, a plain module global, so
torch.compile guards on it instead of tracing an environment lookup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.errors import CepeError

FUSED_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class DecodeSettings:
    """fused: the absorbed cross-attention's one-pass kernel ("auto", "on", "off");
    kernels: the generic decode kernels (GEMV, split-KV attention) may run."""

    fused: str = "auto"
    kernels: bool = True

    def __post_init__(self) -> None:
        if self.fused not in FUSED_MODES:
            raise CepeError(f"fused decode: expected one of {', '.join(FUSED_MODES)}, got {self.fused!r}")


def from_environment(environ: dict[str, str] | None = None) -> DecodeSettings:
    """The settings the two environment variables ask for (unset or other values: the defaults)."""
    env = os.environ if environ is None else environ
    fused = {"1": "on", "0": "off"}.get(env.get("CEPE_FUSED_DECODE", ""), "auto")
    return DecodeSettings(fused=fused, kernels=env.get("CEPE_DECODE_KERNELS", "") != "0")


_CURRENT = from_environment()


def current() -> DecodeSettings:
    return _CURRENT


def configure(**changes: object) -> DecodeSettings:
    """Change the process's settings (`fused=`, `kernels=`); returns the new settings."""
    global _CURRENT
    _CURRENT = dataclasses.replace(_CURRENT, **changes)
    return _CURRENT


@contextlib.contextmanager
def using(**changes: object) -> Iterator[DecodeSettings]:
    """The settings changed inside the block, restored after it."""
    global _CURRENT
    before = _CURRENT
    _CURRENT = dataclasses.replace(before, **changes)
    try:
        yield _CURRENT
    finally:
        _CURRENT = before
