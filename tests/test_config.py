"""Typed configs: params sections, overrides, type checks and errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from pipeline.config import ConfigError, field, load_config, parse_overrides


@dataclass
class Demo:
    lr: float = field(3e-4, help="learning rate")
    steps: int = field(10, help="steps")
    layout: Literal["prevdoc", "concat"] = field("prevdoc", help="layout")
    sources: list[str] = field(default_factory=list, help="sources")
    limit: int | None = field(None, help="optional")
    bf16: bool = field(False, help="flag")

    def __post_init__(self):
        if self.steps <= 0:
            raise ConfigError(f"steps: expected a positive integer, got {self.steps}")


def test_defaults_params_and_overrides(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("demo:\n  lr: 1e-3\n  steps: 5\n  sources: [a, b]\nother:\n  x: 1\n")
    config = load_config(Demo, "demo", params, parse_overrides(["demo.steps=7", "bf16=true", "limit=null"], "demo"))
    assert config == Demo(lr=1e-3, steps=7, sources=["a", "b"], bf16=True, limit=None)
    assert load_config(Demo, "demo", None, {"sources": "x,y", "limit": "3"}).sources == ["x", "y"]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lrr": 1}, "demo.lrr: unknown key"),
        ({"steps": "many"}, "demo.steps: expected an integer"),
        ({"steps": 2.5}, "demo.steps: expected an integer"),
        ({"layout": "random"}, "demo.layout: expected one of 'prevdoc', 'concat'"),
        ({"bf16": "maybe"}, "demo.bf16: expected true or false"),
        ({"steps": 0}, "demo.steps: expected a positive integer"),
    ],
)
def test_errors_name_the_key(values, message):
    with pytest.raises(ConfigError) as err:
        load_config(Demo, "demo", None, values)
    assert str(err.value).startswith(message)


def test_bad_params_file(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(Demo, "demo", tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("demo: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Demo, "demo", bad)
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["lr"], "demo")
