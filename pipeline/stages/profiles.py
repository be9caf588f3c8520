"""Params profiles: complete `params.yaml` alternatives kept in `params/<name>.yaml`.

- `cpu`: the default (the same as the committed params.yaml): the real SmolLM2-135M-Instruct,
  the embedded corpus, budgets for a 2-core CPU;
- `tiny`: random tiny models, the whole pipeline in a few minutes (CI);
- `gpu`: one GPU, SmolLM2 with real budgets (the run docs/results/training.md records);
- `paper`: the paper's recipe (LLaMA-2-7B, RedPajama from the hub, 8 GPUs).

`cepe use-profile NAME` copies one over params.yaml, so `dvc repro` (and `dvc params diff`) see it.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import read_params
from pipeline.errors import CepeError
from pipeline.io import atomic_write_text


def profile_dir(root: str | Path = ".") -> Path:
    return Path(root) / "params"


def available(root: str | Path = ".") -> list[str]:
    return sorted(p.stem for p in profile_dir(root).glob("*.yaml"))


def use_profile(name: str, root: str | Path = ".", target: str = "params.yaml") -> Path:
    """Copy `params/<name>.yaml` over `params.yaml` (atomically) after checking it parses."""
    source = profile_dir(root) / f"{name}.yaml"
    if not source.is_file():
        known = ", ".join(available(root)) or "none"
        raise CepeError(f"profile {name!r}: no {source} (known profiles: {known})")
    read_params(source)  # a malformed profile fails here, before params.yaml is touched
    dest = Path(root) / target
    atomic_write_text(dest, source.read_text(encoding="utf-8"))
    return dest
