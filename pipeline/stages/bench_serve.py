"""`cepe bench-serve`: the serving benchmark (pipeline/bench/serve.py).

Config section `bench_serve` of params.yaml (run by hand, not a dvc stage). On a CPU use the tiny
presets: --decoder tiny --encoder tiny --document-tokens 512 --chunk-len 16 --question-tokens 8
--gen-tokens 4 --clients 1,2,4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config import ConfigError, field


@dataclass
class BenchServeConfig:
    decoder: str = field("llama-2-7b", help="Decoder shape: a preset (llama-2-7b, smollm2-135m, tiny) or a config.json; weights are random")
    encoder: str = field("cepe-435m", help="Encoder shape: a preset (cepe-435m, tiny) or a config.json")
    document_tokens: int = field(131072, help="Tokens of each document")
    question_tokens: int = field(64, help="Decoder prompt tokens of each question")
    chunk_len: int = field(256, help="Encoder chunk length (tokens)")
    gen_tokens: int = field(32, help="Tokens each client generates in the throughput runs")
    clients: list[int] = field(default_factory=lambda: [1, 8, 32], help="Concurrent clients of the throughput runs (comma-separated)")
    full_attention: bool = field(True, help="Also time full attention's prefill of document + question (needs its KV cache in memory)")
    warmup: int = field(1, help="Untimed runs before the timed ones")
    repeats: int = field(2, help="Timed runs (median reported)")
    reserve_gb: float = field(4.0, help="GPU memory left free when counting how many documents fit")
    encoder_chunk_batch: int = field(64, help="Chunks per encoder forward")
    fast_decode: bool = field(True, help="On a GPU: decoder packed for decoding and the split-KV attention, as cepe serve")
    device: str = field("auto", help="cuda, cuda:N, cpu or auto")
    dtype: Literal["bfloat16", "float16", "float32"] = field("bfloat16", help="Weights and activations dtype")
    time_budget_s: float = field(200.0, help="Start no new measurement after this many seconds (0 = no limit)")
    seed: int = field(0, help="Seed of the random token ids")
    output_dir: str = field("reports/bench-serve", help="Where serve.json and serve.md are written")

    def __post_init__(self) -> None:
        for name in ("document_tokens", "question_tokens", "chunk_len", "gen_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("warmup", "encoder_chunk_batch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected 0 or more, got {getattr(self, name)}")
        if not self.clients or any(n < 1 for n in self.clients):
            raise ConfigError(f"clients: expected positive client counts, got {self.clients}")


def run(config: BenchServeConfig) -> dict[str, Any]:
    """Measure; writes `serve.json` + `serve.md` into `config.output_dir`; returns the report."""
    from pipeline.bench.serve import run_bench_serve

    return run_bench_serve(config)
