"""Optional compute backends a user asks for by name, checked before any model loads.

`attn_implementation: flash_attention_2` without the flash-attn package used to end in four
tracebacks from inside `transformers` (one set per launched process); every CLI command checks its
config's `*attn_implementation` keys here first (`cepe_cli/options.py: check_backends`), so the
user gets one line naming the option and the alternatives. (Not in the config's validation: a
profile naming flash-attn must still load on a machine without it, e.g. for `dvc params diff`.)
Looking a package up (`importlib.util.find_spec`) imports nothing.
"""

from __future__ import annotations

import importlib.util

from pipeline.errors import CepeError

# The implementations that need a package of their own: name -> (import name, pip name).
NEEDS_PACKAGE = {
    "flash_attention_2": ("flash_attn", "flash-attn (pip install 'cepe[flash]', CUDA only)"),
    "flash_attention_3": ("flash_attn_interface", "flash-attn 3 (built from the flash-attention repository's hopper/ folder)"),
}
ALWAYS_AVAILABLE = ("sdpa", "eager")


def installed(module: str) -> bool:
    """True when `module` can be imported (found on the path; nothing is imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_attn_implementation(value: str, option: str = "attn_implementation") -> None:
    """Refuse an attention implementation whose package is missing, naming `option`.

    Raises:
        CepeError: e.g. "attn_implementation: flash_attention_2 needs flash-attn, which is not
            installed; use sdpa (the default) or eager".
    """
    need = NEEDS_PACKAGE.get(str(value))
    if need is None:
        return
    module, package = need
    if not installed(module):
        raise CepeError(f"{option}: {value} needs {package}, which is not installed here; "
                        f"use {' or '.join(ALWAYS_AVAILABLE)} (both built into torch)")
