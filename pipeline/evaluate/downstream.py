"""Runners of the paper's application tasks: `qa`, `icl` and `ralm` (evaluation.md 1.2-1.4).

Like the benchmark runners in `runners.py` (whose model setup and JSONL writer they reuse), each
takes the resolved config, the (temporary) output folder and the run record, writes per-example
JSONL, a TSV by number of passages/demonstrations, `table.md`, `data_errors.txt` when rows were
left out, and returns the metrics it wrote to `metrics.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.decoders import is_cepe_model
from pipeline.devices import resolve_device
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
    index = PassageIndex(config.index, str(resolve_device(config.device)))
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
    docs = ppl.tokenize_documents([(str(i), doc[1]) for i, doc in enumerate(docs_raw)], tokenizer, config.decoder_len)
    doc_ids = [docs_raw[int(doc[0])][0] for doc in docs]
    windows = ppl.make_windows(docs, config.decoder_len, config.stride, config.limit or config.max_windows,
                               config.max_windows_per_doc, config.seed)
    if not windows:
        raise CepeError(f"data: no document has {config.decoder_len} tokens (decoder_len) or more")
    _seed(config.seed)
    queries = ralm.queries_for(docs, windows, config.decoder_len, config.eval_window, tokenizer)
    # top-k per window, none from the window's own document (its doc_key)
    hits = index.search(queries, max(ks), [doc_key(docs_raw[int(docs[d][0])][1]) for d, _ in windows])
    write_jsonl(out / "retrieval.jsonl", [
        {"doc_id": doc_ids[d], "start": s, "query": q,
         "passages": [{"index": h.index, "doc": index.passages[h.index]["doc"], "score": round(h.score, 4)} for h in hs]}
        for (d, s), q, hs in zip(windows, queries, hits)])
    cepe = is_cepe_model(model)
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


# --- qa --------------------------------------------------------------------------------------


def qa_settings(config: Any, cepe: bool) -> list[Any]:
    """The settings a qa run compares: the policy's own, then the baselines (no repeats)."""
    from pipeline.evaluate.qa import Setting

    policy = config.policy if config.policy != "auto" else ("cepe" if cepe else "vanilla")
    if policy == "cepe" and not cepe:
        raise CepeError(f"policy: 'cepe' needs a CEPE model; {config.model} is a plain decoder")
    replug = [Setting("replug", k) for k in config.replug_passages if k > 0]
    own = {"cepe": [Setting("cepe", config.passages_decoder, n) for n in config.passages_encoder],
           "vanilla": [Setting("decoder", config.passages_decoder)], "replug": replug}[policy]
    most = config.passages_decoder + max(config.passages_encoder, default=0)
    extra = {"decoder": [Setting("decoder", config.passages_decoder)], "decoder-fit": [Setting("decoder-fit", most)],
             "replug": replug}
    settings: list[Any] = []
    for s in own + [s for b in config.qa_baselines for s in extra[b]]:
        if s not in settings:
            settings.append(s)
    if not settings:
        raise CepeError("qa: no setting to run (passages_encoder / replug_passages / qa_baselines are empty)")
    return settings


def _qa_inputs(setting: Any, ex: Any, demos: list[str], tokenizer: Any, budget: int, chunk_len: int) -> tuple[Any, int, int]:
    """(Prepared, passages in the decoder, passages in the encoder) of one example in one setting."""
    from pipeline.evaluate import qa
    from pipeline.evaluate.adapters import Prepared

    if setting.policy == "cepe":
        n_dec = qa.fit_passages(tokenizer, [], ex.passages[: setting.decoder_passages], ex.question, budget)
        enc = ex.passages[setting.decoder_passages : setting.decoder_passages + setting.encoder_passages]
        chunks = ([qa.chunk(tokenizer, "\n\n".join(demos), chunk_len)] if demos else []) + \
            [qa.chunk(tokenizer, p.render(), chunk_len) for p in enc]
        ids = qa.encode(tokenizer, qa.decoder_text([], ex.passages[:n_dec], ex.question))
        return Prepared(ids, chunks), n_dec, len(enc)
    n_dec = qa.fit_passages(tokenizer, demos, ex.passages[: setting.decoder_passages], ex.question, budget)
    ids = qa.encode(tokenizer, qa.decoder_text(demos, ex.passages[:n_dec], ex.question))
    return Prepared(ids[-budget:]), n_dec, 0


def run_qa(config: Any, out: Path, record: report.RunRecord) -> dict[str, Any]:
    import random

    from pipeline.evaluate import qa
    from pipeline.evaluate.adapters import Generator, eos_ids

    errors = report.DataErrors()
    data, digest = qa.load_examples(config.data, errors)
    record.add_data("qa", digest, path=config.data, datasets={k: len(v) for k, v in data.items()})
    pools = data
    if config.demo_data:
        demo_sets, demo_digest = qa.load_examples(config.demo_data, errors)
        record.add_data("demos", demo_digest, path=config.demo_data)
        merged = [e for v in demo_sets.values() for e in v]
        pools = {name: demo_sets.get(name, merged) for name in data}
    if not any(data.values()):
        errors.write(out)
        raise CepeError(f"data: no usable qa example in {config.data} ({len(errors.lines)} data errors)")
    model, tokenizer = setup_model(config, record)
    cepe = is_cepe_model(model)
    settings = qa_settings(config, cepe)
    positions = models.max_positions(model) or 4096
    max_new = config.max_new_tokens or qa.MAX_NEW_TOKENS
    budget = (config.max_length or positions) - max_new
    cepe_budget = (config.decoder_max_len or positions) - max_new
    stops = qa.stop_token_ids(tokenizer, eos_ids(model, tokenizer))
    generator = Generator(model, tokenizer, None, batch_size=config.batch_size, chunk_len=config.chunk_len,
                          progress=config.progress)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    _seed(config.seed)
    metrics: dict[str, Any] = {}
    rows = []
    for name, examples in data.items():
        examples = examples[: config.limit] if config.limit else examples
        if not examples:
            continue
        demos = [[qa.demo_text(d) for d in qa.sample_demos(pools[name], ex.question, config.demos,
                                                            random.Random(f"{config.seed}:{name}:{i}"))]
                 for i, ex in enumerate(examples)]
        metrics[name] = {}
        for setting in settings:
            if setting.policy == "replug":
                preds, used = [], []
                for ex, dm in zip(examples, demos):
                    passages = ex.passages[: setting.decoder_passages]
                    prompts = [qa.encode(tokenizer, qa.decoder_text(dm, [p], ex.question))[-budget:] for p in passages]
                    tokens = qa.replug_generate(models.decoder_of(model), prompts, qa.replug_weights(passages, config.replug_temperature),
                                                max_new, stops, pad_id)
                    preds.append(tokenizer.decode(tokens, skip_special_tokens=True))
                    used.append((len(passages), 0, max(len(p) for p in prompts)))
            else:
                b = cepe_budget if setting.policy == "cepe" else budget
                built = [_qa_inputs(setting, ex, dm, tokenizer, b, config.chunk_len) for ex, dm in zip(examples, demos)]
                preds = generator.generate_prepared([p for p, _, _ in built], max_new, stops, desc=f"qa {name} {setting.name}")
                used = [(nd, ne, len(p.input_ids)) for p, nd, ne in built]
            per_example = []
            pred_rows = []
            for ex, raw, (nd, ne, width) in zip(examples, preds, used):
                pred = qa.postprocess(raw)
                s = qa.score(pred, ex.answers)
                per_example.append(s)
                pred_rows.append({"id": ex.id, "question": ex.question, "answers": ex.answers, "pred": pred, **s,
                                  "decoder_passages": nd, "encoder_passages": ne, "decoder_tokens": width})
            write_jsonl(out / "pred" / name / f"{setting.name}.jsonl", pred_rows)
            metrics[name][setting.name] = {**qa.aggregate(per_example), "policy": setting.policy,
                                           "decoder_passages": round(sum(u[0] for u in used) / len(used), 2),
                                           "encoder_passages": round(sum(u[1] for u in used) / len(used), 2)}
            rows.append([name, setting.name, setting.policy, metrics[name][setting.name]["decoder_passages"],
                         metrics[name][setting.name]["encoder_passages"]] +
                        [metrics[name][setting.name][k] for k in ("em", "f1", "substring_em", "n")])
    errors.write(out)
    header = ["dataset", "setting", "policy", "decoder_passages", "encoder_passages", "em", "f1", "substring_em", "n"]
    report.write_tsv(out / "qa_by_passages.tsv", header, rows)
    (out / "table.md").write_text(_markdown(header, rows), encoding="utf-8")
    record.set("qa", {"settings": [s.name for s in settings], "demos": config.demos, "max_new_tokens": max_new,
                      "decoder_budget": budget, "cepe_decoder_budget": cepe_budget})
    return report.write_outputs(out, {"qa": metrics, "data_errors": len(errors.lines)}, record)


def _markdown(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --- icl -------------------------------------------------------------------------------------


def icl_settings(config: Any, cepe: bool) -> list[tuple[str, int, int]]:
    """(name, demonstrations in the decoder, in the encoder): cepe's (CEPE models), then the decoder's."""
    out = [(f"cepe-{config.demos}+{n}", config.demos, n) for n in config.icl_encoder_demos] if cepe else []
    out += [(f"decoder-{n}", n, 0) for n in config.icl_decoder_demos]
    if not out:
        raise CepeError("icl: no setting to run (icl_decoder_demos is empty and the model is not a CEPE model)")
    return list(dict.fromkeys(out))


def run_icl(config: Any, out: Path, record: report.RunRecord) -> dict[str, Any]:
    import random

    import torch

    from pipeline.evaluate import icl
    from pipeline.evaluate.adapters import encoder_tensors

    sets = icl.select_sets(config.subtasks)
    errors = report.DataErrors()
    loaded = {}
    for name in sets:  # read and check every set before loading a model
        train, test, options, digest = icl.load_set(config.data, name, errors)
        n_test = config.limit or icl.TEST_EXAMPLES
        if not train or not test:
            errors.write(out)
            raise CepeError(f"data: {name} has no usable {'train' if not train else 'test'} example ({len(errors.lines)} data errors)")
        loaded[name] = (train, test[:n_test], options)
        record.add_data(name, digest, n_train=len(train), n_test=len(test), n_used=len(test[:n_test]), n_options=len(options))
    if not config.icl_seeds:
        raise CepeError("icl_seeds: at least one seed is required")
    model, tokenizer = setup_model(config, record)
    cepe = is_cepe_model(model)
    settings = icl_settings(config, cepe)
    positions = models.max_positions(model) or 4096
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    metrics: dict[str, Any] = {}
    rows = []
    for name, (train, test, options) in loaded.items():
        spec = icl.SETS[name]
        option_ids = [list(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in options]
        lengths = [len(o) for o in option_ids]
        budget = positions - max(lengths)
        # content-free calibration: each option after the BOS token alone, the plain decoder
        calibration = icl.option_scores(models.decoder_of(model), [bos], option_ids)
        by_class = icl.group_by_class(train)
        metrics[name] = {}
        for setting, n_dec, n_enc in settings:
            per_seed = []
            for seed in config.icl_seeds:
                rng = random.Random(seed)
                hits = {m: 0 for m in icl.METRICS}
                pred_rows = []
                truncated = 0
                for i, item in enumerate(test):
                    demos = icl.sample_demos(by_class, n_dec + n_enc, rng)
                    dec_text = "\n\n".join([spec.render(d.text, options[d.label]) for d in demos[:n_dec]] + [spec.render(item.text)])
                    prefix = list(tokenizer(dec_text, add_special_tokens=True)["input_ids"])
                    if len(prefix) > budget:  # keep the test item: the oldest demonstrations go first
                        prefix, truncated = prefix[:1] + prefix[len(prefix) - budget + 1 :], truncated + 1
                    encoder = None
                    if n_enc:
                        chunks = [list(tokenizer(spec.render(d.text, options[d.label]), add_special_tokens=False)["input_ids"])[: config.chunk_len]
                                  for d in demos[n_dec:]]
                        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
                        enc_ids, enc_mask = encoder_tensors([chunks], config.chunk_len, pad_id, device)  # (1, n, L)
                        with torch.inference_mode():
                            encoder = model.encode(enc_ids, enc_mask)
                    scores = icl.option_scores(model, prefix, option_ids, encoder)
                    picks = icl.predictions(scores, lengths, calibration)
                    for m in icl.METRICS:
                        hits[m] += int(picks[m] == item.label)
                    pred_rows.append({"index": i, "label": options[item.label].strip(),
                                      **{f"pred_{m}": options[picks[m]].strip() for m in icl.METRICS},
                                      "decoder_tokens": len(prefix), "encoder_demos": n_enc})
                write_jsonl(out / "pred" / name / setting / f"seed{seed}.jsonl", pred_rows)
                per_seed.append({m: round(100 * hits[m] / len(test), 2) for m in icl.METRICS} | {"seed": seed, "truncated": truncated})
            mean = {m: round(sum(r[m] for r in per_seed) / len(per_seed), 2) for m in icl.METRICS}
            metrics[name][setting] = {**mean, "decoder_demos": n_dec, "encoder_demos": n_enc, "n": len(test), "seeds": per_seed}
            rows.append([name, setting, n_dec, n_enc] + [mean[m] for m in icl.METRICS] + [len(test)])
    names = [s for s, _, _ in settings]
    average = {s: round(sum(metrics[n][s]["acc_calibrated"] for n in metrics) / len(metrics), 2) for s in names}
    errors.write(out)
    header = ["set", "setting", "decoder_demos", "encoder_demos", *icl.METRICS, "n"]
    report.write_tsv(out / "icl_by_demos.tsv", header, rows)
    (out / "table.md").write_text(_markdown(header, rows), encoding="utf-8")
    record.set("icl", {"sets": sets, "settings": names, "seeds": list(config.icl_seeds), "calibration": "BOS-only prompt"})
    return report.write_outputs(out, {"icl": metrics, "average_acc_calibrated": average, "data_errors": len(errors.lines)}, record)


RUNNERS = {"ralm": run_ralm, "qa": run_qa, "icl": run_icl}
