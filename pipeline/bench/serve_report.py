"""`serve.json` and `serve.md` of the serving benchmark (pipeline/bench/serve.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.io import atomic_write_json, atomic_write_text


def _get(report: dict[str, Any], name: str, key: str) -> Any:
    return (report["results"].get(name) or {}).get(key)


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets: cached first token vs full prefill (>= 50x), cold vs full, memory."""
    full = _get(report, "full_attention", "prefill_first_token_s")
    out = {
        "cached_speedup": _ratio(full, _get(report, "cached", "first_token_s")),
        "cold_speedup": _ratio(full, _get(report, "cold", "encode_first_token_s")),
        "kv_over_state": _ratio(_get(report, "memory", "kv_cache_bytes"), _get(report, "memory", "document_state_bytes")),
        "documents_fit": _get(report, "memory", "documents_fit"),
        "kv_caches_fit": _get(report, "memory", "kv_caches_fit"),
    }
    out["cached_target_met"] = None if out["cached_speedup"] is None else out["cached_speedup"] >= 50
    out["memory_target_met"] = None if out["kv_over_state"] is None else out["kv_over_state"] >= 200
    return out


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _state(result: dict[str, Any] | None) -> str | None:
    if not result:
        return "not run"
    for key in ("skipped", "oom", "error"):
        if key in result:
            return f"{key}: {result.get('error') or result[key]}" if key != "skipped" else f"skipped ({result[key]})"
    return None


def render_markdown(report: dict[str, Any]) -> str:
    c, dev, res = report["config"], report["device"], report["results"]
    h = headline(report)
    lines = [
        "# Serving benchmark (`cepe bench-serve`)",
        "",
        f"- Device: {dev.get('name')} ({dev.get('memory_gb', '?')} GB), torch {dev.get('torch')}, "
        f"transformers {dev.get('transformers')}; {c['dtype']}, random weights",
        f"- Shapes: decoder `{c['decoder']}`, encoder `{c['encoder']}`; document {c['document_tokens']} tokens in "
        f"{c['chunk_len']}-token chunks, question {c['question_tokens']} tokens, {c['gen_tokens']} tokens generated "
        f"per client; fast decode {'on' if report.get('fast_decode') else 'off'}",
        f"- Wall time {report.get('wall_s')} s; {'complete' if report.get('complete') else 'incomplete'}",
        "",
        "| measurement | value |",
        "|---|---|",
    ]
    full = res.get("full_attention")
    lines.append(f"| full attention: prefill of document + question to the first token | "
                 f"{_state(full) or _f(full['prefill_first_token_s']) + ' s (peak ' + _f(full.get('peak_gb')) + ' GB)'} |")
    cold = res.get("cold")
    lines.append(f"| CEPE cold: encode the document + first token | "
                 f"{_state(cold) or _f(cold['encode_first_token_s']) + ' s (encoder ' + _f(cold['encode_s']) + ' s)'} |")
    cached = res.get("cached")
    lines.append(f"| CEPE cached document: first token (queued through the worker) | "
                 f"{_state(cached) or _f(cached['first_token_s'] * 1000) + ' ms'} |")
    lines.append(f"| first token, cached vs full attention (target >= 50x) | {_f(h['cached_speedup'])}x |")
    lines.append(f"| first token, cold vs full attention | {_f(h['cold_speedup'])}x |")
    mem = res.get("memory")
    if mem and not _state(mem):
        lines.append(f"| cached document's states / its KV cache (target <= 1/200) | "
                     f"{_size(mem['document_state_bytes'])} / {_size(mem['kv_cache_bytes'])} = "
                     f"1/{_f(h['kv_over_state'])} |")
        if mem.get("documents_fit") is not None:
            lines.append(f"| documents of this size the free memory holds ({_f(mem['free_gb'])} GB free beside "
                         f"{_f(mem['weights_gb'])} GB of weights) | {mem['documents_fit']} (KV caches: "
                         f"{mem['kv_caches_fit']}) |")
    lines += ["", "| clients | generated tokens | seconds | tokens/s | batches | first token median / max (s) |",
              "|---|---|---|---|---|---|"]
    for n in c["clients"]:
        r = res.get(f"clients_{n}")
        if _state(r):
            lines.append(f"| {n} | {_state(r)} | | | | |")
        else:
            lines.append(f"| {n} | {r['tokens']} | {_f(r['seconds'])} | {_f(r['tokens_per_s'])} | {r['batches']} | "
                         f"{_f(r['first_token_s_median'])} / {_f(r['first_token_s_max'])} |")
    lines += ["", "Each client asks about its own cached document; the worker decodes up to "
              f"{max(c['clients'])} requests as one batch (`transformers` generate, dynamic cache, no CUDA graph).", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: str | Path) -> None:
    out = Path(out_dir)
    report["headline"] = headline(report)
    atomic_write_json(out / "serve.json", report)
    atomic_write_text(out / "serve.md", render_markdown(report))
