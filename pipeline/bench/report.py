"""The benchmark's report: the headline numbers per length, the ratios, the targets, and the
two files it is kept in (`bench.json` for tools, `bench.md` for people).

`finalize` derives everything from the raw measurements the runner stores under each side's
`batch_1` / `batch_max`, so it can be re-run on a partial report: an interrupted run still
yields well-formed files with what it measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.io import atomic_write_json, atomic_write_text

SIDES = ("cepe", "full")
# The targets at 128K (docs/performance.md): CEPE relative to full attention.
TARGETS = (
    ("forward_speedup", ">=", 12.0, "forward pass speed-up (full / CEPE)"),
    ("context_state_ratio", "<=", 1 / 200, "context state (CEPE / full)"),
    ("peak_ratio", "<=", 1 / 4.5, "whole-process peak memory (CEPE / full)"),
    ("decode_ratio", "<=", 1 / 2, "time per generated token (CEPE / full, same loop)"),
)
TARGET_TOTAL = 131072
TOLERANCE = 0.10  # the memory model must match the measured growth within 10%


def _usable(result: dict[str, Any] | None) -> bool:
    return bool(result) and not result.get("oom") and not result.get("skipped") and "forward_s" in result


def _loop_ms(result: dict[str, Any], loop: str) -> float | None:
    summary = (result.get("decode") or {}).get(loop)
    return None if not summary else summary.get("ms_per_token")


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _choose_loop(entry: dict[str, Any]) -> str | None:
    """The fastest decode loop that every measured side could use at this length."""
    singles = [entry[s]["batch_1"] for s in SIDES if _usable(entry.get(s, {}).get("batch_1"))]
    if not singles:
        return None
    common = set.intersection(*(set(r.get("decode") or {}) for r in singles))
    if not common:
        return None
    return min(common, key=lambda loop: max(_loop_ms(r, loop) or float("inf") for r in singles))


def _compiled_cell(single: dict[str, Any] | None) -> str:
    """The compiled static loop's time per token, its compilation error, or – when not run."""
    single = single or {}
    compiled = (single.get("decode") or {}).get("compiled")
    if compiled:
        return _f(compiled.get("ms_per_token")) + f" ({compiled.get('loop')})"
    if single.get("compile_decode_error"):
        return f"failed: {single['compile_decode_error'][:80]}"
    return "–"


def _headline(entry: dict[str, Any], side: str, loop: str | None, gen_tokens: int) -> dict[str, Any]:
    """The fields bench.json promises per side: forward_s, peak_gb, context_state_gb,
    decode_ms_per_token (or oom: true), plus tokens/s for a generation of G tokens."""
    raw = entry.get(side, {})
    single = raw.get("batch_1")
    head: dict[str, Any] = {}
    if single is None:
        return head
    if single.get("oom"):
        head.update(oom=True, error=single.get("error"))
    elif single.get("skipped"):
        head.update(skipped=single["skipped"])
    elif not _usable(single):
        head.update(error=single.get("error", "no result"))
    else:
        ms = _loop_ms(single, loop) if loop else None
        head.update(
            oom=False,
            forward_s=single["forward_s"],
            peak_gb=single.get("peak_gb"),
            context_state_gb=single["context_state_gb"],
            decode_ms_per_token=ms,
            decode_loop=(single["decode"][loop]["loop"] if ms is not None else None),
        )
        for key in ("encoder_s", "decoder_s", "weights_gb", "state_gb", "prefill_peak_gb"):
            if key in single:
                head[key] = single[key]
        generation = {}
        for name, summary in (single.get("decode") or {}).items():
            step_s = summary["ms_per_token"] / 1000.0
            generation[summary["loop"]] = {
                "batch": 1,
                "ms_per_token": summary["ms_per_token"],
                "decode_tokens_per_s": round(1.0 / step_s, 2) if step_s else None,
                "generation_tokens_per_s": round(gen_tokens / (single["forward_s"] + gen_tokens * step_s), 2),
            }
        head["generation_batch_1"] = generation
    many = raw.get("batch_max")
    if many and not many.get("oom") and not many.get("skipped") and _usable(single):
        batch = many.get("batch", 1)
        if many.get("same_as_batch_1"):
            head["generation_batch_max"] = {"batch": 1, "same_as_batch_1": True}
        else:
            generation = {}
            for name, summary in (many.get("decode") or {}).items():
                step_s = summary["ms_per_token"] / 1000.0
                # Prefill one sequence at a time (its batch-1 time), then decode all together.
                total_s = batch * single["forward_s"] + gen_tokens * step_s
                generation[summary["loop"]] = {
                    "batch": batch,
                    "ms_per_step": summary["ms_per_token"],
                    "decode_tokens_per_s": round(batch / step_s, 2) if step_s else None,
                    "generation_tokens_per_s": round(batch * gen_tokens / total_s, 2),
                }
            head["generation_batch_max"] = generation
    elif many:
        head["generation_batch_max"] = {k: v for k, v in many.items() if k in ("oom", "skipped", "error")}
    return head


def _ratios(entry: dict[str, Any], loop: str | None) -> dict[str, Any]:
    cepe = entry.get("cepe", {}).get("batch_1")
    full = entry.get("full", {}).get("batch_1")
    if not (_usable(cepe) and _usable(full)):
        why = "; ".join(
            f"{'CEPE' if s == 'cepe' else 'full attention'} {'OOM' if (r or {}).get('oom') else 'not measured'}"
            for s, r in (("cepe", cepe), ("full", full))
            if not _usable(r)
        )
        return {"available": False, "why": why}
    ratios: dict[str, Any] = {
        "available": True,
        "forward_speedup": _ratio(full["forward_s"], cepe["forward_s"]),
        "context_state_ratio": _ratio(cepe["context_state_bytes"], full["context_state_bytes"]),
        "peak_ratio": _ratio(cepe.get("peak_gb"), full.get("peak_gb")),
        "decode_loop": loop,
        "decode_ratio": _ratio(_loop_ms(cepe, loop), _loop_ms(full, loop)) if loop else None,
        "decode_ratio_by_loop": {
            l: _ratio(_loop_ms(cepe, l), _loop_ms(full, l)) for l in sorted(set(cepe.get("decode") or {}) & set(full.get("decode") or {}))
        },
    }
    return {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in ratios.items()}


def _fit_slope(points: list[tuple[int, int]]) -> float | None:
    """Least-squares bytes per context token through (context_tokens, bytes) points."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def memory_model_check(report: dict[str, Any]) -> dict[str, Any]:
    """Predicted bytes kept per context token against the measured growth of what each side
    keeps after its prefill, over the lengths where CEPE's decoder share is the same (so only
    the context grows). Measured two ways: the tensors the model returned (any device) and the
    allocator's growth (CUDA)."""
    out: dict[str, Any] = {}
    entries = list(report.get("lengths", {}).values())
    for side in SIDES:
        model = report.get("models", {}).get(side)
        if not model:
            continue
        groups: dict[int, list[dict[str, Any]]] = {}
        for entry in entries:
            single = entry.get(side, {}).get("batch_1")
            if _usable(single):
                groups.setdefault(entry["decoder_tokens"], []).append({**single, "_ctx": entry["context_tokens"]})
        group = max(groups.values(), key=len, default=[])
        predicted = model["bytes_per_context_token"]
        check: dict[str, Any] = {"predicted_bytes_per_context_token": predicted, "lengths_used": len(group)}
        for source, key in (("tensors", "state_bytes"), ("allocator", "state_alloc_bytes")):
            points = [(r["_ctx"], r[key]) for r in group if r.get(key) is not None]
            slope = _fit_slope(points)
            if slope is None:
                continue
            error = abs(slope - predicted) / predicted
            check[f"measured_{source}_bytes_per_context_token"] = round(slope, 2)
            check[f"error_{source}"] = round(error, 4)
            check[f"within_{source}"] = error <= TOLERANCE
        out[side] = check
    if "cepe" in out and "full" in out:
        out["full_over_cepe_bytes_per_token"] = round(
            out["full"]["predicted_bytes_per_context_token"] / out["cepe"]["predicted_bytes_per_context_token"], 2
        )
    return out


def _targets(report: dict[str, Any]) -> dict[str, Any]:
    lengths = report.get("lengths", {})
    at = str(TARGET_TOTAL)
    if at not in lengths:
        return {}
    ratios = lengths[at].get("ratios", {})
    rows = []
    for key, op, target, label in TARGETS:
        value = ratios.get(key) if ratios.get("available") else None
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        rows.append({"metric": key, "label": label, "value": value, "target": f"{op} {target:.4g}", "met": met})
    return {"total": int(at), "checks": rows}


def finalize(report: dict[str, Any]) -> None:
    """Fill in the headline fields, ratios, targets and memory-model check from the raw results."""
    gen_tokens = report.get("config", {}).get("gen_tokens", 0)
    for entry in report.get("lengths", {}).values():
        loop = _choose_loop(entry)
        for side in SIDES:
            if side in entry:
                raw = {k: v for k, v in entry[side].items() if k in ("batch_1", "batch_max", "profile")}
                entry[side] = {**_headline(entry, side, loop, gen_tokens), **raw}
        entry["ratios"] = _ratios(entry, loop)
    report["targets"] = _targets(report)
    report["memory_model"] = memory_model_check(report)


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def _cell(result: dict[str, Any] | None, text: str) -> str:
    if not result:
        return "–"
    if result.get("oom"):
        return "OOM"
    if result.get("skipped"):
        return "skipped"
    if not _usable(result):
        return "error"
    return text


def _k(total: int) -> str:
    return f"{total // 1024}K" if total % 1024 == 0 else str(total)


def render_markdown(report: dict[str, Any]) -> str:
    dev = report.get("device", {})
    cfg = report.get("config", {})
    ceil = report.get("ceilings", {})
    models = report.get("models", {})
    lines = ["# `cepe bench`: CEPE against full attention", ""]
    if not report.get("complete"):
        lines += ["**Incomplete run**: the numbers below are what was measured before it stopped.", ""]
    lines += [
        f"- Command: `{report.get('command', '')}`",
        f"- Device: {dev.get('name', dev.get('device'))}"
        + (f", {dev['memory_gb']} GB, compute capability {dev.get('capability')}, CUDA {dev.get('cuda')}" if "memory_gb" in dev else "")
        + f"; torch {dev.get('torch')}, transformers {dev.get('transformers')}"
        + (f", flash-attn {dev.get('flash_attn') or 'not installed'}" if "flash_attn" in dev else ""),
        f"- Measured ceilings: {cfg.get('dtype')} matmul {ceil.get('matmul_tflops')} TFLOP/s ({ceil.get('matmul_size')}^3), "
        f"device copy {ceil.get('copy_tb_per_s')} TB/s (read + write)",
        f"- Models (random weights, {cfg.get('dtype')}): decoder `{cfg.get('decoder')}`, encoder `{cfg.get('encoder')}`; "
        + ", ".join(f"{s} {m.get('weights_gb')} GB of weights ({m.get('attn_implementation')})" for s, m in models.items()),
        f"- CEPE: encoder chunks of {cfg.get('chunk_len')} tokens, decoder {cfg.get('decoder_len')} tokens "
        f"(half the total below {2 * (cfg.get('decoder_len') or 0)}); generation G = {cfg.get('gen_tokens')} tokens; "
        f"run time {report.get('elapsed_s')} s",
        "",
        "## Batch 1",
        "",
        "| total | encoder / decoder tokens | side | forward (s) | encoder (s) | decoder (s) | peak (GB) | context state (GB) "
        "| plain loop (ms/token) | static loop (ms/token) | compiled static loop (ms/token) | decode floor (ms) | tokens/s, G tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lengths = sorted(report.get("lengths", {}).values(), key=lambda e: e["total"])
    for entry in lengths:
        for side in SIDES:
            if side not in entry:
                continue
            single = entry[side].get("batch_1")
            head = entry[side]
            loops = (single or {}).get("decode") or {}
            static = loops.get("static", {})
            gen = head.get("generation_batch_1", {}).get(static.get("loop") or "plain", {})
            row = [
                _k(entry["total"]),
                f"{entry['context_tokens']} / {entry['decoder_tokens']}" if side == "cepe" else f"– / {entry['total']}",
                "CEPE" if side == "cepe" else "full attention",
                _cell(single, _f(head.get("forward_s"))),
                _cell(single, _f(head.get("encoder_s"))) if side == "cepe" else "",
                _cell(single, _f(head.get("decoder_s"))) if side == "cepe" else "",
                _cell(single, _f(head.get("peak_gb"))),
                _cell(single, _f(head.get("context_state_gb"), 4)),
                _cell(single, _f(loops.get("plain", {}).get("ms_per_token"))),
                _cell(single, _f(static.get("ms_per_token")) + (f" ({static.get('loop')}, {static.get('attn_implementation', 'sdpa')})" if static else "")),
                _cell(single, _compiled_cell(single)),
                _cell(single, _f((single or {}).get("decode_floor_ms"))),
                _cell(single, _f(gen.get("generation_tokens_per_s"))),
            ]
            lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "## Ratios, CEPE / full attention",
        "",
        "| total | forward speed-up (full / CEPE) | context state | peak memory | per token, fastest common loop | per token, plain loop |",
        "|---|---|---|---|---|---|",
    ]
    for entry in lengths:
        r = entry.get("ratios", {})
        if not r.get("available"):
            lines.append(f"| {_k(entry['total'])} | {r.get('why', '–')} | | | | |")
            continue
        inv = lambda v: "–" if not v else f"1/{1 / v:.3g}"  # noqa: E731
        lines.append(
            f"| {_k(entry['total'])} | {_f(r.get('forward_speedup'))}x | {inv(r.get('context_state_ratio'))} "
            f"| {inv(r.get('peak_ratio'))} | {_f(r.get('decode_ratio'))} ({r.get('decode_loop')}) "
            f"| {_f(r.get('decode_ratio_by_loop', {}).get('plain'))} |"
        )
    targets = report.get("targets") or {}
    if targets:
        lines += ["", f"## Targets at {_k(targets['total'])}", "", "| metric | measured | target | met |", "|---|---|---|---|"]
        for row in targets["checks"]:
            met = {True: "yes", False: "**no**", None: "–"}[row["met"]]
            lines.append(f"| {row['label']} | {_f(row['value'], 4)} | {row['target']} | {met} |")
    lines += [
        "",
        "## Largest batch that fits (decode)",
        "",
        "| total | side | batch | plain loop (ms/step) | static loop (ms/step) | decode tokens/s | generation tokens/s | peak (GB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in lengths:
        for side in SIDES:
            many = entry.get(side, {}).get("batch_max")
            if not many:
                continue
            name = "CEPE" if side == "cepe" else "full attention"
            if many.get("oom") or many.get("skipped") or many.get("same_as_batch_1") or "decode" not in many:
                note = ("OOM" if many.get("oom") else many.get("skipped") or ("1 (= batch 1)" if many.get("same_as_batch_1")
                        else f"error: {many.get('error')}"))
                lines.append(f"| {_k(entry['total'])} | {name} | {note} | | | | | |")
                continue
            loops = many.get("decode", {})
            static = loops.get("static", {})
            gen = entry[side].get("generation_batch_max", {}).get(static.get("loop"), {})
            lines.append(
                f"| {_k(entry['total'])} | {name} | {many.get('batch')} | {_f(loops.get('plain', {}).get('ms_per_token'))} "
                f"| {_f(static.get('ms_per_token'))} ({static.get('loop')}) | {_f(gen.get('decode_tokens_per_s'))} "
                f"| {_f(gen.get('generation_tokens_per_s'))} | {_f(many.get('peak_gb'))} |"
            )
    lines += [
        "",
        "## Achieved TFLOP/s against the measured matmul ceiling",
        "",
        "| total | side | part | PFLOP | time (s) | TFLOP/s | of ceiling |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in lengths:
        for side in SIDES:
            single = entry.get(side, {}).get("batch_1")
            if not _usable(single):
                continue
            for part, flops in single.get("flops", {}).items():
                label = {"forward": "whole forward", "encoder": "encoder pass", "decoder": "decoder prefill (+ cross-attention)"}[part]
                lines.append(
                    f"| {_k(entry['total'])} | {'CEPE' if side == 'cepe' else 'full attention'} | {label} | {_f(flops / 1e15, 3)} "
                    f"| {_f(single.get(f'{part}_s'))} | {_f(single.get('tflops', {}).get(part))} "
                    f"| {_f(single.get('fraction_of_matmul_peak', {}).get(part))} |"
                )
    form_rows = []
    for entry in lengths:
        single = entry.get("cepe", {}).get("batch_1")
        if _usable(single) and single.get("decode_by_form"):
            forms = single["decode_by_form"]
            times = {f: forms.get(f, {}).get("ms_per_token") for f in ("projected", "absorbed", "absorbed_matmul")}
            picked = single.get("decode_cross_attn_form")
            fastest = min((f for f in ("projected", "absorbed") if times[f] is not None), key=lambda f: times[f], default=None)
            form_rows.append(
                f"| {_k(entry['total'])} | {entry['context_tokens']} | {picked} "
                f"| {_f(times['projected'])} | {_f(times['absorbed_matmul']) if times['absorbed_matmul'] else '–'} "
                f"| {_f(times['absorbed'])} | {_f(picked == fastest) if fastest else '–'} "
                f"| {forms.get('absorbed', {}).get('loop', '')} |"
            )
    if form_rows:
        lines += [
            "",
            "## CEPE decode by cross-attention form (ms/token)",
            "",
            "`absorbed` is the form as decoding runs it (two matmuls over the encoder states, or the one-pass "
            "Triton kernel on a GPU from 32K context states on, or as `CEPE_FUSED_DECODE` sets it); with the kernel on, "
            "`absorbed, two matmuls` times the same form without it.",
            "",
            "| total | context tokens | auto picks | projected | absorbed, two matmuls | absorbed | auto picks the faster | loop |",
            "|---|---|---|---|---|---|---|---|",
            *form_rows,
        ]
    mm = report.get("memory_model") or {}
    if any(side in mm for side in SIDES):
        lines += [
            "",
            "## Memory model: bytes kept per context token",
            "",
            "| side | predicted | measured: allocator growth | measured: returned tensors | within 10% |",
            "|---|---|---|---|---|",
        ]
        for side in SIDES:
            if side not in mm:
                continue
            c = mm[side]
            within = [c[k] for k in ("within_allocator", "within_tensors") if k in c]
            lines.append(
                f"| {'CEPE' if side == 'cepe' else 'full attention'} | {c['predicted_bytes_per_context_token']:,} "
                f"| {_f(c.get('measured_allocator_bytes_per_context_token'))} | {_f(c.get('measured_tensors_bytes_per_context_token'))} "
                f"| {_f(all(within)) if within else '–'} |"
            )
        if "full_over_cepe_bytes_per_token" in mm:
            lines.append(f"\nFull attention keeps {mm['full_over_cepe_bytes_per_token']}x more bytes per context token than CEPE.")
    errors = [
        f"{_k(e['total'])} {side} {key}: {e[side][key]['error']}"
        for e in lengths for side in SIDES for key in ("batch_1", "batch_max")
        if (e.get(side, {}).get(key) or {}).get("error") and not e[side][key].get("oom")
    ]
    graph_errors = sorted({
        s["graph_error"] for e in lengths for side in SIDES for key in ("batch_1", "batch_max")
        for s in ((e.get(side, {}).get(key) or {}).get("decode") or {}).values() if s.get("graph_error")
    })
    if errors or graph_errors:
        lines += ["", "## Errors", ""] + [f"- {x}" for x in errors]
        lines += [f"- CUDA graph capture failed, static loop measured eagerly: {x}" for x in graph_errors]
    lines += ["", "## How this was measured", ""] + [f"- {note}" for note in METHOD_NOTES]
    lines += [f"- {note}" for note in report.get("notes", [])]
    return "\n".join(lines) + "\n"


METHOD_NOTES = [
    "Both models are built from their configs with random weights (speed and memory depend only on the shapes), "
    "each alone on the device while it is measured. Full attention is the same decoder with YaRN RoPE scaling to the longest length.",
    "Forward: one prefill over the prompt keeping the last position's logits and the cache; CUDA-event timing, "
    "median of the timed repeats after the warm-up. CEPE's forward = encoder over the context chunks + decoder over its tokens.",
    "Peak: `torch.cuda.max_memory_allocated` over the prefills and both decode loops at batch 1 (weights included). "
    "Context state: CEPE's encoder states; for full attention, the KV cache of the same tokens (those outside CEPE's decoder window).",
    "Plain loop: one eager `transformers` forward per token with its `DynamicCache` (launch-bound at batch 1). "
    "Static loop: a `StaticCache`, a fixed 4-D mask and on-device positions, replayed as one CUDA graph per token on a GPU. "
    "A masked step cannot use sdpa's flash kernel, so the loop probes sdpa, eager and (on a GPU) the split-KV "
    "`cepe_decode` self-attention (8 steps each) and measures the fastest. With `pack_decoder` both sides' decoders "
    "run q/k/v and gate/up as one product each, one-token products through the GEMV kernel (decode_packing). "
    "Both sides run the same loops; greedy tokens stay on the device.",
    "Compiled static loop (`compile_decode`): the same static loop with the model's forward `torch.compile`d "
    "(inductor, static shapes), so norms, rotary embeddings and residual adds run as a few fused kernels per layer; "
    "it is compiled during its warm-up steps and then captured as a CUDA graph like the static loop.",
    "The plain loop is timed over `plain_steps` tokens (its time per token is launch-bound and does not depend on G), "
    "the static loop over all G tokens; time per token is the median over the timed steps.",
    "Largest batch: sequences are prefilled one at a time (batch-1 prefill time) and decoded together; the decode is timed on "
    "caches (and CEPE encoder states) of the right shapes allocated directly, halving the batch on OOM. "
    "Generation tokens/s = batch x G / (batch x prefill + G x time per step).",
    "Decode floor: bytes one step must read (weights, KV cache; CEPE: the encoder states, once per layer with the fused "
    "absorbed kernel, twice as two matmuls) "
    "at the measured copy bandwidth.",
    "TFLOP/s: matmul FLOPs counted from the shapes (pipeline/bench/costs.py; cross-attention in the form the model used) over the measured time.",
]


def write_report(report: dict[str, Any], out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench.json", report)
    atomic_write_text(out / "bench.md", render_markdown(report))
