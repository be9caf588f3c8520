"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

A checkpoint holds optimiser state and RNG states, nested Python containers of tensors, numpy
arrays, numbers, strings, tuples and None. `torch.load(weights_only=False)` would restore them
by unpickling, and unpickling runs whatever code the file names; so these files are split in
two, neither of which can run code when read:

    <stem>.safetensors   every tensor (and numpy array, as a tensor), under the key "t<N>"
    <stem>.json          the container structure, tensors replaced by {"__tensor__": "t<N>"}

JSON cannot say tuple, int dict key, numpy array or non-finite float, so those are tagged
(`{"__tuple__": [...]}`, `{"__dict__": [[key, value], ...]}`, `{"__ndarray__": key, "dtype":
...}`, `{"__float__": "nan"}`); everything round-trips to equal values of equal types.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import CepeError


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        # contiguous copies on the CPU: safetensors refuses views that share memory
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        wide = obj.astype(np.int64) if obj.dtype.kind == "u" else obj  # torch lacks most unsigned types
        tensors[key] = torch.from_numpy(np.ascontiguousarray(wide)).clone()
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, (np.integer, np.floating)):
        return _encode(obj.item(), tensors)
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"state_files: cannot store a {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_state(obj: Any, directory: Path, stem: str) -> list[str]:
    """Write `obj` as `<stem>.safetensors` + `<stem>.json` in `directory`; returns the file names."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(obj, tensors)
    save_file(tensors, str(directory / f"{stem}.safetensors"))
    (directory / f"{stem}.json").write_text(json.dumps(structure, allow_nan=False))
    return [f"{stem}.safetensors", f"{stem}.json"]


def load_state(directory: Path, stem: str) -> Any:
    """Read what `save_state` wrote.

    Raises:
        CepeError: a file is missing, truncated or not what `save_state` writes (naming it).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensor_file, json_file = directory / f"{stem}.safetensors", directory / f"{stem}.json"
    for path in (tensor_file, json_file):
        if not path.is_file():
            raise CepeError(f"{path}: missing from the checkpoint; resume from another checkpoint")
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CepeError(f"{tensor_file}: unreadable ({str(exc).splitlines()[0]}); truncated or corrupt; "
                        f"resume from another checkpoint") from None
    try:
        return _decode(json.loads(json_file.read_text()), tensors)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CepeError(f"{json_file}: not a training-state file ({exc}); truncated or corrupt; "
                        f"resume from another checkpoint") from None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A flat name -> tensor dict (the trainable weights) as one safetensors file."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read `save_tensors`' file; a truncated or corrupt one is one CepeError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CepeError(f"{path}: missing from the checkpoint; resume from another checkpoint")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CepeError(f"{path}: unreadable ({str(exc).splitlines()[0]}); truncated or corrupt; "
                        f"resume from another checkpoint") from None
