"""`cepe bench`: memory and speed of CEPE against full attention, side by side in one run.

Config section `bench` of params.yaml. The run builds both models from configs with random
weights, measures every total length on both sides, and writes `bench.json` and `bench.md`
into `output_dir` (rewritten after every measurement, so an interrupted run still leaves what
it measured). See pipeline/bench/ for what is measured and how.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config import ConfigError, field

SIDES = ("full", "cepe")


@dataclass
class BenchConfig:
    decoder: str = field("llama-2-7b", help="Decoder shape: a preset (llama-2-7b, smollm2-135m, tiny) or a config.json / model directory; weights are random")
    encoder: str = field("cepe-435m", help="Encoder shape: a preset (cepe-435m, tiny) or a config.json / model directory")
    lengths: list[int] = field(default_factory=lambda: [4096, 8192, 32768, 131072], help="Total token counts to measure (comma-separated)")
    decoder_len: int = field(4096, help="CEPE's decoder tokens; the encoder reads the rest (the decoder keeps total/2 when total < 2*decoder_len, the paper's 2K/2K at 4K)")
    chunk_len: int = field(256, help="Encoder chunk length (tokens)")
    gen_tokens: int = field(256, help="Tokens generated per sequence (G) in the static-cache loop")
    plain_steps: int = field(32, help="Steps timed in the plain transformers loop (launch-bound, so fewer)")
    form_steps: int = field(16, help="Decode steps timed per cross-attention form (projected, absorbed); 0 = skip")
    warmup: int = field(1, help="Untimed prefill runs before the timed ones")
    repeats: int = field(3, help="Timed prefill runs (median reported)")
    repeat_budget_s: float = field(30.0, help="Stop repeating a prefill once its timed runs would exceed this many seconds (at least one)")
    batch_steps: int = field(32, help="Decode steps timed per loop at the largest batch (time per step does not depend on G)")
    max_batch: int = field(256, help="Upper bound of the largest-batch decode measurement; 0 = skip it")
    batch_reserve_gb: float = field(4.0, help="GPU memory left free when choosing the largest batch")
    device: str = field("auto", help="cuda, cuda:N, cpu or auto")
    dtype: Literal["bfloat16", "float16", "float32"] = field("bfloat16", help="Weights and activations dtype")
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = field("auto", help="Decoder self-attention for both sides; auto = the faster of sdpa and flash-attn (if installed) on a full-attention prefill")
    decode_attention: Literal["auto", "sdpa", "eager", "cepe_decode"] = field("auto", help="Decoder self-attention in the static-cache loop (a masked step: sdpa's kernel, eager matmuls, or the split-KV kernel of decode_ops on a GPU); auto = probe each, keep the fastest")
    pack_decoder: bool = field(True, help="Pack each decoder layer's q/k/v and gate/up weights into one product each, and run one-token products through the GEMV kernel on a GPU (decode_packing), on both sides")
    cross_attn_form: Literal["auto", "projected", "absorbed"] = field("auto", help="CEPE cross-attention form (auto: chosen per call by query count and context length)")
    encoder_chunk_batch: int = field(64, help="Chunks per encoder forward (bounds activation memory); 0 = all at once")
    compile_encoder: bool = field(False, help="torch.compile CEPE's encoder layers (fused norms, rotary and SwiGLU; compiled once, before the timed runs); decoders stay eager on both sides")
    compile_decode: bool = field(False, help="Also time the static-cache loop with the decode step torch.compile'd, on both sides (fused norms, rotary, residual adds; compiled in its warm-up steps, then replayed as a CUDA graph)")
    cuda_graph: bool = field(True, help="Replay the static-cache decode step as a CUDA graph (CUDA only)")
    sides: list[str] = field(default_factory=lambda: ["full", "cepe"], help="Which sides to measure: full, cepe")
    time_budget_s: float = field(480.0, help="Start no new measurement after this many seconds (0 = no limit); skipped ones are marked")
    profile_lengths: list[int] = field(default_factory=list, help="Totals at which to also write a torch.profiler table (one prefill, a few eager decode steps) per side: profile_<side>_<total>.txt")
    seed: int = field(0, help="Seed of the random token ids")
    output_dir: str = field("reports/bench", help="Where bench.json and bench.md are written")

    def __post_init__(self) -> None:
        from pipeline.bench.split import Split

        if not self.lengths:
            raise ConfigError("lengths: expected at least one total length")
        if self.chunk_len < 1 or self.decoder_len < 1:
            raise ConfigError("chunk_len, decoder_len: expected positive integers")
        for total in self.lengths:
            if total < 2:
                raise ConfigError(f"lengths: expected totals of at least 2 tokens, got {total}")
            split = Split.of(total, self.decoder_len, self.chunk_len)
            if split.context_tokens % self.chunk_len:
                raise ConfigError(
                    f"lengths: {total} leaves {split.context_tokens} encoder tokens after {split.decoder_tokens} "
                    f"decoder tokens, not a multiple of chunk_len {self.chunk_len}"
                )
        if len(set(self.lengths)) != len(self.lengths):
            raise ConfigError(f"lengths: duplicate totals in {self.lengths}")
        for name in ("gen_tokens", "plain_steps", "repeats", "batch_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected at least 1, got {getattr(self, name)}")
        for name in ("warmup", "form_steps", "max_batch", "encoder_chunk_batch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected 0 or more, got {getattr(self, name)}")
        unknown = [s for s in self.sides if s not in SIDES]
        if unknown or not self.sides:
            raise ConfigError(f"sides: expected a non-empty list of {', '.join(SIDES)}, got {self.sides}")
        missing = [t for t in self.profile_lengths if t not in self.lengths]
        if missing:
            raise ConfigError(f"profile_lengths: {missing} not among lengths {sorted(self.lengths)}")
        self.lengths = sorted(self.lengths)


def run(config: BenchConfig) -> dict[str, Any]:
    """Measure, write `bench.json` + `bench.md` into `config.output_dir`, return the report."""
    from pipeline.bench.runner import run_bench

    return run_bench(config)
