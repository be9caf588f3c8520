"""Params profiles as overlays: `params/base.yaml` holds every key once, `params/<name>.yaml` only
what a profile changes; `cepe use-profile NAME` writes the merged `params.yaml` that dvc reads.

- `cpu`: base itself (an empty overlay): the real SmolLM2-135M-Instruct, the embedded corpus,
  budgets for a 2-core CPU; the committed params.yaml is this profile;
- `tiny`: random tiny models, the whole pipeline in a few minutes (CI);
- `gpu`: one GPU, SmolLM2 with real budgets (the run docs/results/training.md records);
- `paper`: the paper's recipe (LLaMA-2-7B, RedPajama from the hub, 8 GPUs).

Every key of base.yaml (and of an overlay) is one line, `  key: value` inside a section or
`key: value` at the top, so the merge is done on the text: base.yaml's lines, each overridden key's
line replaced by the overlay's, under a header naming the overlay. Comments and layout survive, and
the result is checked to parse to exactly base updated by the overlay. An overlay key that base.yaml
lacks is an error naming both files: a new key goes into base.yaml first.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pipeline.config import read_params
from pipeline.errors import CepeError
from pipeline.io import atomic_write_text

BASE = "base"
TARGET = "params.yaml"
_TOP = re.compile(r"^([A-Za-z_]\w*):(.*)$")
_KEY = re.compile(r"^  ([A-Za-z_]\w*):(.*)$")


def profile_dir(root: str | Path = ".") -> Path:
    return Path(root) / "params"


def available(root: str | Path = ".") -> list[str]:
    """The profiles: every overlay under params/ (base.yaml is what they overlay, not a profile)."""
    return sorted(p.stem for p in profile_dir(root).glob("*.yaml") if p.stem != BASE)


def header(name: str) -> str:
    return (f"# params.yaml: made by `cepe use-profile {name}` from params/base.yaml + params/{name}.yaml.\n"
            f"# Edit those and run `cepe use-profile {name}` again; a hand edit here is kept until then\n"
            f"# (`cepe use-profile` refuses to overwrite it without --force).\n\n")


def _key_lines(path: Path, text: str) -> dict[tuple[str | None, str], tuple[int, str]]:
    """(section or None for a top-level key, key) -> (line index, line) for every key of a params
    file, each checked to hold its whole value on its one line."""
    data = yaml.safe_load(text) or {}
    keys: dict[tuple[str | None, str], tuple[int, str]] = {}
    section, sections = None, set()
    for i, line in enumerate(text.splitlines()):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        top, inner = _TOP.match(line), _KEY.match(line)
        if top:
            if top.group(2).split("#")[0].strip():  # `key: value` at the top level
                section = None
                keys[(None, top.group(1))] = (i, line)
            else:
                section = top.group(1)
                if section in sections:
                    raise CepeError(f"{path} line {i + 1}: section {section} appears twice")
                sections.add(section)
            continue
        if inner is None or section is None:
            raise CepeError(f"{path} line {i + 1}: expected `section:` or `  key: value` on one line, got {line.strip()!r}")
        if (section, inner.group(1)) in keys:
            raise CepeError(f"{path} line {i + 1}: {section}.{inner.group(1)} appears twice")
        keys[(section, inner.group(1))] = (i, line)
    for (section, key), (i, line) in keys.items():
        want = data[key] if section is None else (data.get(section) or {}).get(key)
        if (yaml.safe_load(line.strip()) or {}).get(key) != want:
            raise CepeError(f"{path} line {i + 1}: {key}'s value must sit on its own line (flow style: [a, b], {{k: v}})")
    return keys


def render(name: str, root: str | Path = ".") -> str:
    """The params.yaml that profile `name` makes: base.yaml with the overlay's keys replaced."""
    pdir = profile_dir(root)
    base_path, overlay_path = pdir / f"{BASE}.yaml", pdir / f"{name}.yaml"
    if name == BASE or not overlay_path.is_file():
        known = ", ".join(available(root)) or "none"
        raise CepeError(f"profile {name!r}: no {overlay_path} (known profiles: {known})")
    if not base_path.is_file():
        raise CepeError(f"{base_path}: missing; every profile overlays it")
    base_text = base_path.read_text(encoding="utf-8")
    overlay_text = overlay_path.read_text(encoding="utf-8")
    base, overlay = read_params(base_path), read_params(overlay_path)  # malformed YAML fails here
    base_keys, overlay_keys = _key_lines(base_path, base_text), _key_lines(overlay_path, overlay_text)
    lines = base_text.splitlines()
    for (section, key), (_, line) in overlay_keys.items():
        where = key if section is None else f"{section}.{key}"
        if (section, key) not in base_keys:
            raise CepeError(f"{overlay_path}: {where} is not in {base_path} (add every key to base.yaml first; "
                            f"an overlay holds only the values it changes)")
        lines[base_keys[(section, key)][0]] = line
    text = header(name) + "\n".join(lines) + "\n"
    merged = {k: (dict(v, **(overlay.get(k) or {})) if isinstance(v, dict) else overlay.get(k, v)) for k, v in base.items()}
    if yaml.safe_load(text) != merged:  # the text merge must equal the mapping merge
        raise CepeError(f"{overlay_path}: merging it into {base_path} line by line does not give base updated by it")
    return text


def generated_by(text: str, root: str | Path = ".") -> str | None:
    """The profile whose params.yaml is exactly `text`, or None (hand-edited, or from elsewhere)."""
    for name in available(root):
        try:
            if render(name, root) == text:
                return name
        except CepeError:
            continue
    return None


def use_profile(name: str, root: str | Path = ".", target: str = TARGET, force: bool = False) -> Path:
    """Write profile `name` as `params.yaml` (atomically). A params.yaml that no profile generates
    (a hand edit, `dvc exp run -S` applied to the workspace) is kept unless `force`."""
    text = render(name, root)
    dest = Path(root) / target
    if dest.is_file() and not force:
        current = dest.read_text(encoding="utf-8")
        if current != text and generated_by(current, root) is None:
            raise CepeError(f"{dest}: differs from what every profile generates (edited by hand?); "
                            f"`cepe use-profile {name} --force` overwrites it")
    atomic_write_text(dest, text)
    return dest

