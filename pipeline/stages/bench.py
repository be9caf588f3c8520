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


TRAIN_STAGES = ("warmup", "main", "ceped_online", "ceped_precomputed")
CHECKPOINTING = ("none", "decoder", "all")


@dataclass
class BenchTrainConfig:
    """`cepe bench --train` (section `bench_train`): the training stages' step at the paper's shapes.

    Defaults are the paper profile's stages at the LLaMA-2-7B shape with the paper's encoder:
    warm-up 256 decoder tokens + 4 x 64 encoder tokens, main stage 4096 + 16 x 256, CEPED 2048
    decoder tokens + 16 x 256, its teacher reading 2048 + 2048.
    """

    decoder: str = field("llama-2-7b", help="Decoder shape: a preset (llama-2-7b, llama-2-13b, smollm2-135m, tiny) or a config.json / model directory; weights are random")
    encoder: str = field("cepe-435m", help="Encoder shape: a preset (cepe-435m, tiny) or a config.json / model directory")
    stages: list[str] = field(default_factory=lambda: list(TRAIN_STAGES), help="Stages to measure: warmup, main, ceped_online, ceped_precomputed")
    checkpointing: list[str] = field(default_factory=lambda: ["none", "decoder"], help="Gradient checkpointing modes to measure: none, decoder (decoder layers), all (decoder and encoder layers: the stages' gradient_checkpointing)")
    compile: bool = field(False, help="Also measure every cell with the decoder and encoder layers torch.compile'd (after the eager cells)")
    warmup_decoder_len: int = field(256, help="Warm-up: decoder tokens per sequence")
    warmup_chunks: int = field(4, help="Warm-up: encoder chunks (the duplicate layout: they hold the decoder's first tokens)")
    warmup_chunk_len: int = field(64, help="Warm-up: encoder chunk length")
    main_decoder_len: int = field(4096, help="Main stage: decoder tokens per sequence")
    main_chunks: int = field(16, help="Main stage: encoder chunks")
    main_chunk_len: int = field(256, help="Main stage: encoder chunk length")
    ceped_decoder_len: int = field(2048, help="CEPED: the student's decoder tokens (and the teacher's scored positions)")
    ceped_context_len: int = field(2048, help="CEPED: context tokens the online teacher reads before the decoder tokens")
    ceped_chunks: int = field(16, help="CEPED: encoder chunks the student reads")
    ceped_chunk_len: int = field(256, help="CEPED: encoder chunk length")
    ceped_k: int = field(50, help="CEPED: teacher top-k")
    context_masking: bool = field(True, help="Main stage and CEPED: the stages' encoder-context masking (0.3 / 0.03 per chunk)")
    max_micro_batch: int = field(64, help="Largest micro-batch the search tries")
    timed_steps: int = field(3, help="Timed steps at the chosen micro-batch (median reported)")
    max_grad_norm: float = field(1.0, help="Gradient clipping, as the stages (part of the optimizer's time)")
    precision: Literal["auto", "bf16", "fp32"] = field("auto", help="auto: bf16 autocast with bf16 frozen weights and fp32 trainable ones on a GPU (the stages' mixed_precision bf16), fp32 on a CPU")
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = field("auto", help="Attention of decoder, encoder and cross-attention; auto = flash-attn if installed on a GPU, else sdpa")
    device: str = field("auto", help="cuda, cuda:N, cpu or auto")
    recipe_batch: int = field(128, help="The recipe's global batch (sequences per optimizer step)")
    recipe_warmup_steps: int = field(4000, help="The recipe's warm-up steps")
    recipe_main_steps: int = field(20000, help="The recipe's main-stage steps")
    recipe_ceped_steps: int = field(20000, help="The recipe's CEPED steps")
    recipe_gpus: list[int] = field(default_factory=lambda: [1, 8], help="GPU counts the recipe's wall-clock is estimated for")
    scaling: bool = field(False, help="Scaling mode, run under `accelerate launch` (docs/accelerate/): the main stage's step on every process with the launch's DDP or FSDP, at scaling_micro_batch; adds a row to scaling.json / scaling.md")
    scaling_micro_batch: int = field(1, help="Scaling mode: sequences per process per step")
    scaling_steps: int = field(5, help="Scaling mode: timed steps (after one untimed)")
    baseline: bool = field(True, help="Also measure the main stage (first checkpointing mode) with the training-path speed fixes off (cross_attention.LEAN_NORMS)")
    profile: bool = field(False, help="Write a torch.profiler table of one step of the cell with the best MFU (profile_train_<stage>.txt)")
    time_budget_s: float = field(270.0, help="Start no new measurement after this many seconds (0 = no limit); skipped cells are marked")
    seed: int = field(0, help="Seed of the synthetic token ids")
    output_dir: str = field("reports/bench_train", help="Where bench_train.json and bench_train.md are written")

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in TRAIN_STAGES]
        if unknown or not self.stages or len(set(self.stages)) != len(self.stages):
            raise ConfigError(f"stages: expected distinct values among {', '.join(TRAIN_STAGES)}, got {self.stages}")
        bad = [c for c in self.checkpointing if c not in CHECKPOINTING]
        if bad or not self.checkpointing or len(set(self.checkpointing)) != len(self.checkpointing):
            raise ConfigError(f"checkpointing: expected distinct values among {', '.join(CHECKPOINTING)}, got {self.checkpointing}")
        for name in ("warmup_decoder_len", "warmup_chunks", "warmup_chunk_len", "main_decoder_len", "main_chunks",
                     "main_chunk_len", "ceped_decoder_len", "ceped_chunks", "ceped_chunk_len", "ceped_k",
                     "max_micro_batch", "timed_steps", "recipe_batch", "scaling_micro_batch", "scaling_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        for name in ("ceped_context_len", "recipe_warmup_steps", "recipe_main_steps", "recipe_ceped_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected an integer >= 0, got {getattr(self, name)}")
        if self.warmup_chunks * self.warmup_chunk_len > self.warmup_decoder_len:
            raise ConfigError(
                f"warmup_chunks, warmup_chunk_len: {self.warmup_chunks} x {self.warmup_chunk_len} encoder tokens do not fit "
                f"in the {self.warmup_decoder_len} decoder tokens they duplicate"
            )
        if not self.recipe_gpus or any(n < 1 for n in self.recipe_gpus):
            raise ConfigError(f"recipe_gpus: expected GPU counts >= 1, got {self.recipe_gpus}")
        if self.max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm: expected a positive number, got {self.max_grad_norm}")


def run_train(config: BenchTrainConfig) -> dict[str, Any]:
    """Measure, write `bench_train.json` + `bench_train.md` (scaling mode: a row of `scaling.json` +
    `scaling.md`) into `config.output_dir`, return the report (the row)."""
    if config.scaling:
        from pipeline.bench.train_scaling import run_scaling

        return run_scaling(config)
    from pipeline.bench.train_runner import run_train_bench

    return run_train_bench(config)
