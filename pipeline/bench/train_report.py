"""The train bench's report: per-stage best cells, the paper recipe's cost at the measured rate, the
targets, and the two files it is kept in (`bench_train.json`, `bench_train.md`).

`finalize` derives everything from the raw cells the runner stores, so it can be re-run on a
partial report: an interrupted run still yields well-formed files with what it measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.io import atomic_write_json, atomic_write_text

# The paper's recipe (its global batch is the config's recipe_batch, 128): optimizer steps and what
# one sequence holds (decoder tokens + encoder tokens).
RECIPE_STEPS = {"warmup": "recipe_warmup_steps", "main": "recipe_main_steps",
                "ceped_online": "recipe_ceped_steps", "ceped_precomputed": "recipe_ceped_steps"}
# What the paper reports for its training cost: the main stage on 8 x A100-80GB; "~750 GPU-hours"
# appears in one summary of it only (unconfirmed). Nothing is reported for the warm-up or CEPED.
PAPER_COST = {"main": "8 x A100-80GB; ~750 GPU-hours (one summary only, unconfirmed)"}
# The targets (one H100 or H200): (stage, minimum MFU).
MFU_TARGETS = (("main", 0.45), ("warmup", 0.40), ("ceped_online", 0.40))
MAIN_TARGET_SHAPE = (4096, 16, 256)  # decoder tokens, encoder chunks x chunk length
MEMORY_TARGET_GB = 80.0
LABELS = {"warmup": "warm-up", "main": "main stage", "ceped_online": "CEPED, online teacher",
          "ceped_precomputed": "CEPED, precomputed top-k"}


def _usable(cell: dict[str, Any]) -> bool:
    return cell.get("mfu") is not None or (bool(cell.get("micro_batch")) and "micro_step_s" in cell)


def _baseline(cell: dict[str, Any]) -> bool:
    """A cell measured with the training-path speed fixes off (compared, never the result)."""
    return cell.get("lean_norms") is False


def _label(cell: dict[str, Any]) -> str:
    return LABELS.get(cell["stage"], cell["stage"]) + (" (speed fixes off)" if _baseline(cell) else "")


def best_cells(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per stage, the measured cell with the highest decoder tokens/s."""
    best: dict[str, dict[str, Any]] = {}
    for cell in report.get("cells", []):
        if not _usable(cell) or _baseline(cell):
            continue
        stage = cell["stage"]
        if stage not in best or cell["decoder_tokens_per_s"] > best[stage]["decoder_tokens_per_s"]:
            best[stage] = cell
    return best


def recipe_cost(report: dict[str, Any], best: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Wall-clock and GPU-hours of each stage of the paper's recipe at the best measured single-GPU
    rate, on each GPU count of `recipe_gpus` (perfect scaling assumed: the single-GPU rate times N)."""
    cfg = report.get("config", {})
    batch = int(cfg.get("recipe_batch", 128))
    out: dict[str, Any] = {}
    for stage, cell in best.items():
        steps = int(cfg.get(RECIPE_STEPS[stage], 0))
        if not steps:
            continue
        sequences = steps * batch
        seconds_1 = sequences / cell["sequences_per_s"]
        shape = report.get("stages", {}).get(stage, {})
        entry = {
            "steps": steps,
            "batch": batch,
            "decoder_tokens": sequences * int(shape.get("decoder_tokens", 0)),
            "encoder_tokens": sequences * int(shape.get("n_chunks", 0)) * int(shape.get("chunk_len", 0)),
            "from_cell": {k: cell[k] for k in ("checkpointing", "compiled", "micro_batch")},
            "gpu_hours": round(seconds_1 / 3600, 1),
            "hours": {str(n): round(seconds_1 / n / 3600, 2) for n in cfg.get("recipe_gpus", [1, 8])},
        }
        if stage in PAPER_COST:
            entry["paper"] = PAPER_COST[stage]
        out[stage] = entry
    return out


def targets(report: dict[str, Any], best: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    stage = report.get("stages", {}).get("main")
    if stage and (stage["decoder_tokens"], stage["n_chunks"], stage["chunk_len"]) == MAIN_TARGET_SHAPE:
        fitting = [c for c in report.get("cells", []) if c.get("stage") == "main" and _usable(c)
                   and not _baseline(c) and c.get("peak_gb") is not None]
        peak = min((c["peak_gb"] for c in fitting), default=None)
        rows.append({"target": f"main stage (4096 + 16 x 256 tokens) fits in {MEMORY_TARGET_GB:.0f} GB at micro-batch >= 1",
                     "measured": peak, "unit": "GB (lowest peak)", "met": peak is not None and peak <= MEMORY_TARGET_GB})
    for name, minimum in MFU_TARGETS:
        if name not in report.get("stages", {}):
            continue
        mfu = best.get(name, {}).get("mfu")
        rows.append({"target": f"{LABELS[name]} MFU >= {minimum:.0%} of the measured matmul peak",
                     "measured": mfu, "unit": "MFU", "met": mfu is not None and mfu >= minimum})
    return rows


def finalize(report: dict[str, Any]) -> dict[str, Any]:
    best = best_cells(report)
    report["best"] = {stage: {k: cell.get(k) for k in ("checkpointing", "compiled", "micro_batch", "decoder_tokens_per_s",
                                                       "encoder_tokens_per_s", "peak_gb", "mfu")}
                      for stage, cell in best.items()}
    report["recipe"] = recipe_cost(report, best)
    report["targets"] = targets(report, best)
    report["speed_fixes"] = speed_fixes(report)
    return report


def speed_fixes(report: dict[str, Any]) -> dict[str, Any] | None:
    """The main stage with and without the training-path speed fixes, same checkpointing mode."""
    cells = report.get("cells", [])
    off = next((c for c in cells if _baseline(c) and c["stage"] == "main"), None)
    on = next((c for c in cells if c["stage"] == "main" and not _baseline(c) and not c.get("compiled")
               and off is not None and c["checkpointing"] == off["checkpointing"]), None)
    if off is None or on is None:
        return None
    out: dict[str, Any] = {"checkpointing": off["checkpointing"]}
    for name, cell in (("on", on), ("off", off)):
        out[name] = {k: cell.get(k) for k in ("micro_batch", "peak_gb", "micro_step_s", "decoder_tokens_per_s", "mfu")}
        first = cell.get("tried", {}).get("1")
        out[name]["peak_at_1_gb"] = first.get("peak_gb") if isinstance(first, dict) else None
    return out


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _device_line(report: dict[str, Any]) -> str:
    d = report.get("device", {})
    if d.get("device", "").startswith("cuda"):
        return (f"{d.get('name')}, {d.get('memory_gb')} GB, compute capability {d.get('capability')}, CUDA {d.get('cuda')}; "
                f"torch {d.get('torch')}, transformers {d.get('transformers')}")
    return f"CPU ({d.get('name')}, {d.get('threads')} threads); torch {d.get('torch')}, transformers {d.get('transformers')}"


def render_markdown(report: dict[str, Any]) -> str:
    cfg = report.get("config", {})
    ceil = report.get("ceilings", {})
    model = report.get("model", {})
    params = model.get("params", {})
    lines = [
        "# `cepe bench --train`: the training stages' step at the paper's shapes",
        "",
        f"- Command: `{report.get('command', '')}`",
        f"- Device: {_device_line(report)}",
        f"- Measured ceiling: {ceil.get('matmul_tflops')} TFLOP/s ({ceil.get('matmul_size')}^3 matmul); MFU is taken against it",
        f"- Model (random weights): decoder `{model.get('decoder')}`, encoder `{model.get('encoder')}`, cross-attention in "
        f"{model.get('cross_attention_layers')} layers, attention `{model.get('attn_implementation')}`; trainable "
        f"{_f(params.get('trainable', 0) / 1e9, 4)}B (encoder {_f(params.get('encoder', 0) / 1e9, 4)}B + cross-attention "
        f"{_f(params.get('cross_attention', 0) / 1e9, 4)}B), frozen {_f(params.get('frozen', 0) / 1e9, 4)}B",
        f"- Precision: {report.get('precision')}; AdamW (fused on a GPU) on the trainable parameters only; gradient clipping 1.0",
        f"- Run time {report.get('elapsed_s')} s{'' if report.get('complete') else ' (incomplete)'}",
        "",
        "Model FLOPs per step (pipeline/bench/train_flops.py): the frozen decoder's forward and its activation gradients "
        "only (each frozen linear layer 1x its forward in the backward pass, each self-attention core 2x, the output head 1x; "
        "no weight gradients; nothing below the lowest cross-attention), the encoder and the cross-attention 3x their forward, "
        "the online teacher's forward; causal attention counts the keys each query sees. Checkpointing's recomputation is not "
        "model FLOPs (MFU); HFU adds it. Times per micro-batch, the optimizer step shared by the recipe's accumulation "
        f"(global batch {cfg.get('recipe_batch')} on one GPU).",
        "",
        "## Stages",
        "",
        "| stage | decoder tokens | encoder chunks | teacher tokens |",
        "|---|---|---|---|",
    ]
    for name, s in report.get("stages", {}).items():
        lines.append(f"| {LABELS.get(name, name)} | {s['decoder_tokens']} | {s['n_chunks']} x {s['chunk_len']} | "
                     f"{s.get('teacher_tokens') or '–'} |")
    lines += [
        "",
        "## Step at the largest micro-batch that fits",
        "",
        "| stage | checkpointing | compiled | micro-batch | step (s) | teacher (s) | encoder fwd (s) | decoder fwd + loss (s) | "
        "backward (s) | optimizer (s) | decoder tokens/s | encoder tokens/s | peak (GB) | PFLOP | TFLOP/s | MFU | HFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in report.get("cells", []):
        head = f"| {_label(cell)} | {cell['checkpointing']} | {'yes' if cell.get('compiled') else 'no'} |"
        if cell.get("skipped"):
            lines.append(head + f" skipped ({cell['skipped']}) |" + " |" * 13)
            continue
        if not _usable(cell):
            what = "OOM at micro-batch 1" if cell.get("oom") else f"error: {str(cell.get('error'))[:120]}"
            lines.append(head + f" {cell.get('micro_batch') or 0} | {what} |" + " |" * 12)
            continue
        t = cell["times_s"]
        lines.append(
            head + f" {cell['micro_batch']} | {_f(t['step'], 4)} | {_f(t['teacher'], 3)} | {_f(t['encoder_forward'], 3)} | "
            f"{_f(t['decoder_forward'], 3)} | {_f(t['backward'], 3)} | {_f(t['optimizer'], 3)} | "
            f"{_f(cell['decoder_tokens_per_s'], 4)} | {_f(cell['encoder_tokens_per_s'], 4)} | {_f(cell.get('peak_gb'), 4)} | "
            f"{_f(cell['flops']['total'] / 1e15, 4)} | {_f(cell.get('tflops'), 4)} | {_f(cell.get('mfu'), 3)} | {_f(cell.get('hfu'), 3)} |"
        )
    lines += ["", "## Micro-batch search (one step each: peak GB, or oom)", "",
              "| stage | checkpointing | compiled | tried |", "|---|---|---|---|"]
    for cell in report.get("cells", []):
        if "tried" not in cell:
            continue
        tried = ", ".join(f"{b}: {v if isinstance(v, str) else _f(v.get('peak_gb'), 4) or 'fits'}" for b, v in cell["tried"].items())
        lines.append(f"| {_label(cell)} | {cell['checkpointing']} | {'yes' if cell.get('compiled') else 'no'} | {tried} |")
    recipe = report.get("recipe", {})
    gpus = [str(n) for n in cfg.get("recipe_gpus", [1, 8])]
    lines += ["", "## The paper's recipe at the measured single-GPU rate", "",
              "Hours on N GPUs assume N times the single-GPU rate (no scaling loss); GPU-hours do not depend on N.", "",
              "| stage | steps x batch | decoder + encoder tokens | best cell | " + " | ".join(f"hours on {n}" for n in gpus)
              + " | GPU-hours | paper |",
              "|---|---|---|---|" + "---|" * len(gpus) + "---|---|"]
    for stage, r in recipe.items():
        src = r["from_cell"]
        lines.append(
            f"| {LABELS.get(stage, stage)} | {r['steps']} x {r['batch']} | {r['decoder_tokens'] / 1e9:.3g}B + {r['encoder_tokens'] / 1e9:.3g}B | "
            f"micro-batch {src['micro_batch']}, checkpointing {src['checkpointing']}{', compiled' if src['compiled'] else ''} | "
            + " | ".join(_f(r["hours"].get(n), 4) for n in gpus) + f" | {_f(r['gpu_hours'], 5)} | {r.get('paper', '–')} |"
        )
    fixes = report.get("speed_fixes")
    if fixes:
        lines += ["", f"## Training-path speed fixes (main stage, checkpointing {fixes['checkpointing']})", "",
                  "The frozen decoder's norms (and the cross-attention's) recomputed in the backward pass instead of "
                  "keeping their fp32 intermediates (pipeline/model/cross_attention.py `lean_norm`; same loss and gradients).", "",
                  "| speed fixes | micro-batch | peak at micro-batch 1 (GB) | peak (GB) | micro-step (s) | decoder tokens/s | MFU |",
                  "|---|---|---|---|---|---|---|"]
        for name in ("on", "off"):
            r = fixes[name]
            lines.append(f"| {name} | {r['micro_batch']} | {_f(r['peak_at_1_gb'], 4)} | {_f(r['peak_gb'], 4)} | "
                         f"{_f(r['micro_step_s'], 4)} | {_f(r['decoder_tokens_per_s'], 4)} | {_f(r['mfu'], 3)} |")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for row in report.get("targets", []):
        lines.append(f"| {row['target']} | {_f(row['measured'], 4)} {row['unit']} | {'yes' if row['met'] else 'no'} |")
    if report.get("profile"):
        p = report["profile"]
        lines += ["", f"Profile of one step: `{p.get('file', p.get('error'))}`."]
    for note in report.get("notes", []):
        lines += ["", f"- {note}"]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench_train.json", report)
    atomic_write_text(out / "bench_train.md", render_markdown(report))
