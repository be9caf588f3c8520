"""Runners of the paper's application tasks: `qa`, `icl` and `ralm` (evaluation.md 1.2-1.4).

Like the benchmark runners in `runners.py` (whose model setup and JSONL writer they reuse), each
takes the resolved config, the (temporary) output folder and the run record, writes per-example
JSONL, a TSV by number of passages/demonstrations, `table.md`, `data_errors.txt` when rows were
left out, and returns the metrics it wrote to `metrics.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import CepeError
from pipeline.evaluate import models, report
from pipeline.evaluate.runners import _seed, setup_model, write_jsonl


# --- ralm ------------------------------------------------------------------------------------


def run_ralm(config: Any, out: Path, record: report.RunRecord) -> dict[str, Any]:
    from pipeline.data.tokenize import tokenizer_hash
    from pipeline.evaluate import ppl, ralm
    from pipeline.evaluate.retrieval import PassageIndex, doc_key

    if config.decoder_len <= config.eval_window:
        raise CepeError(f"decoder_len: {config.decoder_len} leaves no query before the last eval_window={config.eval_window} tokens")
    ks = sorted(set(config.ralm_passages))
    if not ks:
        raise CepeError("ralm_passages: at least one number of passages is required")
    docs_raw, digest, files = ppl.read_documents(config.data)
    model, tokenizer = setup_model(config, record)
    index = PassageIndex(config.index, models.resolve_device(config.device))
    manifest = index.manifest
    if manifest["tokenizer"]["sha256"] != tokenizer_hash(tokenizer):
        raise CepeError(f"index: {config.index} was cut with tokenizer {manifest['tokenizer']['name']!r}, not the evaluated "
                        f"model's (rebuild it with `cepe index --tokenizer {config.tokenizer or config.model}`)")
    if index.passage_tokens > config.chunk_len:
        raise CepeError(f"index: its passages have {index.passage_tokens} tokens, more than chunk_len={config.chunk_len}")
    record.add_data("documents", digest, files=files, n_documents=len(docs_raw))
    record.add_data("index", manifest["corpus"]["sha256"], path=config.index, retriever=index.retriever,
                    n_passages=len(index), corpus=manifest["corpus"])
    # documents are numbered (ids need not be unique across files); the number leads back to id and text
    docs = ppl.tokenize_documents([(str(i), text) for i, (_, text) in enumerate(docs_raw)], tokenizer, config.decoder_len)
    doc_ids = [docs_raw[int(n)][0] for n, _ in docs]
    windows = ppl.make_windows(docs, config.decoder_len, config.stride, config.limit or config.max_windows,
                               config.max_windows_per_doc, config.seed)
    if not windows:
        raise CepeError(f"data: no document has {config.decoder_len} tokens (decoder_len) or more")
    _seed(config.seed)
    queries = ralm.queries_for(docs, windows, config.decoder_len, config.eval_window, tokenizer)
    hits = ralm.retrieve(index, queries, max(ks), [doc_key(docs_raw[int(docs[d][0])][1]) for d, _ in windows])
    write_jsonl(out / "retrieval.jsonl", [
        {"doc_id": doc_ids[d], "start": s, "query": q,
         "passages": [{"index": h.index, "doc": index.passages[h.index]["doc"], "score": round(h.score, 4)} for h in hs]}
        for (d, s), q, hs in zip(windows, queries, hits)])
    cepe = models.is_cepe(model)
    variants = (["cepe"] if cepe else []) + ["in-decoder"]
    positions = models.max_positions(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: dict[str, dict[str, Any]] = {}
    rows = []
    decoder_alone = None
    for k in ks:
        per_k: dict[str, Any] = {}
        for variant in variants:
            if k == 0 and decoder_alone is not None:  # k = 0 is the decoder alone in both variants
                per_k[variant] = decoder_alone
                continue
            if variant == "in-decoder" and positions is not None and k * index.passage_tokens + config.decoder_len > positions:
                per_k[variant] = {"ppl": None, "n_windows": 0, "skipped": f"{k} passages + {config.decoder_len} tokens exceed the decoder's {positions} positions"}
                continue
            nlls = ralm.score(model, docs, windows, hits, index, k, variant, config.decoder_len, config.eval_window,
                              config.chunk_len, config.batch_size, pad_id)
            per_k[variant] = ralm.summarize(nlls, k, hits)
            if k == 0:
                decoder_alone = per_k[variant]
            rows.extend({"k": k, "variant": variant, "doc_id": doc_ids[d], "start": s, "nll": round(x, 6)}
                        for (d, s), x in zip(windows, nlls))
        results[str(k)] = per_k
    write_jsonl(out / "windows.jsonl", rows)
    report.write_tsv(out / "ralm_by_passages.tsv", ["passages"] + variants,
                     [[int(k)] + [results[k].get(v, {}).get("ppl") for v in variants] for k in results])
    (out / "table.md").write_text(ralm.markdown_table(results, variants), encoding="utf-8")
    record.set("ralm", {"decoder_len": config.decoder_len, "eval_window": config.eval_window, "query_tokens":
                        config.decoder_len - config.eval_window, "n_windows": len(windows), "passages": ks})
    return report.write_outputs(out, {"ralm": results, "decoder_alone_ppl": decoder_alone["ppl"] if decoder_alone else None}, record)


RUNNERS = {"ralm": run_ralm}
