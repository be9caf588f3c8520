"""Click options generated from a stage's config dataclass.

`config_options(ConfigCls, section)` adds to a command:
- `--params FILE`: the params file whose `section` fills the config (default `params.yaml` when
  it exists in the working directory);
- `--section NAME`: read another section than the stage's own (one stage, several configs);
- `-S/--set key=value` (repeatable): overrides with the `dvc exp run -S` syntax;
- one `--field-name VALUE` option per dataclass field, defaulting to "unset" so that only what the
  user typed overrides the params file.

The decorated function receives a single `config` argument: the resolved, validated dataclass
(its attention backends checked as installed, `check_backends`).
"""

from __future__ import annotations

import functools
import typing
from pathlib import Path
from typing import Any, Callable, Literal, get_args, get_origin

import click

from pipeline.config import field_help, load_config, parse_overrides


def _click_type(tp: Any) -> tuple[Any, bool]:
    """(click type, multiple) for a field type; lists become repeatable options."""
    origin = get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _click_type(args[0])
        return str, False
    if origin is Literal:
        return click.Choice([str(a) for a in get_args(tp)]), False
    if origin in (list, tuple):
        return str, True
    return str, False


def check_backends(config: Any) -> None:
    """Every `*attn_implementation` key of a stage names a backend installed here, checked when the
    command runs (before any work, and before `--num-processes` launches N processes that would
    each fail), not when a profile loads: a profile naming flash-attn loads on any machine."""
    from pipeline.backends import check_attn_implementation

    for name, value in vars(config).items():
        if name.endswith("attn_implementation") and isinstance(value, str):
            check_attn_implementation(value, name)


def config_options(config_cls: type, section: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    fields = field_help(config_cls)

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(params: str | None, section_name: str | None, set_pairs: tuple[str, ...], **kwargs: Any) -> Any:
            sec = section_name or section
            overrides: dict[str, Any] = {}
            for name in fields:
                value = kwargs.pop(name, None)
                if value is None or value == ():
                    continue
                overrides[name] = list(value) if isinstance(value, tuple) else value
            overrides.update(parse_overrides(set_pairs, sec))
            params_file = params
            if params_file is None and Path("params.yaml").is_file():
                params_file = "params.yaml"
            config = load_config(config_cls, sec, params_file, overrides)
            check_backends(config)
            return fn(config=config, **kwargs)

        for name, (tp, help_text) in reversed(list(fields.items())):
            ctype, multiple = _click_type(tp)
            flag = "--" + name.replace("_", "-")
            wrapper = click.option(
                flag,
                name,
                type=ctype,
                multiple=multiple,
                default=None,
                help=(help_text or name) + (" (repeatable)" if multiple else ""),
            )(wrapper)
        wrapper = click.option(
            "-S",
            "--set",
            "set_pairs",
            multiple=True,
            metavar="KEY=VALUE",
            help=f"Override a `{section}` key, as `dvc exp run -S {section}.KEY=VALUE` does.",
        )(wrapper)
        wrapper = click.option(
            "--section",
            "section_name",
            default=None,
            metavar="NAME",
            help=f"Params section to read (default `{section}`); lets one stage run with several configs, "
            "e.g. `prepare_mlm` and `prepare_train`.",
        )(wrapper)
        wrapper = click.option(
            "--params",
            type=click.Path(dir_okay=False),
            default=None,
            envvar="CEPE_PARAMS",
            help=f"Params file whose `{section}` section fills the config (default: ./params.yaml if present).",
        )(wrapper)
        return wrapper

    return decorator

