#!/usr/bin/env bash
# `cepe bench` on one GPU: CEPE (LLaMA-2-7B-shaped decoder + the paper's 435M encoder, random
# weights, bf16) against the same decoder with full attention, at 4K, 8K, 32K and 128K tokens.
#
#   bash benchmarks/bench_gpu.sh [OUTPUT_DIR] [extra `cepe bench` options...]
#
# Runs from the repository root without installing the package (needs torch, transformers,
# click and pyyaml only). Writes OUTPUT_DIR/bench.json, bench.md and profile_{cepe,full}_131072.txt
# (default OUTPUT_DIR: docs/results). Every measurement is saved as soon as it is made; new ones
# stop being started after --time-budget-s (480 s), so the run ends well within 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/results}"
shift || true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHONPATH=. exec python -m cepe_cli.main bench \
    --decoder llama-2-7b --encoder cepe-435m --lengths 4096,8192,32768,131072 \
    --device cuda --profile-lengths 131072 --compile-encoder true --compile-decode true --output-dir "$out" "$@"
