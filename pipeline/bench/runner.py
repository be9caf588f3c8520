"""One benchmark run: every total length on both sides, written out after each measurement.

Order of work (each side's model is resident alone, so its peak memory is its own):
1. full attention at batch 1, every length: prefill (warm-up, then timed repeats), the plain
   loop, then the static-cache loop (as a CUDA graph on a GPU);
2. CEPE at batch 1, the same, plus decode with each cross-attention form forced;
3. both sides again at the largest batch that fits, decode only (see `_batch_cell`).
A measurement that runs out of memory is recorded as `{"oom": true}` and the run goes on; once
`time_budget_s` has passed, the remaining ones are recorded as skipped.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.bench import decode
from pipeline.bench.device import GB, Clock, Memory, attempt, describe, error_text, is_oom, measure_ceilings, release
from pipeline.bench.costs import Shape
from pipeline.bench.split import Split
from pipeline.devices import resolve_device, resolve_dtype
from pipeline.errors import CepeError

DECODE_WARMUP = 2  # eager steps before a CUDA graph is captured
COMPILE_WARMUP = 3  # steps of a compiled loop before its capture (the first one compiles)
PROBE_STEPS = 8  # timed steps per attention backend when choosing the static loop's
CPU_MAX_PARAMS = 2_000_000_000


def _round(value: float | None, digits: int = 4) -> float | None:
    """`digits` significant digits (tiny CPU models and 7B ones share the report format)."""
    return None if value is None else float(f"{float(value):.{digits}g}")


def _gb(value: int | None) -> float | None:
    return _round(None if value is None else value / GB, 5)


def command_line() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("cepe_cli/main.py", "cepe_cli\\main.py")):
        argv = ["python", "-m", "cepe_cli.main", *argv[1:]]
    elif argv and Path(argv[0]).name == "cepe":
        argv[0] = "cepe"
    return " ".join(shlex.quote(a) for a in argv)


class Runner:
    def __init__(self, config: Any, log: Callable[[str], None] | None = None):
        from pipeline.bench import presets

        self.config = config
        self.device = resolve_device(config.device, option="bench.device")
        self.dtype = resolve_dtype(config.dtype, self.device, option="bench.dtype")
        self.clock = Clock(self.device)
        self.memory = Memory(self.device)
        self.t0 = time.perf_counter()
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.decoder_config = presets.decoder_config(config.decoder)
        self.encoder_config = presets.encoder_config(config.encoder, self.decoder_config.vocab_size)
        params = Shape.of(self.decoder_config).params
        if self.device.type == "cpu" and params > CPU_MAX_PARAMS:
            raise CepeError(
                f"bench.decoder: {config.decoder} has {params / 1e9:.1f}B parameters, far too many to measure on a CPU; "
                "run on a GPU, or use the CPU presets (--decoder tiny --encoder tiny --lengths 192,384 --decoder-len 64 --chunk-len 16)"
            )
        self.splits = [Split.of(total, config.decoder_len, config.chunk_len) for total in config.lengths]
        self.out_dir = Path(config.output_dir)
        self.report: dict[str, Any] = {}
        self.attn_implementation = "sdpa" if config.attn_implementation == "auto" else config.attn_implementation

    # ------------------------------------------------------------------ helpers
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self) -> bool:
        budget = self.config.time_budget_s
        return bool(budget) and self.elapsed() > budget

    def say(self, text: str) -> None:
        self.log(f"[{self.elapsed():7.1f}s] {text}")

    def generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + salt)

    def entry(self, split: Split) -> dict[str, Any]:
        return self.report["lengths"][str(split.total)]

    def save(self, complete: bool = False) -> None:
        from pipeline.bench.report import finalize, write_report

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
        ceilings = measure_ceilings(self.device, self.dtype)
        self.say(f"ceilings: matmul {ceilings['matmul_tflops']} TFLOP/s, copy {ceilings['copy_tb_per_s']} TB/s")
        self.report = {
            "command": command_line(),
            "device": info,
            "ceilings": ceilings,
            "config": to_dict(cfg),
            "lengths": {
                str(s.total): {
                    "total": s.total,
                    "decoder_tokens": s.decoder_tokens,
                    "context_tokens": s.context_tokens,
                    "chunks": s.n_chunks,
                }
                for s in self.splits
            },
            "notes": [],
        }
        self.save()
        for name in ("full", "cepe"):
            if name in cfg.sides:
                self._phase(name, batch_max=False)
        if cfg.max_batch:
            for name in ("full", "cepe"):
                if name in cfg.sides:
                    self._phase(name, batch_max=True)
        self.save(complete=True)
        self.say(f"done: {self.out_dir / 'bench.json'}, {self.out_dir / 'bench.md'}")
        return self.report

    def _build(self, name: str) -> Any:
        from pipeline.bench.sides import Cepe, FullAttention

        cfg = self.config
        start = time.perf_counter()
        if name == "full":
            max_positions = max(cfg.lengths) + cfg.gen_tokens + cfg.plain_steps
            side = FullAttention(self.decoder_config, self.device, self.dtype, max_positions, self.attn_implementation)
        else:
            self.decoder_config._attn_implementation = self.attn_implementation
            side = Cepe(
                self.decoder_config, self.encoder_config, self.device, self.dtype,
                cross_attn_form=cfg.cross_attn_form, encoder_chunk_batch=cfg.encoder_chunk_batch or None,
                compile_encoder=cfg.compile_encoder,
            )
        if cfg.pack_decoder:
            from pipeline.fastdecode.decode_packing import pack_for_decoding

            side.packed = pack_for_decoding(side.model)
        self.say(f"built {name}: {side.weight_bytes / GB:.2f} GB of weights in {time.perf_counter() - start:.1f} s")
        return side

    def _phase(self, name: str, batch_max: bool) -> None:
        key = "batch_max" if batch_max else "batch_1"
        if self.over_budget():
            for split in self.splits:
                self._store(split, name, key, {"skipped": "time budget"})
            return
        side = attempt(lambda: {"side": self._build(name)}, keep_going=True)
        if "side" not in side:
            for split in self.splits:
                self._store(split, name, key, {**side, "error": f"building the model: {side.get('error')}"})
            return
        side = side["side"]
        self.report.setdefault("models", {})[name] = {
            "weights_gb": _gb(side.weight_bytes),
            "attn_implementation": side.attn_implementation,
            "bytes_per_context_token": side.bytes_per_context_token(),
            "packed": side.packed,
        }
        if name == "full" and not batch_max and self.config.attn_implementation == "auto":
            self._choose_attention(side)
        for split in self.splits:
            if self.over_budget():
                self._store(split, name, key, {"skipped": "time budget"})
                continue
            if batch_max:
                result = attempt(lambda: self._batch_cell(side, split), keep_going=True)
            else:
                result = attempt(lambda: self._single_cell(side, split), keep_going=True)
            self._store(split, name, key, result)
            self.say(f"{name} {split.total}: {_brief(result)}")
            if not batch_max and split.total in self.config.profile_lengths and not result.get("oom"):
                profiled = attempt(lambda: self._profile(side, split), keep_going=True)
                self.entry(split)[name]["profile"] = profiled
                self.save()
        del side
        release()

    def _store(self, split: Split, name: str, key: str, result: dict[str, Any]) -> None:
        self.entry(split).setdefault(name, {})[key] = result
        self.save()

    # ------------------------------------------------------------------ attention backend
    def _choose_attention(self, side: Any) -> None:
        """sdpa or flash-attn, whichever runs the full-attention prefill faster on this device."""
        from pipeline.model.cross_attention import flash_attn_available

        candidates = ["sdpa"]
        if self.device.type == "cuda" and flash_attn_available():
            candidates.append("flash_attention_2")
        if len(candidates) == 1:
            self.report["attention_choice"] = {"chosen": "sdpa", "reason": "flash-attn not installed"}
            return
        probe = min((s for s in self.splits if s.total >= 8192), key=lambda s: s.total, default=self.splits[-1])
        timings: dict[str, float | None] = {}
        for impl in candidates:
            side.set_attn_implementation(impl)

            def timed() -> dict[str, Any]:
                side.prefill(probe, 1, self.clock, self.generator(0))  # warm-up
                p = side.prefill(probe, 1, self.clock, self.generator(0))
                self.clock.sync()
                return {"s": self.clock.seconds(*p.marks["forward"])}

            timings[impl] = attempt(timed).get("s")
        chosen = min((k for k in timings if timings[k] is not None), key=lambda k: timings[k], default="sdpa")
        side.set_attn_implementation(chosen)
        self.attn_implementation = chosen
        self.report["attention_choice"] = {"chosen": chosen, "probe_total": probe.total, "prefill_s": timings}
        self.report["models"]["full"]["attn_implementation"] = chosen
        self.say(f"attention: {timings} -> {chosen}")

    # ------------------------------------------------------------------ batch 1
    def _single_cell(self, side: Any, split: Split) -> dict[str, Any]:
        cfg = self.config
        clock, memory = self.clock, self.memory
        release()
        memory.reset_peak()
        before = memory.allocated()
        runs: list[dict[str, float]] = []
        prefill = None
        i = 0
        while True:
            prefill = None  # free the previous run's cache before the next one allocates its own
            prefill = side.prefill(split, 1, clock, self.generator(split.total))
            clock.sync()
            times = {part: clock.seconds(a, b) for part, (a, b) in prefill.marks.items()}
            i += 1
            if i > cfg.warmup:
                runs.append(times)
            timed_total = sum(r["forward"] for r in runs)
            if len(runs) >= cfg.repeats or (runs and timed_total + times["forward"] > cfg.repeat_budget_s):
                break
        prefill_peak = memory.peak()
        after = memory.allocated()
        result: dict[str, Any] = {
            "prefill_repeats": len(runs),
            "prefill_runs_s": [round(r["forward"], 5) for r in runs],
        }
        for part in runs[0]:
            result[f"{part}_s"] = _round(_median([r[part] for r in runs]), 5)
        flops = side.flops(split)
        peak_tflops = self.report["ceilings"]["matmul_tflops"]
        result["flops"] = {part: value for part, value in flops.items()}
        result["tflops"] = {part: _round(flops[part] / result[f"{part}_s"] / 1e12, 4) for part in flops if result.get(f"{part}_s")}
        result["fraction_of_matmul_peak"] = {
            part: _round(v / peak_tflops, 3) for part, v in result["tflops"].items() if v and peak_tflops
        }
        result["weights_gb"] = _gb(side.weight_bytes)
        result["context_state_bytes"] = side.context_state_bytes(prefill, split)
        result["state_bytes"] = side.state_bytes(prefill)
        result["state_alloc_bytes"] = None if before is None else after - before
        result["context_state_gb"] = _gb(result["context_state_bytes"])
        result["state_gb"] = _gb(result["state_bytes"])
        result["state_alloc_gb"] = _gb(result["state_alloc_bytes"])
        result["prefill_peak_gb"] = _gb(prefill_peak)
        if side.name == "cepe":
            result["prefill_cross_attn_form"] = side.form(split.decoder_tokens, split.context_tokens)
            result["decode_cross_attn_form"] = side.form(1, split.context_tokens)

        # -- decode: the plain loop continues the prefill's own cache ...
        loops: dict[str, Any] = {}
        plain = decode.plain_decode(side.model, prefill.cache, prefill.first, cfg.plain_steps, clock, prefill.step_kwargs)
        loops["plain"] = plain.summary()
        # ... then the same cache moves into a static one and the static loop continues it.
        start = prefill.start + cfg.plain_steps
        room = self._static_room(cfg.gen_tokens)
        if side.name == "cepe" and cfg.form_steps:
            room += 3 * (DECODE_WARMUP + cfg.form_steps)
        if cfg.compile_decode:
            room += COMPILE_WARMUP + cfg.gen_tokens
        static = decode.to_static(prefill.cache, side.cache_config, start + room + 8)
        prefill.cache = None
        first = plain.tokens[:, -1:]
        loops["static"] = self._static_best(side, static, first, cfg.gen_tokens, prefill.step_kwargs)
        if cfg.compile_decode:
            # The same loop with the step compiled, with the self-attention the probes chose; a
            # compilation failure is recorded, not fatal (the uncompiled loop stands).
            position = int(static.layers[0].cumulative_length)
            try:
                loops["compiled"] = self._static_loop(side, static, first, position, cfg.gen_tokens, prefill.step_kwargs,
                                                      loops["static"]["attn_implementation"], compile_step=True)
            except Exception as exc:  # noqa: BLE001
                if is_oom(exc):
                    raise
                result["compile_decode_error"] = error_text(exc)
                release()
        if side.name == "cepe" and cfg.form_steps:
            forms = {}
            impl = loops["static"]["attn_implementation"]
            # With the fused kernel available, also time the absorbed form as two matmuls.
            for form in ("projected", "absorbed") + (("absorbed_matmul",) if side.fused_decode(split.context_tokens) else ()):
                position = int(static.layers[0].cumulative_length)
                kwargs = dict(prefill.step_kwargs, cross_attn_form=form)
                forms[form] = self._static_loop(side, static, first, position, cfg.form_steps, kwargs, impl)
            result["decode_by_form"] = forms
        result["decode"] = loops
        floor_bytes = side.decode_floor_bytes(split, 1)
        result["decode_floor_ms"] = _round(floor_bytes / (self.report["ceilings"]["copy_tb_per_s"] * 1e12) * 1000, 3)
        result["peak_gb"] = _gb(memory.peak())
        result["peak_reserved_gb"] = _gb(memory.peak_reserved())
        prefill = static = None
        return result

    def _static_room(self, steps: int) -> int:
        """Cache positions `_static_best` uses: probes of each attention backend, then `steps`."""
        probes = len(self._decode_candidates()) * (DECODE_WARMUP + PROBE_STEPS) if self.config.decode_attention == "auto" else 0
        return probes + DECODE_WARMUP + steps

    def _static_best(self, side: Any, cache: Any, first: torch.Tensor, steps: int, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The static-cache loop with the fastest self-attention for it.

        With a static cache every step needs a mask over the preallocated positions. sdpa then
        cannot use its flash kernel (no masks; the one that splits a long KV cache across the
        GPU) and falls back to a kernel that may spread one query over few SMs, while eager
        attention is two batched matrix-vector products, and cepe_decode (on a GPU) splits each
        head's cache across the GPU: which one reads a cache fastest depends on the device and
        the cache's length, so with `decode_attention: auto` each is probed (a few graph steps)
        on each side and the fastest is measured.
        """
        probes: dict[str, Any] = {}
        impl = self.config.decode_attention
        if impl == "auto":
            for candidate in self._decode_candidates():
                position = int(cache.layers[0].cumulative_length)
                probes[candidate] = self._static_loop(side, cache, first, position, PROBE_STEPS, kwargs, candidate)["ms_per_token"]
            impl = min(probes, key=probes.get)
        position = int(cache.layers[0].cumulative_length)
        summary = self._static_loop(side, cache, first, position, steps, kwargs, impl)
        if probes:
            summary["probe_ms_per_token"] = probes
        return summary

    def _decode_candidates(self) -> tuple[str, ...]:
        """Self-attention backends `decode_attention: auto` probes: sdpa and eager, and the
        split-KV kernel (decode_ops) where it runs."""
        from pipeline.fastdecode import decode_ops, triton_support

        runs = triton_support.kernels_run(self.device, False) and decode_ops.enabled()
        extra = (decode_ops.ATTENTION_NAME,) if runs else ()
        return ("sdpa", "eager") + extra

    def _static_loop(self, side: Any, cache: Any, first: torch.Tensor, start: int, steps: int, kwargs: dict[str, Any],
                     impl: str = "sdpa", compile_step: bool = False) -> dict[str, Any]:
        """The static-cache loop with the decoder's self-attention set to `impl` (sdpa, eager or
        cepe_decode; flash-attn takes no 4-D mask), as a CUDA graph where possible: a capture
        failure other than out of memory is recorded and the loop is measured eagerly instead."""
        with _attention(side, impl):
            summary = self._static_loop_or_eager(side, cache, first, start, steps, kwargs, compile_step)
        summary["attn_implementation"] = impl
        return summary

    def _static_loop_or_eager(self, side: Any, cache: Any, first: torch.Tensor, start: int, steps: int, kwargs: dict[str, Any],
                              compile_step: bool = False) -> dict[str, Any]:
        graph = self.config.cuda_graph and self.device.type == "cuda"
        warmup = COMPILE_WARMUP if compile_step else DECODE_WARMUP
        try:
            return decode.static_decode(side.model, cache, first, start, steps, self.clock, kwargs, graph=graph, warmup=warmup,
                                        compile_step=compile_step).summary()
        except Exception as exc:  # noqa: BLE001
            if is_oom(exc) or not graph:
                raise
            error = error_text(exc)
        release()
        position = int(cache.layers[0].cumulative_length)
        summary = decode.static_decode(side.model, cache, first, position, steps, self.clock, kwargs, graph=False,
                                       compile_step=compile_step).summary()
        summary["graph_error"] = error
        return summary

    # ------------------------------------------------------------------ profile
    def _profile(self, side: Any, split: Split) -> dict[str, Any]:
        """A torch.profiler table of one prefill and of a few eager static-cache decode steps
        (eager, so every kernel shows), and with `compile_decode` of a few compiled steps (not
        graph-replayed, so their kernels show), for finding where a side's time goes. The decode
        steps use `decode_attention` unless it is auto (then the side's own attention)."""
        impl = self.config.decode_attention
        with _attention(side, side.attn_implementation if impl == "auto" else impl):
            return self._profile_tables(side, split)

    def _profile_tables(self, side: Any, split: Split) -> dict[str, Any]:
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        sort_by = "device_time_total" if cuda else "cpu_time_total"
        steps = 4
        with profile(activities=activities) as prof:
            prefill = side.prefill(split, 1, self.clock, self.generator(split.total))
            self.clock.sync()
        tables = [f"# {side.name}, total {split.total}: one prefill", _table(prof, sort_by)]
        room = steps + (COMPILE_WARMUP + steps if self.config.compile_decode else 0)
        cache = decode.to_static(prefill.cache, side.cache_config, prefill.start + room + 8)
        prefill.cache = None
        with profile(activities=activities) as prof:
            decode.static_decode(side.model, cache, prefill.first, prefill.start, steps, self.clock, prefill.step_kwargs, graph=False)
        tables += [f"# {side.name}, total {split.total}: {steps} eager static-cache decode steps", _table(prof, sort_by)]
        if self.config.compile_decode:  # the compiled step's kernels (compiled first, outside the profile)
            position = int(cache.layers[0].cumulative_length)
            decode.static_decode(side.model, cache, prefill.first, position, COMPILE_WARMUP, self.clock, prefill.step_kwargs,
                                 graph=False, compile_step=True)
            position = int(cache.layers[0].cumulative_length)
            with profile(activities=activities) as prof:
                decode.static_decode(side.model, cache, prefill.first, position, steps, self.clock, prefill.step_kwargs,
                                     graph=False, compile_step=True)
            tables += [f"# {side.name}, total {split.total}: {steps} compiled static-cache decode steps", _table(prof, sort_by)]
        path = self.out_dir / f"profile_{side.name}_{split.total}.txt"
        from pipeline.io import atomic_write_text

        atomic_write_text(path, "\n\n".join(tables) + "\n")
        return {"file": path.name}

    # ------------------------------------------------------------------ largest batch
    def _plan_batch(self, side: Any, split: Split) -> tuple[int, str]:
        """The largest batch whose decode state fits beside the weights.

        Sequences are prefilled one at a time (so a prefill's transient memory is needed once,
        not per sequence) and then decoded together; each keeps its decode state (memory model,
        up to the last generated token) plus, in the plain loop, one layer's worth while its
        cache grows by concatenation.
        """
        cfg = self.config
        if self.device.type != "cuda":
            return cfg.max_batch, "no allocator on this device: max_batch"
        single = self.entry(split).get(side.name, {}).get("batch_1", {})
        weights = side.weight_bytes
        transient = 0
        if single.get("prefill_peak_gb") is not None and single.get("state_alloc_bytes") is not None:
            transient = max(0, int(single["prefill_peak_gb"] * GB - single["state_alloc_bytes"] - weights))
        release()
        free, _total = self.memory.free_and_total()
        tokens_after = self._static_room(cfg.gen_tokens) + 8  # a generation of G tokens (+ probes), not just the timed steps
        per_sequence = side.decode_state_bytes(split, tokens_after) * (1 + 1 / side.shape.layers)
        return plan_batch(free, int(cfg.batch_reserve_gb * GB), transient, per_sequence, cfg.max_batch)

    def _batch_cell(self, side: Any, split: Split) -> dict[str, Any]:
        """Decode at the largest batch that fits, from a synthetic state of the right shape.

        Only the shapes matter for decode time, so instead of prefilling B sequences the caches
        (and CEPE's encoder states) are allocated directly. On out of memory the batch is halved.
        """
        cfg = self.config
        batch, why = self._plan_batch(side, split)
        result: dict[str, Any] = {"planned_batch": batch, "plan": why}
        if batch <= 1:
            result.update(batch=1, same_as_batch_1=True)
            return result
        tries = []
        while batch > 1:
            measured = attempt(lambda: self._batch_decode(side, split, batch))
            if not measured.get("oom"):
                result.update(batch=batch, **measured)
                if tries:
                    result["oom_at"] = tries
                return result
            tries.append(batch)
            batch //= 2
        result.update(batch=1, oom_at=tries, same_as_batch_1=True)
        return result

    def _batch_decode(self, side: Any, split: Split, batch: int) -> dict[str, Any]:
        cfg = self.config
        clock, memory = self.clock, self.memory
        release()
        memory.reset_peak()
        start = side.start(split)
        gen = self.generator(split.total + batch)
        first = torch.randint(3, side.shape.vocab, (batch, 1), generator=gen).to(self.device)
        kwargs = side.synthetic_step_kwargs(split, batch, gen)
        loops: dict[str, Any] = {}
        cache = decode.synthetic_dynamic(side.cache_config, batch, start, self.device, self.dtype)
        loops["plain"] = decode.plain_decode(side.model, cache, first, cfg.batch_steps, clock, kwargs).summary()
        cache = None
        release()
        cache = decode.synthetic_static(side.cache_config, batch, start, start + self._static_room(cfg.batch_steps) + 8, self.device, self.dtype)
        loops["static"] = self._static_best(side, cache, first, cfg.batch_steps, kwargs)
        cache = kwargs = None
        floor_bytes = side.decode_floor_bytes(split, batch)
        return {
            "decode": loops,
            "decode_floor_ms": _round(floor_bytes / (self.report["ceilings"]["copy_tb_per_s"] * 1e12) * 1000, 3),
            "peak_gb": _gb(memory.peak()),
        }


def plan_batch(free: int, reserve: int, transient: int, per_sequence: float, max_batch: int) -> tuple[int, str]:
    """How many sequences' decode state fit in `free` bytes, keeping `reserve` free and room for
    one prefill's `transient`; at least 1, at most `max_batch`. Returns (batch, explanation)."""
    batch = max(1, int((free - reserve - transient) // per_sequence))
    why = (f"free {free / GB:.1f} GB - reserve {reserve / GB:.1f} GB - prefill transient {transient / GB:.1f} GB, "
           f"{per_sequence / GB:.3f} GB per sequence")
    if batch > max_batch:
        return max_batch, why + f"; capped at max_batch {max_batch}"
    return batch, why


@contextlib.contextmanager
def _attention(side: Any, impl: str):
    """The side's decoder self-attention set to `impl` for the block, restored after."""
    previous = side.attn_implementation
    if previous != impl:
        side.set_attn_implementation(impl)
    try:
        yield
    finally:
        if previous != impl:
            side.set_attn_implementation(previous)


def _table(prof: Any, sort_by: str) -> str:
    try:
        return prof.key_averages().table(sort_by=sort_by, row_limit=45)
    except (KeyError, AttributeError, ValueError):
        return prof.key_averages().table(sort_by="cpu_time_total", row_limit=45)


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _brief(result: dict[str, Any]) -> str:
    if result.get("oom"):
        return "OOM"
    if result.get("skipped"):
        return f"skipped ({result['skipped']})"
    if result.get("error") and "decode" not in result:
        return f"error: {result['error']}"
    parts = []
    if "forward_s" in result:
        parts.append(f"forward {result['forward_s']:.4g} s")
    if result.get("peak_gb") is not None:
        parts.append(f"peak {result['peak_gb']:.2f} GB")
    if "batch" in result:
        parts.append(f"batch {result['batch']}")
    for loop, summary in (result.get("decode") or {}).items():
        parts.append(f"{summary['loop']} {summary['ms_per_token']:.3g} ms/token")
    return ", ".join(parts)


def run_bench(config: Any, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    return Runner(config, log).run()
