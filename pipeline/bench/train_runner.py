"""`cepe bench --train`: each training stage's step at the stage's shape, its largest micro-batch,
its throughput, memory and MFU; written out after every measurement.

Order of work: the device's ceilings (`measure_ceilings`: the 8192^3 bf16 matmul is the peak MFU
is taken against), one model (the stages share its shape: decoder, encoder, cross-attention in
every layer), then for each stage and checkpointing mode one cell:
1. the largest micro-batch that fits: micro-batches 1, 2, 4, ... (one step each; a step's peak
   is the run's peak at that micro-batch) until one runs out of memory or reaches
   `max_micro_batch`, then bisection between the last fit and the first failure;
2. at that micro-batch, `timed_steps` more steps, timed in parts (`TrainStep`).
Then the main stage once more with the training-path speed fixes off (`baseline`), a profile of
the best cell (`profile`), and with `compile` every cell again with the layers compiled. Once
`time_budget_s` has passed, the remaining cells are recorded as skipped.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.bench.costs import Shape
from pipeline.bench.device import Memory, attempt, describe, error_text, measure_ceilings, release
from pipeline.devices import resolve_device
from pipeline.bench.runner import CPU_MAX_PARAMS, _gb, _median, _round, command_line
from pipeline.bench.train_flops import StepShape, train_step_flops
from pipeline.bench.train_step import PARTS, StageInputs, StageTask, TrainStep, batch_tokens, build_model, compile_layers, set_checkpointing, stage_inputs
from pipeline.errors import CepeError


class TrainBench:
    def __init__(self, config: Any, log: Callable[[str], None] | None = None):
        from pipeline.bench import presets

        self.config = config
        self.device = resolve_device(config.device, option="bench_train.device")
        self.bf16 = config.precision == "bf16" or (config.precision == "auto" and self.device.type == "cuda")
        self.memory = Memory(self.device)
        self.t0 = time.perf_counter()
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.decoder_config = presets.decoder_config(config.decoder)
        self.encoder_config = presets.encoder_config(config.encoder, self.decoder_config.vocab_size)
        params = Shape.of(self.decoder_config).params
        if self.device.type == "cpu" and params > CPU_MAX_PARAMS:
            raise CepeError(
                f"bench_train.decoder: {config.decoder} has {params / 1e9:.1f}B parameters, far too many to train on a CPU; "
                "run on a GPU, or use the CPU presets (--decoder tiny --encoder tiny and short stage lengths, as params/cpu.yaml)"
            )
        self.stages = stage_inputs(config)
        for stage in self.stages.values():
            needed = stage.teacher_tokens or stage.decoder_tokens
            if needed > self.decoder_config.max_position_embeddings:
                raise CepeError(
                    f"bench_train: stage {stage.name} needs {needed} decoder positions, more than the decoder's "
                    f"max_position_embeddings {self.decoder_config.max_position_embeddings}"
                )
        self.out_dir = Path(config.output_dir)
        self.report: dict[str, Any] = {}

    # ------------------------------------------------------------------ helpers
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self) -> bool:
        budget = self.config.time_budget_s
        return bool(budget) and self.elapsed() > budget

    def say(self, text: str) -> None:
        self.log(f"[{self.elapsed():7.1f}s] {text}")

    def save(self, complete: bool = False) -> None:
        from pipeline.bench.train_report import finalize, write_report

        self.report["complete"] = complete
        self.report["elapsed_s"] = round(self.elapsed(), 1)
        finalize(self.report)
        write_report(self.report, self.out_dir)

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        from pipeline.config import to_dict

        cfg = self.config
        info = describe(self.device)
        self.say(f"device {info.get('name')} ({self.device}), torch {info['torch']}, transformers {info['transformers']}")
        ceilings = measure_ceilings(self.device, torch.bfloat16 if self.bf16 else torch.float32)
        self.say(f"ceilings: matmul {ceilings['matmul_tflops']} TFLOP/s, copy {ceilings['copy_tb_per_s']} TB/s")
        self.report = {
            "command": command_line(),
            "device": info,
            "ceilings": ceilings,
            "config": to_dict(cfg),
            "precision": "bf16 autocast, frozen weights bf16, trainable fp32 master weights" if self.bf16
                         else "fp32 (no autocast)",
            "stages": {name: vars(stage) | {"teacher_tokens": stage.teacher_tokens} for name, stage in self.stages.items()},
            "cells": [],
            "notes": [],
        }
        self.save()
        built = attempt(lambda: {"model": self._build()}, keep_going=True)
        if "model" not in built:
            self.report["notes"].append(f"building the model failed: {built.get('error')}")
            self.save(complete=True)
            return self.report
        model = built["model"]
        step = TrainStep(model, self.device, self.bf16, cfg.max_grad_norm)
        self.report["model"] = self._describe_model(model)
        self._cells(model, step, compiled=False)
        # the eager model's extras come before compilation turns every layer into compiled code
        if cfg.baseline and "main" in self.stages and not self.over_budget():
            self._baseline(model, step)
        if cfg.profile and not self.over_budget():
            self._profile(model, step)
        if cfg.compile:
            try:
                compile_layers(model)
            except Exception as exc:  # noqa: BLE001 - recorded, the eager cells stand
                self.report["notes"].append(f"torch.compile failed: {error_text(exc)}")
            else:
                self._cells(model, step, compiled=True)
        del model, step
        release()
        self.save(complete=True)
        self.say(f"done: {self.out_dir / 'bench_train.json'}, {self.out_dir / 'bench_train.md'}")
        return self.report

    def _cells(self, model: Any, step: TrainStep, compiled: bool) -> None:
        """One cell per stage and checkpointing mode (skipped once over the time budget)."""
        for stage in self.stages.values():
            for mode in self.config.checkpointing:
                key = {"stage": stage.name, "checkpointing": mode, "compiled": compiled, "lean_norms": True}
                if self.over_budget():
                    cell = {**key, "skipped": "time budget"}
                else:
                    cell = {**key, **self._cell(model, step, stage, mode)}
                self.report["cells"].append(cell)
                self.say(f"{stage.name} checkpointing={mode} compiled={compiled}: {_brief(cell)}")
                self.save()

    def _build(self) -> Any:
        from pipeline.model.cross_attention import flash_attn_available

        impl = self.config.attn_implementation
        if impl == "auto":
            impl = "flash_attention_2" if self.device.type == "cuda" and flash_attn_available() else "sdpa"
        start = time.perf_counter()
        model = build_model(self.decoder_config, self.encoder_config, self.device, self.bf16, impl)
        self.say(f"built the model ({impl}) in {time.perf_counter() - start:.1f} s")
        return model

    def _describe_model(self, model: Any) -> dict[str, Any]:
        counts = model.parameter_counts()
        return {
            "decoder": self.config.decoder,
            "encoder": self.config.encoder,
            "attn_implementation": model.decoder.config._attn_implementation,
            "cross_attention_layers": len(model.cross_attention_layers()),
            "params": counts,
            "weights_gb": _gb(sum(p.numel() * p.element_size() for p in model.parameters())),
        }

    # ------------------------------------------------------------------ one cell
    def _cell(self, model: Any, step: TrainStep, stage: StageInputs, mode: str) -> dict[str, Any]:
        set_checkpointing(model, mode)
        task = StageTask(stage, model, self.config.seed)
        tries: dict[int, Any] = {}

        def probe(micro: int) -> bool:
            result = attempt(lambda: self._steps(step, task, micro, 1), keep_going=True)
            step.optimizer.zero_grad(set_to_none=True)  # a step cut short by OOM leaves gradients behind
            tries[micro] = result
            return not result.get("oom") and not result.get("error")

        fit, fail = 0, None
        micro, largest = 1, self.config.max_micro_batch
        while not self.over_budget():
            if not probe(micro):
                fail = micro
                break
            fit = micro
            if micro >= largest:
                break
            micro = min(2 * micro, largest)
        if fail is not None and not tries[fail].get("oom"):  # an error, not a size limit: no bisection
            return {"micro_batch": 0, "tried": {str(b): _tried(r) for b, r in sorted(tries.items())},
                    "error": tries[fail].get("error")}
        while fail is not None and fit and fail - fit > 1 and not self.over_budget():
            mid = (fit + fail) // 2
            if probe(mid):
                fit = mid
            else:
                fail = mid
        tried = {str(b): _tried(r) for b, r in sorted(tries.items())}
        if not fit:
            first = tries.get(1, {})
            return {"micro_batch": 0, "tried": tried, "oom": bool(first.get("oom")), "error": first.get("error")}
        measured = attempt(lambda: self._steps(step, task, fit, self.config.timed_steps), keep_going=True)
        step.optimizer.zero_grad(set_to_none=True)
        if measured.get("oom") or measured.get("error"):
            return {"micro_batch": fit, "tried": tried, **measured}
        return {"micro_batch": fit, "tried": tried, **measured, **self._costs(model, stage, fit, mode, measured)}

    def _steps(self, step: TrainStep, task: StageTask, micro: int, count: int) -> dict[str, Any]:
        """`count` steps at micro-batch `micro`: median part times, peak memory, loss, tokens."""
        release()
        self.memory.reset_peak()
        runs: list[dict[str, float]] = []
        loss = None
        tokens: dict[str, int] = {}
        for i in range(count):
            batch = task.batch(i * micro, micro, self.device)
            tokens = batch_tokens(batch)
            out = step(batch, task.compute_loss)
            step.clock.sync()
            runs.append(step.times(out["marks"]))
            loss = float(out["loss"])
            del batch, out
        times = {part: _round(_median([r[part] for r in runs]), 5) for part in (*PARTS, "step")}
        return {"steps": count, "times_s": times, "step_runs_s": [_round(r["step"], 5) for r in runs],
                "peak_gb": _gb(self.memory.peak()), "peak_reserved_gb": _gb(self.memory.peak_reserved()),
                "loss": _round(loss, 6), "tokens": tokens}

    def _costs(self, model: Any, stage: StageInputs, micro: int, mode: str, measured: dict[str, Any]) -> dict[str, Any]:
        """FLOPs, tokens/s and MFU at the recipe's accumulation (the optimizer step shared by
        `recipe_batch / micro` micro-batches on one GPU)."""
        cfg = self.config
        dec, enc = Shape.of(model.decoder.config), Shape.of(model.encoder.config)
        layers = len(model.cross_attention_layers())
        cross = model.cross_attention_layers()[0].cross_attn
        form = cross.choose_form(stage.decoder_tokens, stage.n_chunks * stage.chunk_len)
        shape = StepShape(micro, stage.decoder_tokens, stage.n_chunks, stage.chunk_len, stage.teacher_tokens,
                          stage.decoder_tokens if stage.online else 0)
        flops = train_step_flops(dec, enc, shape, layers, form=form, train_encoder=bool(model.config.train_encoder),
                                 checkpointing=mode)
        times = measured["times_s"]
        accum = max(1, -(-cfg.recipe_batch // micro))
        micro_s = times["step"] - times["optimizer"] + times["optimizer"] / accum
        peak = self.report["ceilings"]["matmul_tflops"]
        tokens = measured["tokens"]
        achieved = flops["total"] / micro_s / 1e12
        return {
            "cross_attn_form": form,
            "flops": flops,
            "accumulation": accum,
            "micro_step_s": _round(micro_s, 5),
            "decoder_tokens_per_s": _round(tokens["decoder"] / micro_s, 5),
            "encoder_tokens_per_s": _round(tokens["encoder"] / micro_s, 5),
            "sequences_per_s": _round(micro / micro_s, 5),
            "tflops": _round(achieved, 4),
            "mfu": _round(achieved / peak, 4) if peak else None,
            "hfu": _round((flops["total"] + flops["recompute"]) / micro_s / 1e12 / peak, 4) if peak else None,
        }

    def _baseline(self, model: Any, step: TrainStep) -> None:
        """The main stage's first checkpointing mode again with the model's training-path speed
        fixes off (`cross_attention.LEAN_NORMS`): what they gained, in memory and time."""
        from pipeline.model import cross_attention

        mode = self.config.checkpointing[0]
        key = {"stage": "main", "checkpointing": mode, "compiled": False, "lean_norms": False}
        cross_attention.LEAN_NORMS = False
        try:
            cell = {**key, **self._cell(model, step, self.stages["main"], mode)}
        finally:
            cross_attention.LEAN_NORMS = True
        self.report["cells"].append(cell)
        self.say(f"main checkpointing={mode}, lean norms off: {_brief(cell)}")
        self.save()

    # ------------------------------------------------------------------ profile
    def _profile(self, model: Any, step: TrainStep) -> None:
        """A torch.profiler table of one step of the first stage at its best eager micro-batch."""
        from torch.profiler import ProfilerActivity, profile

        from pipeline.bench.runner import _table
        from pipeline.io import atomic_write_text

        cells = [c for c in self.report["cells"] if c.get("mfu") is not None and not c["compiled"]]
        if not cells:
            return
        cell = max(cells, key=lambda c: c["mfu"])
        stage = self.stages[cell["stage"]]
        set_checkpointing(model, cell["checkpointing"])
        task = StageTask(stage, model, self.config.seed)
        cuda = self.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

        def profiled() -> dict[str, Any]:
            batch = task.batch(0, cell["micro_batch"], self.device)
            with profile(activities=activities) as prof:
                step(batch, task.compute_loss)
                step.clock.sync()
            name = f"profile_train_{stage.name}.txt"
            title = f"# one {stage.name} step, micro-batch {cell['micro_batch']}, checkpointing {cell['checkpointing']}"
            atomic_write_text(self.out_dir / name, title + "\n" + _table(prof, "device_time_total" if cuda else "cpu_time_total") + "\n")
            return {"file": name, "stage": stage.name, "micro_batch": cell["micro_batch"], "checkpointing": cell["checkpointing"]}

        self.report["profile"] = attempt(profiled, keep_going=True)
        step.optimizer.zero_grad(set_to_none=True)


def _tried(result: dict[str, Any]) -> Any:
    if result.get("oom"):
        return "oom"
    if result.get("error"):
        return f"error: {result['error']}"
    return {"peak_gb": result.get("peak_gb"), "step_s": (result.get("times_s") or {}).get("step")}


def _brief(cell: dict[str, Any]) -> str:
    if cell.get("skipped"):
        return f"skipped ({cell['skipped']})"
    if not cell.get("micro_batch"):
        return "OOM at micro-batch 1" if cell.get("oom") else f"error: {cell.get('error')}"
    if cell.get("error") or cell.get("oom"):
        return f"micro-batch {cell['micro_batch']}: {'OOM' if cell.get('oom') else cell.get('error')}"
    parts = [f"micro-batch {cell['micro_batch']}", f"step {cell['times_s']['step']:.4g} s",
             f"{cell['decoder_tokens_per_s']:.4g} decoder tokens/s"]
    if cell.get("peak_gb") is not None:
        parts.append(f"peak {cell['peak_gb']:.2f} GB")
    if cell.get("mfu") is not None:
        parts.append(f"MFU {cell['mfu']:.3f}")
    return ", ".join(parts)


def run_train_bench(config: Any, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    return TrainBench(config, log).run()


__all__ = ["TrainBench", "run_train_bench"]
