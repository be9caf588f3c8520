"""One runner per task family: load data and model, run, write outputs into a folder.

Called by `pipeline.stages.evaluate.run` with the resolved config, the (temporary) output folder
and the run record; each returns the metrics it wrote to `metrics.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.decoders import is_cepe_model
from pipeline.errors import CepeError
from pipeline.evaluate import adapters, models, report


# --- shared setup ----------------------------------------------------------------------------


def setup_model(config: Any, record: report.RunRecord) -> tuple[Any, Any]:
    if not config.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model = models.load_model(config.model, config.dtype, config.device, config.attn_implementation or None)
    tokenizer = models.load_tokenizer(config.tokenizer or config.model, "tokenizer" if config.tokenizer else "model")
    record.set("model_info", models.describe(model))
    return model, tokenizer


def build_generator(config: Any, model: Any, tokenizer: Any, record: report.RunRecord,
                    truncation: str = "middle") -> adapters.Generator:
    """The input policy the config asks for (auto: cepe for CEPE models) around one model."""
    cepe = is_cepe_model(model)
    policy_name = config.policy if config.policy != "auto" else ("cepe" if cepe else "vanilla")
    if policy_name == "cepe" and not cepe:
        raise CepeError(f"policy: 'cepe' needs a CEPE model; {config.model} is a plain {model.config.model_type} decoder")
    wrap = adapters.make_wrapper(config.chat_wrapper, tokenizer)
    positions = models.max_positions(model) or 4096
    if policy_name == "cepe":
        dec_len = config.decoder_max_len or min(2048, positions)
        policy: Any = adapters.CepePolicy(tokenizer, dec_len, config.chunk_len, config.max_encoder_chunks, wrap)
        record.set("policy", {"name": policy.name, "decoder_max_len": dec_len, "chunk_len": config.chunk_len,
                              "max_encoder_chunks": config.max_encoder_chunks, "chat_wrapper": config.chat_wrapper})
    else:
        # LongBench leaves 596 tokens of a 4K window for the answer (llama2-7b-chat-4k: 3500).
        max_length = config.max_length or max(positions // 2, positions - 596)
        policy = adapters.VanillaPolicy(tokenizer, max_length, wrap, truncation)
        record.set("policy", {"name": policy.name, "max_length": max_length, "truncation": truncation,
                              "chat_wrapper": config.chat_wrapper})
    return adapters.Generator(model, tokenizer, policy, batch_size=config.batch_size, chunk_len=config.chunk_len,
                              do_sample=config.sampling, top_p=config.top_p, temperature=config.temperature,
                              progress=config.progress)


def _seed(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _input_stats(prepared: list[adapters.Prepared]) -> dict[str, Any]:
    return {
        "decoder_tokens_mean": round(sum(len(p.input_ids) for p in prepared) / max(len(prepared), 1), 1),
        "encoder_chunks_mean": round(sum(len(p.encoder_chunks) for p in prepared) / max(len(prepared), 1), 2),
        "examples_truncated": sum(1 for p in prepared if p.dropped_tokens > 0),
    }


# --- ppl -------------------------------------------------------------------------------------


def run_ppl(config: Any, out: Path, record: report.RunRecord) -> dict[str, Any]:
    from pipeline.evaluate import ppl

    items = ppl.PAPER_LENGTHS if config.preset == "paper" else config.lengths
    specs = ppl.parse_lengths(items, config.decoder_len, config.chunk_len, config.eval_window)
    cap = config.limit or config.max_windows
    shard_windows = ppl.is_shard_dir(config.data)
    chunk_len = config.chunk_len
    if shard_windows:  # windows prepared by `cepe prepare-data`: their own single length
        docs, specs, digest, chunk_len = ppl.shard_windows(config.data, config.shard_split, cap, config.seed)
        record.add_data("shards", digest, path=config.data, split=config.shard_split, n_windows=len(docs))
    model, tokenizer = setup_model(config, record)
    if shard_windows:  # the windows' ids must be the evaluated model's (the check every stage makes)
        from pipeline.data.shards import check_tokenizer, read_manifest

        check_tokenizer(read_manifest(config.data).get("tokenizer"), key=str(config.data), tokenizer_dirs=[],
                        vocab_size=getattr(model.config, "vocab_size", None), model="model", tokenizer=tokenizer)
    cepe = is_cepe_model(model)
    variants = ppl.variants_for(cepe, config.baselines)
    positions = models.max_positions(model)
    if not shard_windows:
        docs_raw, digest, files = ppl.read_documents(config.data)
        min_tokens = config.min_doc_tokens or max(s.total for s in specs)
        docs = ppl.tokenize_documents(docs_raw, tokenizer, min_tokens)
        record.add_data("documents", digest, files=files, n_documents=len(docs_raw), n_long_documents=len(docs),
                        min_doc_tokens=min_tokens)
        if not docs:
            raise CepeError(f"data: no document has {min_tokens} tokens or more; lower the lengths or min_doc_tokens")
    _seed(config.seed)
    results: dict[str, dict[str, Any]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    pairing: dict[str, dict[str, Any]] = {}
    rows = []
    heldout: dict[str, bool] = {}
    for doc in docs:
        heldout[doc.source] = heldout.get(doc.source, False) or doc.heldout
    for spec in specs:
        if shard_windows:
            windows = [(i, 0) for i in range(len(docs))]
        else:
            windows = ppl.make_windows(docs, spec.total, config.stride, cap, config.max_windows_per_doc, config.seed,
                                       config.max_windows_per_source)
        if not windows:
            raise CepeError(f"lengths: no window of {spec.total} tokens fits the documents")
        sources = [docs[d].source for d, _ in windows]
        per_len: dict[str, Any] = {}
        nlls_by_variant: dict[str, list[float | None]] = {}
        for variant in variants:
            base = {"encoder_tokens": spec.encoder, "decoder_tokens": spec.decoder}
            if variant == "full-context" and positions is not None and spec.total > positions:
                per_len[variant] = {**base, "ppl": None, "n_windows": 0,
                                    "skipped": f"{spec.total} tokens exceed the decoder's {positions} positions"}
                continue
            if variant in ("cepe",) + ppl.CONTROLS and spec.encoder == 0:
                continue
            scored = list(range(len(windows)))
            context = None
            if variant in ppl.CONTROLS:
                partners, counts = ppl.pair_windows(docs, windows, spec.total, variant, config.seed)
                pairing.setdefault(spec.label, {})[variant] = {"rule": ppl.PAIRING_RULES[variant], "seed": config.seed,
                                                               "pairs": counts}
                scored = [j for j, k in enumerate(partners) if k is not None]
                context = [windows[partners[j]] for j in scored]
                if not scored:
                    per_len[variant] = {**base, "ppl": None, "n_windows": 0, "skipped": "no window has a partner"}
                    continue
            nlls = ppl.score_windows(model, docs, [windows[j] for j in scored], spec,
                                     "cepe" if context is not None else variant, config.eval_window, chunk_len,
                                     config.batch_size, config.progress, context_windows=context)
            mean = sum(nlls) / len(nlls)
            per_len[variant] = {**base, "ppl": round(ppl.perplexity(nlls), 4), "nll": round(mean, 6), "n_windows": len(nlls)}
            column: list[float | None] = [None] * len(windows)
            for n, (j, x) in enumerate(zip(scored, nlls)):
                column[j] = x
                d, s = windows[j]
                row = {"total": spec.total, "decoder": spec.decoder, "variant": variant, "doc_id": docs[d][0],
                       "source": docs[d].source, "start": s, "nll": round(x, 6)}
                if context is not None:
                    row["context_doc_id"], row["context_start"] = docs[context[n][0]][0], context[n][1]
                rows.append(row)
            nlls_by_variant[variant] = column
        results[spec.label] = per_len
        summaries[spec.label] = ppl.summarize(nlls_by_variant, sources, heldout, config.bootstrap_samples, config.seed)
    write_jsonl(out / "windows.jsonl", rows)
    report.write_tsv(out / "ppl_by_length.tsv", ["total_len"] + variants,
                     [[int(label)] + [results[label].get(v, {}).get("ppl") for v in variants] for label in results])
    (out / "table.md").write_text(ppl.markdown_table(results, variants), encoding="utf-8")
    record.set("lengths", [{"total": s.total, "decoder": s.decoder, "encoder": s.encoder} for s in specs])
    metrics = {"ppl": results,
               "differences": {k: v["differences"] for k, v in summaries.items()},
               "context_use": {k: v["context_use"] for k, v in summaries.items()},
               "by_source": {k: v["by_source"] for k, v in summaries.items()},
               "pairing": pairing,
               "heldout_sources": sorted(k for k, v in heldout.items() if v),
               "bootstrap": {"samples": config.bootstrap_samples, "seed": config.seed, "level": 0.95,
                             "context_use": ppl.CONTEXT_USE}}
    return report.write_outputs(out, metrics, record)


# --- LongBench -------------------------------------------------------------------------------


def run_longbench(config: Any, out: Path, record: report.RunRecord) -> dict[str, Any]:
    from pipeline.evaluate import longbench as lb

    e = config.task == "longbench-e"
    if config.predictions:  # score existing files only, exactly as eval.py
        scores = lb.score_directory(config.predictions, e)
        lb.write_result(out / "result.json", scores)
        record.set("predictions", str(config.predictions))
        for path in sorted(Path(config.predictions).glob("*jsonl")):
            record.add_data(path.name, _sha_file(path))
        return report.write_outputs(out, lb.metrics_from_scores(scores, e), record)

    tasks = lb.select_tasks(config.subtasks, e)
    prompts, maxlen = lb.load_config_file("dataset2prompt.json"), lb.load_config_file("dataset2maxlen.json")
    data = lb.LongBenchData(config.data, e)
    loaded = {}
    for task in tasks:  # read (and validate) every task file before loading a model
        examples, digest = data.load(task)
        loaded[task] = examples[: config.limit] if config.limit else examples
        record.add_data(task, digest, n_examples=len(examples), n_used=len(loaded[task]))
    model, tokenizer = setup_model(config, record)
    generator = build_generator(config, model, tokenizer, record)
    _seed(config.seed)
    stats = {}
    for task, examples in loaded.items():
        requests = lb.build_requests(task, examples, prompts, maxlen, config.max_new_tokens)
        preds, prepared = generator.generate(requests, desc=task)
        lb.write_jsonl(out / "pred" / f"{task}.jsonl", lb.prediction_rows(examples, preds))
        stats[task] = _input_stats(prepared)
    record.set("inputs", stats)
    scores = lb.score_directory(out / "pred", e)
    lb.write_result(out / "result.json", scores)
    return report.write_outputs(out, lb.metrics_from_scores(scores, e), record)


# --- ZeroSCROLLS -----------------------------------------------------------------------------


def run_zeroscrolls(config: Any, out: Path, record: report.RunRecord) -> dict[str, Any]:
    from pipeline.evaluate import zeroscrolls as zs

    tasks = zs.select_tasks(config.subtasks)
    loaded = {}
    for task in tasks:
        examples, digest = zs.load_task(config.data, task)
        loaded[task] = examples[: config.limit] if config.limit else examples
        record.add_data(task, digest, n_examples=len(examples), n_used=len(loaded[task]))
    model, tokenizer = setup_model(config, record)
    generator = build_generator(config, model, tokenizer, record, truncation="keep-query")
    _seed(config.seed)
    metrics: dict[str, Any] = {}
    stats = {}
    for task, examples in loaded.items():
        requests = [
            adapters.Request(prompt=ex["input"], max_new_tokens=config.max_new_tokens or zs.MAX_NEW_TOKENS[task],
                             chat=True, query_start=int(ex["query_start_index"]), separator=ex["truncation_seperator"])
            for ex in examples
        ]
        preds, prepared = generator.generate(requests, desc=task)
        per_example = [zs.score_example(task, p, ex["references"]) for p, ex in zip(preds, examples)]
        write_jsonl(out / "pred" / f"{task}.jsonl", [
            {"id": ex["id"], "pred": p, "references": ex["references"], **{k: round(v, 6) for k, v in s.items()}}
            for ex, p, s in zip(examples, preds, per_example)
        ])
        # ZeroSCROLLS's submission format: {id: prediction} per task
        (out / "submission").mkdir(exist_ok=True)
        (out / "submission" / f"{task}.json").write_text(
            json.dumps({ex["id"]: p for ex, p in zip(examples, preds)}, ensure_ascii=False, indent=1), encoding="utf-8")
        metrics[task] = zs.aggregate(task, per_example)
        stats[task] = _input_stats(prepared)
    record.set("inputs", stats)
    average = round(sum(m["score"] for m in metrics.values()) / len(metrics), 2) if metrics else None
    return report.write_outputs(out, {"zeroscrolls": metrics, "average": average}, record)


# --- RULER -----------------------------------------------------------------------------------


def run_ruler(config: Any, out: Path, record: report.RunRecord) -> dict[str, Any]:
    from pipeline.evaluate import ruler

    tasks = ruler.select_tasks(config.subtasks)
    model, tokenizer = setup_model(config, record)
    essay = None
    if any(ruler.TASKS[t].args.get("type_haystack") == "essay" for t in tasks):
        essay = ruler.load_essay_words(config.ruler_haystack)
        record.add_data("ruler_haystack", _sha_words(essay), source=config.ruler_haystack, n_words=len(essay))
    generator = build_generator(config, model, tokenizer, record)
    _seed(config.seed)
    n = config.limit or config.num_samples
    results: dict[str, dict[str, Any]] = {}
    stats = {}
    for length in config.ruler_lengths:
        per_len: dict[str, Any] = {}
        for task in tasks:
            examples = ruler.generate_examples(task, length, n, tokenizer, config.seed, essay)
            requests = [adapters.Request(prompt=ex.input, suffix=ex.answer_prefix, chat=True,
                                         max_new_tokens=config.max_new_tokens or ruler.TASKS[task].tokens_to_generate)
                        for ex in examples]
            raw, prepared = generator.generate(requests, desc=f"ruler {length} {task}")
            preds = [ruler.postprocess(p) for p in raw]
            refs = [ex.outputs for ex in examples]
            per_len[task] = ruler.string_match_all(preds, refs)
            write_jsonl(out / "pred" / f"{length}" / f"{task}.jsonl", [
                {"index": ex.index, "length": ex.tokens, "outputs": ex.outputs, "pred": p,
                 "score": ruler.match_all(p, ex.outputs), "encoder_chunks": len(pp.encoder_chunks),
                 "decoder_tokens": len(pp.input_ids), "dropped_tokens": pp.dropped_tokens}
                for ex, p, pp in zip(examples, preds, prepared)
            ])
            stats[f"{length}/{task}"] = {**_input_stats(prepared), "null_predictions": sum(1 for p in preds if not p)}
        per_len["average"] = round(sum(per_len[t] for t in tasks) / len(tasks), 2)
        results[str(length)] = per_len
    record.set("inputs", stats)
    record.set("lengths", list(config.ruler_lengths))
    report.write_tsv(out / "ruler_by_length.tsv", ["length"] + tasks + ["average"],
                     [[int(k)] + [v[t] for t in tasks] + [v["average"]] for k, v in results.items()])
    return report.write_outputs(out, {"ruler": results}, record)


def _sha_file(path: Path) -> str:
    from pipeline.io import sha256_file

    return sha256_file(path)


def _sha_words(words: list[str]) -> str:
    import hashlib

    return hashlib.sha256(" ".join(words).encode("utf-8")).hexdigest()
