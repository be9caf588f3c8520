"""The train bench's scaling mode: the main stage's step on every process of an `accelerate launch`.

    accelerate launch --config_file docs/accelerate/ddp.yaml  --num_processes N -m cepe_cli.main bench --train --scaling true
    accelerate launch --config_file docs/accelerate/fsdp.yaml --num_processes N -m cepe_cli.main bench --train --scaling true

Each process builds the same model (same seed), which the loop's own Accelerator
(`loop._make_accelerator`: DDP, or FSDP when the launch config says so) prepares with the loop's
optimizer; process r reads slice r of every global micro-batch, as the loop's sampler gives it.
A step is the loop's: autocast forward + loss, `accelerator.backward`, `clip_grad_norm_`, AdamW,
`zero_grad`. The step time is the slowest process's (max over processes), tokens/s counts every
process's tokens, peak memory is the largest process's; MFU is per GPU against the measured
matmul peak of process 0's device.

No micro-batch search here (an out-of-memory error on one process would leave the others waiting
in a collective): `scaling_micro_batch` is fixed; take it from a single-GPU `cepe bench --train`.
Results accumulate in `scaling.json` / `scaling.md` of `output_dir`, one row per (decoder,
strategy, processes), so runs at 1, 2, 4 and 8 GPUs fill one table with the efficiency against 1 GPU.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.bench.costs import Shape
from pipeline.bench.device import Clock, describe, measure_ceilings
from pipeline.bench.runner import _gb, _median, _round, command_line
from pipeline.bench.train_flops import StepShape, train_step_flops
from pipeline.bench.train_step import StageTask, batch_tokens, build_model, set_checkpointing, stage_inputs
from pipeline.io import atomic_write_json, atomic_write_text


FSDP_CONFIG = Path(__file__).resolve().parents[2] / "docs" / "accelerate" / "fsdp.yaml"


def fsdp_unit_classes(config_file: Path = FSDP_CONFIG) -> list[str]:
    """The layer classes an accelerate FSDP config shards as units (`fsdp_transformer_layer_cls_to_wrap`)."""
    import yaml

    values = yaml.safe_load(config_file.read_text()) or {}
    names = (values.get("fsdp_config") or {}).get("fsdp_transformer_layer_cls_to_wrap", "")
    return [n.strip() for n in str(names).split(",") if n.strip()]


def fsdp_units(model: Any, classes: list[str]) -> list[Any]:
    """The submodules of `model` whose class is one of `classes` (what TRANSFORMER_BASED_WRAP wraps):
    for CEPE, every decoder layer (with its cross-attention) and every encoder layer."""
    return [m for m in model.modules() if type(m).__name__ in classes]


def strategy_of(accelerator: Any) -> str:
    """fsdp, ddp (several processes) or single (one process)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


class DistributedStep:
    """The loop's step on a model prepared by the loop's Accelerator."""

    def __init__(self, model: Any, options: Any):
        from pipeline.train.loop import _cast_frozen, _make_accelerator, build_optimizer, build_scheduler, enable_gradient_checkpointing

        self.acc = acc = _make_accelerator(options)
        if acc.mixed_precision == "bf16":
            _cast_frozen(model, torch.bfloat16)  # the loop's frozen_dtype auto on a GPU
        if options.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        model.to(acc.device)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        optimizer = build_optimizer(named, options)
        self.scheduler = build_scheduler(optimizer, options)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.max_grad_norm = options.max_grad_norm or float("inf")
        self.clock = Clock(acc.device)

    def __call__(self, batch: dict[str, Any], compute_loss: Callable[[Any, dict[str, Any]], Any]) -> tuple[float, torch.Tensor]:
        """One step; returns (seconds on this process, loss)."""
        acc = self.acc
        self.clock.sync()
        start = self.clock.mark()
        with acc.autocast():
            loss, _metrics = compute_loss(self.model, batch)
        acc.backward(loss)
        acc.clip_grad_norm_(self.trainable, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        end = self.clock.mark()
        self.clock.sync()
        return self.clock.seconds(start, end), loss.detach()


def run_scaling(config: Any, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time `scaling_steps` main-stage steps (after one untimed) on every process; process 0
    writes its row into `scaling.json` / `scaling.md` and returns the row (others return it too)."""
    from pipeline.bench import presets
    from pipeline.train.loop import LoopOptions, process_state

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    state = process_state()
    cuda = torch.cuda.is_available() and config.device != "cpu"
    bf16 = config.precision == "bf16" or (config.precision == "auto" and cuda)
    decoder_config = presets.decoder_config(config.decoder)
    encoder_config = presets.encoder_config(config.encoder, decoder_config.vocab_size)
    stage = stage_inputs(type(config)(**{**vars(config), "stages": ["main"]}))["main"]
    mode = config.checkpointing[0]
    options = LoopOptions(output=config.output_dir, max_steps=1000, batch_size=config.scaling_micro_batch,
                          mixed_precision="bf16" if bf16 else "no", lr_schedule="constant", warmup_ratio=0.0,
                          max_grad_norm=config.max_grad_norm, gradient_checkpointing=mode == "all", seed=config.seed)
    device = state.device
    torch.manual_seed(config.seed)  # every process builds the same weights
    model = build_model(decoder_config, encoder_config, torch.device("cpu") if device.type == "cpu" else device, bf16,
                        "sdpa" if config.attn_implementation == "auto" else config.attn_implementation)
    if mode == "decoder":
        set_checkpointing(model, "decoder")
    step = DistributedStep(model, options)
    acc = step.acc
    world, rank, micro = acc.num_processes, acc.process_index, config.scaling_micro_batch
    task = StageTask(stage, acc.unwrap_model(step.model), config.seed)
    ceilings = measure_ceilings(acc.device, torch.bfloat16 if bf16 else torch.float32) if acc.is_main_process else {}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    t0 = time.perf_counter()
    for i in range(config.scaling_steps + 1):
        start = (i * world + rank) * micro  # slice r of global micro-batch i
        batch = task.batch(start, micro, acc.device)
        seconds, loss = step(batch, task.compute_loss)
        slowest = acc.reduce(torch.tensor(seconds, device=acc.device), reduction="max")
        mean_loss = acc.reduce(loss.float().reshape(1), reduction="mean")
        if i:  # the first step allocates the optimizer state (and compiles kernels): untimed
            times.append(float(slowest))
        losses.append(float(mean_loss))
    tokens = batch_tokens(batch)
    peak = torch.cuda.max_memory_allocated(acc.device) if torch.cuda.is_available() else 0
    peak = float(acc.reduce(torch.tensor(float(peak), device=acc.device), reduction="max"))
    unwrapped = acc.unwrap_model(step.model)
    flops = train_step_flops(Shape.of(decoder_config), Shape.of(encoder_config),
                             StepShape(micro, stage.decoder_tokens, stage.n_chunks, stage.chunk_len),
                             len(unwrapped.cross_attention_layers()), checkpointing=mode)
    step_s = _median(times) if times else None
    row: dict[str, Any] = {
        "decoder": config.decoder,
        "strategy": strategy_of(acc),
        "processes": world,
        "micro_batch": micro,
        "checkpointing": mode,
        "steps": len(times),
        "step_s": _round(step_s, 5),
        "losses": [_round(v, 7) for v in losses],
        "decoder_tokens_per_s": _round(world * tokens["decoder"] / step_s, 5) if step_s else None,
        "encoder_tokens_per_s": _round(world * tokens["encoder"] / step_s, 5) if step_s else None,
        "peak_gb_per_gpu": _gb(int(peak)) if peak else None,
        "flops_per_gpu": flops["total"],
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if acc.is_main_process:
        peak_tflops = ceilings.get("matmul_tflops")
        if step_s and peak_tflops:
            row["mfu"] = _round(flops["total"] / step_s / 1e12 / peak_tflops, 4)
        row["device"] = describe(acc.device)
        row["ceilings"] = ceilings
        row["command"] = command_line()
        write_scaling(Path(config.output_dir), row)
        log(f"{row['strategy']} x {world}: step {row['step_s']} s, {row['decoder_tokens_per_s']} decoder tokens/s, "
            f"peak {row['peak_gb_per_gpu']} GB/GPU, MFU {row.get('mfu')}")
    acc.wait_for_everyone()
    return row


def write_scaling(out_dir: Path, row: dict[str, Any]) -> dict[str, Any]:
    """Add (or replace) `row` in `scaling.json` and rewrite `scaling.md` from all rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "scaling.json"
    report: dict[str, Any] = {"rows": {}}
    if path.is_file():
        try:
            report = json.loads(path.read_text())
        except json.JSONDecodeError:
            from pipeline.errors import CepeError

            raise CepeError(f"{path}: not valid JSON; move it away to start a new scaling table") from None
    report.setdefault("rows", {})[row_key(row)] = row
    finalize_scaling(report)
    atomic_write_json(path, report)
    atomic_write_text(out_dir / "scaling.md", render_scaling(report))
    return report


def row_key(row: dict[str, Any]) -> str:
    """`<decoder>-<strategy>-<processes>`: one row per model, strategy and GPU count."""
    return f"{row.get('decoder', '')}-{row['strategy']}-{row['processes']}"


def finalize_scaling(report: dict[str, Any]) -> None:
    """Efficiency of each row: its tokens/s over N times the 1-process tokens/s of the same decoder
    (the same strategy's 1-process row if there is one, else the plain single-process row)."""
    rows = report.get("rows", {})
    for row in rows.values():
        ones = [r for r in rows.values() if r["processes"] == 1 and r.get("decoder") == row.get("decoder")
                and r.get("decoder_tokens_per_s")]
        base = next((r for r in ones if r["strategy"] == row["strategy"]), None) or next(
            (r for r in ones if r["strategy"] == "single"), None)
        rate = row.get("decoder_tokens_per_s")
        row["efficiency"] = _round(rate / (row["processes"] * base["decoder_tokens_per_s"]), 4) if base and rate else None
        row["tokens_per_s_per_gpu"] = _round(rate / row["processes"], 5) if rate else None


def render_scaling(report: dict[str, Any]) -> str:
    rows = sorted(report.get("rows", {}).values(),
                  key=lambda r: (r.get("decoder", ""), r["strategy"] != "single", r["strategy"], r["processes"]))
    first = rows[0] if rows else {}
    device = first.get("device", {})
    lines = ["# Main-stage scaling: `cepe bench --train --scaling true` under `accelerate launch`", "",
             f"- Device: {device.get('name')} ({device.get('memory_gb')} GB); torch {device.get('torch')}",
             f"- Matmul ceiling of process 0's GPU: {first.get('ceilings', {}).get('matmul_tflops')} TFLOP/s",
             "- Efficiency: tokens/s over N x the 1-process tokens/s; MFU per GPU (pipeline/bench/train_flops.py)", "",
             "| decoder | strategy | GPUs | micro-batch / GPU | checkpointing | step (s) | decoder tokens/s | per GPU | encoder tokens/s | "
             "efficiency | peak GB / GPU | MFU | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(v: Any) -> str:
            return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

        lines.append(f"| {r.get('decoder', '')} | {r['strategy']} | {r['processes']} | {r['micro_batch']} | {r['checkpointing']} | {f(r['step_s'])} | "
                     f"{f(r['decoder_tokens_per_s'])} | {f(r.get('tokens_per_s_per_gpu'))} | {f(r['encoder_tokens_per_s'])} | "
                     f"{f(r.get('efficiency'))} | {f(r.get('peak_gb_per_gpu'))} | {f(r.get('mfu'))} | `{r.get('command', '')}` |")
    return "\n".join(lines) + "\n"
