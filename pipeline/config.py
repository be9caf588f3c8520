"""Typed stage configs: one dataclass per stage, filled from a `params.yaml` section and overrides.

Every stage of the pipeline reads its settings from one flat dataclass. The same dataclass is
filled from three places, later ones winning:

1. the field defaults in the code,
2. the stage's section of a params file (`params.yaml` by default; `params/<profile>.yaml`),
3. command-line overrides: generated `--field-name VALUE` options and `-S key=value` pairs
   (the same `key=value` syntax `dvc exp run -S train.lr=1e-4` uses).

Why flat: a params key `train.lr` then means exactly one field, so `dvc exp run -S train.lr=...`,
`cepe train --lr ...` and `cepe train -S lr=...` all reach the same place, and DVC can track
each key a stage uses. Unknown keys and values of the wrong type are rejected with a
`ConfigError` that names the key, before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from pipeline.errors import CepeError

C = TypeVar("C")


class ConfigError(CepeError, ValueError):
    """A user mistake in a config: the message names the key and what was expected."""


def field(default: Any = dataclasses.MISSING, *, help: str = "", default_factory: Any = dataclasses.MISSING):
    """A dataclass field with a help text (shown by `--help` and in the resolved config)."""
    kwargs: dict[str, Any] = {"metadata": {"help": help}}
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    else:
        kwargs["default"] = default
    return dataclasses.field(**kwargs)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` (from YAML or a CLI string) to `tp`, or raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~") and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(f"{key}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (Any,)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError as exc:
                    raise ConfigError(f"{key}: expected a list, got {value!r}") from exc
            else:
                value = [v.strip() for v in text.split(",") if v.strip()] if text else []
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{key}: expected a mapping, got {value!r}") from exc
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[C], values: dict[str, Any], prefix: str = "") -> C:
    """Build `cls` from a mapping, rejecting unknown keys and mistyped values.

    Raises:
        ConfigError: naming `prefix + key` for an unknown key, a wrong type, or a failed
            `__post_init__` check.
    """
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (known keys: {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if prefix and not str(exc).startswith(prefix):
            raise ConfigError(prefix + str(exc)) from None
        raise
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {exc}") from None


def parse_overrides(pairs: list[str] | tuple[str, ...], section: str | None = None) -> dict[str, str]:
    """Turn `["lr=1e-4", "train.steps=10"]` into `{"lr": "1e-4", "steps": "10"}`.

    A `section.` prefix is accepted and stripped when it matches this stage's section, so the
    keys of `dvc exp run -S train.lr=...` work unchanged.
    """
    out: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        key = key.strip()
        if section and key.startswith(section + "."):
            key = key[len(section) + 1 :]
        if "." in key:
            raise ConfigError(f"override {pair!r}: key {key!r} does not belong to section {section!r}")
        out[key] = value
    return out


def read_params(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a params YAML file into a mapping; a missing or malformed file is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: params file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    return data


def load_config(
    cls: type[C],
    section: str,
    params_file: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> C:
    """Defaults <- `params_file[section]` <- `overrides`; validated, with keys named in errors."""
    values: dict[str, Any] = {}
    if params_file is not None:
        params = read_params(params_file)
        sec = params.get(section) or {}
        if not isinstance(sec, dict):
            raise ConfigError(f"{params_file}: section {section!r} must be a mapping")
        values.update(sec)
    values.update(overrides or {})
    return from_dict(cls, values, prefix=f"{section}.")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_resolved(config: Any, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML next to a stage's outputs (atomically)."""
    from pipeline.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def config_hash(config: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(to_dict(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def field_help(cls: type) -> dict[str, tuple[Any, str]]:
    """`{name: (type, help)}` for every field: what the CLI turns into options."""
    hints = _hints(cls)
    return {f.name: (hints[f.name], f.metadata.get("help", "")) for f in dataclasses.fields(cls)}
