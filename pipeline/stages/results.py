"""`cepe results`: the published numbers of one `dvc repro` run, gathered from its own outputs.

Run after `dvc repro` (on the GPU machine, or wherever the run's `runs/`, `reports/` and
`data/teacher-logits/manifest.json` were copied back). It reads the params file the run used (to
find each stage's output), every training stage's `metrics.json`, the evaluation stages'
`metrics.json`, and the timestamped log `scripts/gpu_repro.sh` writes (`reports/repro.log`: the
command line and each stage's wall time), and writes into `output_dir`:

- `<name>.json` / `<name>.md` (default `pipeline_gpu`): device, command, stage wall times, the
  metrics of every stage (the `dvc metrics show` view), perplexity per length for CEPE and its
  baselines, the warm-up and distillation figures, throughput and MFU, the plots found under
  `plots_dir`;
- `fidelity.json` / `fidelity.md`: context use at 2K (pooled and per source, with intervals),
  perplexity by encoder context, RULER by task and length, warm-up copy loss, the CEPED KL ratio,
  the held-out source, and each target of the recipe as met or missed;
- `training.md`, `distill.md`, `evaluation.md`: the same run, stage by stage.

Nothing here computes a model: every number is copied from a file the run wrote, and a missing
file is an error naming it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import field
from pipeline.errors import CepeError

TRAINING_STAGES = ("pretrain_encoder", "warmup", "train", "distill")
PPL_KEYS = {"cepe": "cepe", "decoder-only": "decoder_only", "full-context": "full_context",
            "other-document": "other_document", "other-source": "other_source"}
# Issue targets for the gpu profile (docs/results/recipe.md): name -> (what, threshold)
TARGETS = {
    "context_use_2k": "context use at 2,048 encoder tokens >= 0.95",
    "heldout_source": "context use on the held-out source >= 0.9",
    "length_generalisation": "CEPE ppl falls strictly with every longer context, and its gain over the "
                             "other-document control at the longest is at least that at 2K",
    "ruler_niah_single": "niah_single_1 and niah_single_2 >= 90 at every length from 4K",
    "ruler_niah_multikey_1": "niah_multikey_1 >= 60 at every length from 4K",
    "warmup_copy_loss": "held-out copy loss <= 0.2",
    "ceped_kl_ratio": "student KL / decoder-alone KL <= 0.4",
}


@dataclass
class ResultsConfig:
    """Settings of `cepe results` (params.yaml section `results`; run by hand after `dvc repro`)."""

    run_params: str = field("params.yaml", help="The params file the run used (it locates every stage's outputs).")
    profile: str = field("gpu", help="The profile's name, for the command line recorded (`cepe use-profile NAME`).")
    log: str = field("reports/repro.log", help="The timestamped `dvc repro` log (scripts/gpu_repro.sh writes it); '' = none.")
    output_dir: str = field("docs/results", help="Where the documents go.")
    name: str = field("pipeline_gpu", help="Base name of the run's summary (<name>.json, <name>.md).")
    plots_dir: str = field("docs/results/plots", help="Folder of the run's PNG plots, listed in <name>.md where present.")
    device: str = field("", help="The device to record ('' = the one the training metrics name).")


# --- reading the run -------------------------------------------------------------------------


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CepeError(f"{path}: missing (run `dvc repro` first, or copy the run's outputs here)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CepeError(f"{path}: not JSON ({exc.msg})") from None


def read_log(path: Path) -> tuple[str | None, dict[str, float]]:
    """(the `dvc repro` command line, {stage: wall seconds}) from a log of `<unix time> <line>`.

    A stage runs from its "Running stage 'X'" line to the next stage's (the last to the log's
    last line); stages DVC skipped ("didn't change") have no time: they did not run.
    """
    if not path.is_file():
        raise CepeError(f"log: {path} is missing (scripts/gpu_repro.sh writes it; set log: '' to go without)")
    command, starts, last = None, [], None
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stamp, _, line = raw.partition(" ")
        if not stamp.isdigit():
            continue
        t = int(stamp)
        last = t
        if line.startswith("$ ") and command is None:
            command = line[2:].strip()
        m = re.search(r"Running stage '([^']+)'", line)
        if m:
            starts.append((m.group(1), t))
    seconds = {}
    for i, (stage, t) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else last
        seconds[stage] = float(end - t)
    return command, seconds


def _pick(d: dict[str, Any] | None, *keys: str) -> Any:
    for k in keys:
        if d is None:
            return None
        d = d.get(k) if isinstance(d, dict) else None
    return d


def collect(config: ResultsConfig) -> dict[str, Any]:
    """Every file of the run the documents quote, keyed by stage."""
    from pipeline.config import read_params

    params = read_params(Path(config.run_params))
    run: dict[str, Any] = {"params": params, "training": {}, "evaluate": {}}
    for stage in TRAINING_STAGES:
        run["training"][stage] = _json(Path(params[stage]["output"]) / "metrics.json")
    for section in ("evaluate_ppl", "evaluate_ppl_long", "evaluate_ruler"):
        out = Path(params[section]["output"])
        run["evaluate"][section] = {"metrics": _json(out / "metrics.json"), "run": _json(out / "run.json")}
    run["command"], run["stage_seconds"] = read_log(Path(config.log)) if config.log else (None, {})
    return run


# --- summaries -------------------------------------------------------------------------------


def _ppl_row(per_len: dict[str, Any]) -> dict[str, Any]:
    return {key: _pick(per_len, variant, "ppl") for variant, key in PPL_KEYS.items()}


def pipeline_summary(run: dict[str, Any], config: ResultsConfig) -> dict[str, Any]:
    """The run's `<name>.json`: the keys the issue lists, then the full metrics of each stage."""
    t, ev = run["training"], run["evaluate"]
    ppl: dict[str, Any] = {}
    for section in ("evaluate_ppl", "evaluate_ppl_long"):
        for length, per_len in (ev[section]["metrics"].get("ppl") or {}).items():
            ppl.setdefault(length, _ppl_row(per_len))
    command = " && ".join(c for c in (f"cepe use-profile {config.profile}", run["command"] or "dvc repro") if c)
    return {
        "device": config.device or t["train"].get("device_name") or t["train"].get("device"),
        "command": command,
        "stage_seconds": run["stage_seconds"],
        "total_seconds": sum(run["stage_seconds"].values()) if run["stage_seconds"] else None,
        "ppl": dict(sorted(ppl.items(), key=lambda kv: int(kv[0]))),
        "warmup_loss_first": t["warmup"].get("loss_first"),
        "warmup_loss_last": t["warmup"].get("loss_last"),
        "train_tokens_per_s": t["train"].get("tokens_per_s"),
        "train_mfu": t["train"].get("mfu"),
        "distill_val_kl_student": t["distill"].get("val_kl_student"),
        "distill_val_kl_decoder_only": t["distill"].get("val_kl_decoder_only"),
        "steps": {s: {"steps": t[s].get("steps"), "max_steps": t[s].get("max_steps"), "stopped_by": t[s].get("stopped_by"),
                      "wall_time_s": t[s].get("wall_time_s")} for s in TRAINING_STAGES},
        "metrics": {**{s: t[s] for s in TRAINING_STAGES}, **{s: ev[s]["metrics"] for s in ev}},
    }


def _strictly_falling(values: list[float | None]) -> bool | None:
    if any(v is None for v in values) or len(values) < 2:
        return None
    return all(b < a for a, b in zip(values, values[1:]))


def fidelity_summary(run: dict[str, Any], config: ResultsConfig) -> dict[str, Any]:
    """`fidelity.json`: what the recipe's targets are judged on, and whether each is met."""
    t, ev = run["training"], run["evaluate"]
    short = ev["evaluate_ppl"]["metrics"]
    length_2k = next(iter(short.get("ppl") or {}), None)
    cu = _pick(short, "context_use", length_2k) or {}
    by_source = {src: {"value": _pick(e, "context_use", "value"), "ci": _pick(e, "context_use", "ci"),
                       "n_windows": _pick(e, "context_use", "n_windows"), "heldout_source": e.get("heldout_source")}
                 for src, e in (_pick(short, "by_source", length_2k) or {}).items()}
    held = [src for src, e in by_source.items() if e["heldout_source"]]
    long = ev["evaluate_ppl_long"]["metrics"].get("ppl") or {}
    by_context = {}
    for length, per_len in sorted(long.items(), key=lambda kv: int(kv[0])):
        enc = _pick(per_len, "cepe", "encoder_tokens")
        by_context[str(enc)] = {"cepe": _pick(per_len, "cepe", "ppl"), "other_document": _pick(per_len, "other-document", "ppl"),
                                "full_context": _pick(per_len, "full-context", "ppl"),
                                "decoder_only": _pick(per_len, "decoder-only", "ppl")}
    ruler: dict[str, dict[str, Any]] = {}
    for length, per_len in (ev["evaluate_ruler"]["metrics"].get("ruler") or {}).items():
        for task, score in per_len.items():
            if task != "average":
                ruler.setdefault(task, {})[length] = score
    kl_s, kl_d = t["distill"].get("val_kl_student"), t["distill"].get("val_kl_decoder_only")
    out: dict[str, Any] = {
        "context_use_2k": {"length": length_2k, "value": cu.get("value"), "ci": cu.get("ci"),
                           "n_windows": cu.get("n_windows"), "by_source": by_source},
        "ppl_by_context": by_context,
        "ruler": ruler,
        "warmup_copy_loss": t["warmup"].get("val_loss"),
        "ceped_kl_ratio": kl_s / kl_d if kl_s is not None and kl_d else None,
        "heldout_source": ({"name": held[0], "context_use": by_source[held[0]]["value"], "ci": by_source[held[0]]["ci"]}
                           if held else None),
        "pairing": _pick(short, "pairing", length_2k),
        "trained_at": {"decoder_tokens": _pick(t["train"], "decoder_len"),
                       "encoder_chunks": run["params"]["prepare"]["n_chunks"],
                       "chunk_len": run["params"]["prepare"]["chunk_len"]},
    }
    out["targets"] = _targets(out)
    return out


def _met(value: Any, ok: bool | None) -> dict[str, Any]:
    return {"value": value, "met": ok}


def _targets(f: dict[str, Any]) -> dict[str, Any]:
    ge = lambda v, x: None if v is None else v >= x  # noqa: E731
    le = lambda v, x: None if v is None else v <= x  # noqa: E731
    ctx = [k for k in f["ppl_by_context"]]
    cepe = [f["ppl_by_context"][k]["cepe"] for k in ctx]
    gains = [None if (r["other_document"] is None or r["cepe"] is None) else r["other_document"] - r["cepe"]
             for r in f["ppl_by_context"].values()]
    falling = _strictly_falling(cepe)
    gain_ok = None if not gains or gains[0] is None or gains[-1] is None else gains[-1] >= gains[0]
    long_ruler = lambda task: [v for k, v in f["ruler"].get(task, {}).items() if int(k) >= 4096]  # noqa: E731
    single = long_ruler("niah_single_1") + long_ruler("niah_single_2")
    multi = long_ruler("niah_multikey_1")
    held = f["heldout_source"] or {}
    res = {
        "context_use_2k": _met(f["context_use_2k"]["value"], ge(f["context_use_2k"]["value"], 0.95)),
        "heldout_source": _met(held.get("context_use"), ge(held.get("context_use"), 0.9)),
        "length_generalisation": _met({"cepe": cepe, "gain_over_other_document": gains},
                                      None if falling is None or gain_ok is None else falling and gain_ok),
        "ruler_niah_single": _met(single, all(v >= 90 for v in single) if single else None),
        "ruler_niah_multikey_1": _met(multi, all(v >= 60 for v in multi) if multi else None),
        "warmup_copy_loss": _met(f["warmup_copy_loss"], le(f["warmup_copy_loss"], 0.2)),
        "ceped_kl_ratio": _met(f["ceped_kl_ratio"], le(f["ceped_kl_ratio"], 0.4)),
    }
    return {k: {"target": TARGETS[k], **v} for k, v in res.items()}


# --- documents -------------------------------------------------------------------------------


def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def _ci(c: Any) -> str:
    return f" [{c[0]:.3f}, {c[1]:.3f}]" if c else ""


def _header(title: str, s: dict[str, Any]) -> list[str]:
    return [f"# {title}", "", f"Device: {s['device']}. Command (from the repository root):", "",
            f"    {s['command']}", ""]


def pipeline_markdown(s: dict[str, Any], plots: list[str]) -> str:
    lines = _header("The gpu profile through `dvc repro`", s)
    lines += ["## Stage wall times", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in s["stage_seconds"].items()]
    if s["total_seconds"] is not None:
        lines.append(f"| **total** | **{s['total_seconds']:.0f}** |")
    lines += ["", "## Training stages", "",
              "| stage | steps (of max) | stopped by | loop s | loss first -> last | val loss | tokens/s | MFU |",
              "|---|---|---|---|---|---|---|---|"]
    for stage, m in ((k, s["metrics"][k]) for k in TRAINING_STAGES):
        lines.append(f"| {stage} | {m.get('steps')} ({m.get('max_steps')}) | {m.get('stopped_by')} | {_f(m.get('wall_time_s'), 0)} "
                     f"| {_f(m.get('loss_first'))} -> {_f(m.get('loss_last'))} | {_f(m.get('val_loss'))} "
                     f"| {_f(m.get('tokens_per_s'), 0)} | {_f(m.get('mfu'))} |")
    lines += ["", "## Perplexity of the last 256 tokens, by total length (encoder + 512 decoder tokens)", "",
              "| total | CEPE | decoder alone | full attention | other document | other source |", "|---|---|---|---|---|---|"]
    for length, row in s["ppl"].items():
        lines.append(f"| {length} | " + " | ".join(_f(row[k]) for k in PPL_KEYS.values()) + " |")
    lines += ["", f"Warm-up loss {_f(s['warmup_loss_first'])} -> {_f(s['warmup_loss_last'])}; main stage "
              f"{_f(s['train_tokens_per_s'], 0)} tokens/s, MFU {_f(s['train_mfu'])}; CEPED held-out KL to the teacher: "
              f"student {_f(s['distill_val_kl_student'])}, decoder alone {_f(s['distill_val_kl_decoder_only'])}.", ""]
    lines += ["## `dvc metrics show`", "", "| file | metric | value |", "|---|---|---|"]
    for stage, m in s["metrics"].items():
        for key, value in m.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                lines.append(f"| {stage} | {key} | {_f(value, 4) if isinstance(value, float) else value} |")
    lines += ["", "(Evaluation metrics nest per length and source: `fidelity.md`, and `<name>.json` in full.)", ""]
    if plots:
        lines += ["## Curves", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def fidelity_markdown(f: dict[str, Any], s: dict[str, Any], title: str = "Does CEPE read its context?") -> str:
    lines = _header(title, s)
    cu = f["context_use_2k"]
    ta = f["trained_at"]
    lines += [f"Trained with {ta['encoder_chunks']} x {ta['chunk_len']} encoder tokens before {ta['decoder_tokens']} decoder tokens; "
              "scored on documents training never saw. Context use = (NLL with another document's context - NLL with "
              "its own) / (NLL of the decoder alone - NLL of full attention over the same window), same-source pairs only.", "",
              "## Targets", "", "| target | value | met |", "|---|---|---|"]
    for t in f["targets"].values():
        lines.append(f"| {t['target']} | {json.dumps(t['value'])} | {'yes' if t['met'] else 'no' if t['met'] is False else '–'} |")
    lines += ["", f"## Context use at {cu['length']} tokens", "",
              f"Pooled: {_f(cu['value'])}{_ci(cu['ci'])} over {cu['n_windows']} windows.", "",
              "| source | context use [95% CI] | windows |", "|---|---|---|"]
    for src, e in cu["by_source"].items():
        mark = " (held out of training)" if e["heldout_source"] else ""
        lines.append(f"| {src}{mark} | {_f(e['value'])}{_ci(e['ci'])} | {e['n_windows']} |")
    lines += ["", "## Perplexity by encoder context (decoder window 512)", "",
              "| encoder tokens | CEPE | other document | full attention | decoder alone |", "|---|---|---|---|---|"]
    for enc, r in f["ppl_by_context"].items():
        lines.append(f"| {enc} | {_f(r['cepe'])} | {_f(r['other_document'])} | {_f(r['full_context'])} | {_f(r['decoder_only'])} |")
    lines += ["", "Full attention only where the window fits the decoder's positions.", "",
              "## RULER, haystack in the encoder (decoder window 512)", ""]
    lengths = sorted({k for v in f["ruler"].values() for k in v}, key=int)
    lines += ["| task | " + " | ".join(lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    lines += [f"| {task} | " + " | ".join(_f(v.get(k), 1) for k in lengths) + " |" for task, v in f["ruler"].items()]
    lines += ["", f"Warm-up held-out copy loss: {_f(f['warmup_copy_loss'])}. CEPED: the student's held-out KL is "
              f"{_f(f['ceped_kl_ratio'])} of the decoder alone's.", ""]
    return "\n".join(lines)


def stage_markdowns(s: dict[str, Any], f: dict[str, Any]) -> dict[str, str]:
    """training.md, distill.md and evaluation.md: the same run, one document per part."""
    m = s["metrics"]
    train = _header("Training: encoder pretraining, warm-up, main stage", s)
    train += ["| stage | steps | stopped by | loss first -> last | held-out | tokens/s (decoder / encoder) | MFU | peak GB |",
              "|---|---|---|---|---|---|---|---|"]
    for stage in ("pretrain_encoder", "warmup", "train"):
        x = m[stage]
        held = f"loss {_f(x.get('val_loss'))}, ppl {_f(x.get('val_ppl'))}"
        train.append(f"| {stage} | {x.get('steps')} | {x.get('stopped_by')} | {_f(x.get('loss_first'))} -> {_f(x.get('loss_last'))} "
                     f"| {held} | {_f(x.get('decoder_tokens_per_s'), 0)} / {_f(x.get('encoder_tokens_per_s'), 0)} "
                     f"| {_f(x.get('mfu'))} | {_f(x.get('peak_memory_gb'), 1)} |")
    train += ["", "MFU: analytic FLOPs (pipeline/train/flops.py) against the device's dense bf16 peak.", ""]
    d = m["distill"]
    distill = _header("CEPED: distillation against the context-reading teacher", s)
    distill += ["| | student | decoder alone |", "|---|---|---|",
                f"| held-out KL to the teacher (top-k) | {_f(d.get('val_kl_student'))} | {_f(d.get('val_kl_decoder_only'))} |",
                f"| held-out ppl | {_f(d.get('val_ppl_student'))} | {_f(d.get('val_ppl_decoder_only'))} |", "",
                f"{d.get('steps')} steps ({d.get('stopped_by')}), loss {_f(d.get('loss_first'))} -> {_f(d.get('loss_last'))}; "
                f"KL ratio {_f(f['ceped_kl_ratio'])}.", ""]
    evaluation = fidelity_markdown(f, s, "Evaluation: perplexity with its controls, length generalisation, RULER")
    return {"training.md": "\n".join(train), "distill.md": "\n".join(distill), "evaluation.md": evaluation}


def run(config: ResultsConfig) -> dict[str, Any]:
    """Write the run's documents; returns {file: path} of what it wrote."""
    from pipeline.evaluate.report import clean_numbers
    from pipeline.io import atomic_write_json, atomic_write_text

    run_data = collect(config)
    summary = clean_numbers(pipeline_summary(run_data, config))
    fidelity = clean_numbers(fidelity_summary(run_data, config))
    fidelity["device"], fidelity["command"] = summary["device"], summary["command"]
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots_dir = Path(config.plots_dir)
    plots = [str(p.relative_to(out)) if p.is_relative_to(out) else str(p)
             for p in sorted(plots_dir.glob("*.png"))] if plots_dir.is_dir() else []
    summary["plots"] = plots
    written = {}
    docs = {f"{config.name}.json": json.dumps(summary, indent=2) + "\n",
            f"{config.name}.md": pipeline_markdown(summary, plots),
            "fidelity.json": json.dumps(fidelity, indent=2) + "\n",
            "fidelity.md": fidelity_markdown(fidelity, summary), **stage_markdowns(summary, fidelity)}
    for name, text in docs.items():
        if name.endswith(".json"):
            atomic_write_json(out / name, json.loads(text))
        else:
            atomic_write_text(out / name, text)
        written[name] = str(out / name)
    return written
