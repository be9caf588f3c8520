"""Raw text -> filtered, tokenized, windowed Arrow shards: the build behind `cepe prepare-data`
(docs/method.md §3).

Sources are read and interleaved (`sources`), tokenized in a process pool (`tokenize`), each
document assigned to a split by a hash of its text, cut into the configured layouts' windows
(`layouts`), mixed by ratio where several layouts are asked for, written to shards and described
by a manifest (`shards`), all inside a temporary directory that replaces `output` only when
complete. The same inputs and config give the same bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, to_dict
from pipeline.errors import CepeError

# Config keys that cannot change the shards' content (left out of the manifest's params so that
# the manifest, and its sha256 that teacher-logits records, is the same for the same data).
NON_CONTENT_KEYS = ("output", "num_proc")
# Rows a layout may queue in a mix while it is ahead of its share (per split): with the default
# window (2560 int32 = 10 KB) that is 10 MB per queue, whatever the corpus size. Part of the
# content definition (it decides which surplus rows are dropped), so it is a constant here.
MIXER_ROWS = 1024


class _Counter(dict):
    def add(self, key: str, n: int = 1) -> None:
        self[key] = self.get(key, 0) + n


@dataclasses.dataclass
class _SplitStats:
    documents: int = 0
    tokens: int = 0
    rows: int = 0
    domains: dict = dataclasses.field(default_factory=dict)  # domain -> {documents, tokens, rows}
    layouts: dict = dataclasses.field(default_factory=dict)  # layout -> rows

    def domain(self, name: str) -> dict[str, int]:
        return self.domains.setdefault(name, {"documents": 0, "tokens": 0, "rows": 0})


class _SplitAssembler:
    """Documents of one split -> windows of every configured layout -> (mixer) -> writer."""

    def __init__(self, weights, geometry, writer, prevdoc_domains, mixer_capacity) -> None:
        from pipeline.data.layouts import Mixer, WindowStream

        self.weights, self.geometry, self.writer = weights, geometry, writer
        self.prevdoc_domains = set(prevdoc_domains)
        self.mixer = Mixer(weights, mixer_capacity) if len(weights) > 1 else None
        self.streams: dict[tuple[str, str], WindowStream] = {}
        self._make = WindowStream
        self.stats = _SplitStats()
        self.prevdoc_short = 0  # documents that gave no prevdoc window

    def _stream(self, layout: str, domain: str):
        key = (layout, "" if layout == "prevdoc" else domain)
        s = self.streams.get(key)
        if s is None:
            s = self.streams[key] = self._make(*self.geometry.window(layout))
        return s

    def push(self, doc, tokens) -> None:
        st = self.stats
        st.documents += 1
        st.tokens += len(tokens)
        d = st.domain(doc.domain)
        d["documents"] += 1
        d["tokens"] += len(tokens)
        for layout in self.weights:
            if layout == "prevdoc" and self.prevdoc_domains and doc.domain not in self.prevdoc_domains:
                continue
            wins, ids = self._stream(layout, doc.domain).push(tokens, doc.id, reset=(layout == "prevdoc"))
            if layout == "prevdoc" and not len(wins):
                self.prevdoc_short += 1
            dec, enc = self.geometry.split_window(layout, wins)
            for i in range(len(wins)):
                if self.mixer is None:
                    self._write((dec[i], None if enc is None else enc[i], doc.domain, layout, ids[i]))
                else:
                    # A queued row is copied: a view would keep its document's whole window
                    # array alive, and the queue's memory would no longer be capacity x row.
                    row = (dec[i].copy(), None if enc is None else enc[i].copy(), doc.domain, layout, ids[i])
                    for r in self.mixer.push(layout, row):
                        self._write(r)

    def _write(self, row) -> None:
        dec, enc, domain, layout, doc_id = row
        self.writer.add(dec, enc, domain, layout, doc_id)
        self.stats.rows += 1
        self.stats.domain(domain)["rows"] += 1
        self.stats.layouts[layout] = self.stats.layouts.get(layout, 0) + 1

    def finish(self) -> tuple[list[dict[str, Any]], dict[str, int]]:
        if self.mixer is not None:
            self.mixer.finish()
        surplus = dict(self.mixer.surplus) if self.mixer is not None else {}
        return self.writer.close(), surplus


class _DocumentExport:
    """The kept documents of chosen splits, whole, as `documents/<split>.jsonl.gz` in the output
    (gzip without a timestamp, so the same input gives the same bytes)."""

    def __init__(self, root: Path, splits: list[str], heldout: set[str]) -> None:
        import gzip
        import hashlib

        self.heldout = heldout
        self.files: dict[str, Any] = {}
        self.counts = {s: 0 for s in splits}
        self.paths = {s: root / "documents" / f"{s}.jsonl.gz" for s in splits}
        self._hash = hashlib.sha256
        for split, path in self.paths.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            raw = open(path, "wb")
            self.files[split] = (raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0))

    def add(self, split: str, doc: Any) -> None:
        import json

        if split in self.files:
            row = {"id": doc.id, "domain": doc.domain, "text": doc.text, "heldout_source": doc.domain in self.heldout}
            self.files[split][1].write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
            self.counts[split] += 1

    def close(self) -> None:
        for raw, gz in self.files.values():
            gz.close()
            raw.close()
        self.files = {}

    def summary(self) -> dict[str, Any]:
        """{split: {path (relative to the output), documents, sha256}}."""
        return {s: {"path": f"documents/{s}.jsonl.gz", "documents": self.counts[s],
                    "sha256": self._hash(p.read_bytes()).hexdigest()} for s, p in self.paths.items()}


def _in_corpus_dir(spec: str | dict, corpus_dir: str) -> str | dict:
    """A source spec with `{corpus_dir}` replaced by the configured folder."""
    if isinstance(spec, dict):
        return {k: _in_corpus_dir(v, corpus_dir) if k in ("source", "spec", "path") else v for k, v in spec.items()}
    return str(spec).replace("{corpus_dir}", corpus_dir.rstrip("/"))


def _batches(docs, max_chars: int = 1_000_000, max_docs: int = 256):
    """Group documents into tokenizer batches of about `max_chars` characters."""
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if chars >= max_chars or len(batch) >= max_docs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _wanted(doc, domains: set[str]) -> bool:
    return bool(doc.text) and not doc.text.isspace() and (not domains or doc.domain in domains)


def _source_domains(spec) -> set[str]:
    from pipeline.data.corpus import embedded_files

    if spec.kind == "embedded" and not spec.domain:
        return {d for _, _, d in embedded_files(spec.target or None)}
    return {spec.domain}


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (what `kill`, DVC and job schedulers send) unwinds like Ctrl-C, so the temporary
    output is removed and the workers are stopped; the previous handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_shards(config: Any) -> dict[str, Any]:
    """Build the shard directory that a `PrepareConfig` (pipeline/stages/prepare_data.py) describes;
    returns its summary. SIGTERM unwinds as Ctrl-C does and a full disk is one line, so nothing
    is left half-written."""
    from pipeline.io import disk_full_as_error

    with _sigterm_as_interrupt(), disk_full_as_error(config.output_dir()):
        return _build(config)


def empty_split_warnings(config: Any, splits: dict[str, dict[str, Any]], kept_docs: int) -> list[str]:
    """One warning per split that was asked for (fraction > 0) but got no window.

    An empty validation split is not an error (training runs), but it silently leaves
    `val_loss` null in every training stage, so the user is told which split and what to change.
    """
    notes = []
    for split, info in splits.items():
        frac = config.splits.get(split, 0)
        if info["rows"] or not frac:
            continue
        got = f"{info['documents']} of the {kept_docs} documents kept"
        why = (f"{got} fell in it (a document's split is a hash of its text)" if not info["documents"] else
               f"{got} fell in it, too short for one window")
        effect = ("training stages will report val_loss: null" if split == "validation" else
                  f"a stage reading split {split!r} (e.g. evaluate --shard-split {split}) gets no window")
        notes.append(f"split {split!r} of {config.output_dir()} is empty: {why}; {effect}. Give more documents "
                     f"(more sources, a larger max_documents/max_tokens) or a larger splits.{split} (now {frac:g})")
    return notes


def _build(config: Any) -> dict[str, Any]:
    from tqdm import tqdm

    from pipeline.data.layouts import Geometry, assign_split
    from pipeline.data.shards import FORMAT, FORMAT_VERSION, ShardWriter, fingerprint, write_manifest
    from pipeline.data.sources import Skips, check_sources, interleave, parse_source
    from pipeline.data.tokenize import DocumentTokenizer, OrderedPool, load_tokenizer, tokenizer_info
    from pipeline.io import atomic_directory

    started = time.time()
    weights = config.layout_weights()
    specs = [parse_source(_in_corpus_dir(s, config.corpus_dir), config.text_field, config.id_field) for s in config.source]
    check_sources(specs)
    domains = set(config.domains)
    if domains:
        available = set().union(*(_source_domains(s) for s in specs))
        if not domains & available:
            raise ConfigError(f"domains: no source has domain {', '.join(sorted(domains))} (sources give {', '.join(sorted(available))})")
    selected = [i for i, s in enumerate(specs) if not domains or _source_domains(s) & domains]
    heldout = set(config.heldout_sources)
    if heldout:
        available = set().union(*(_source_domains(specs[i]) for i in selected))
        missing = sorted(heldout - available)
        if missing:
            raise ConfigError(f"heldout_sources: no selected source has domain {missing[0]!r} "
                              f"(sources give {', '.join(sorted(available))})")
    tok = load_tokenizer(config.tokenizer)
    tok_info = tokenizer_info(tok, config.tokenizer)

    geometry = Geometry(config.decoder_len, config.n_chunks, config.chunk_len, config.mlm_len)
    is_mlm = "mlm" in weights
    input_width = config.mlm_len if is_mlm else config.decoder_len
    encoder_width = None if is_mlm else geometry.encoder_len
    row_bytes = 4 * (input_width + (encoder_width or 0))
    rows_per_shard = max(1, int(config.shard_size_mb * 2**20) // row_bytes)
    num_proc = config.num_proc or (os.cpu_count() or 1)

    skips = Skips(strict=config.strict)
    drops = _Counter()
    per_source = [_Counter() for _ in specs]
    seen: set[bytes] = set()
    kept_docs = kept_tokens = 0
    stopped_by_budget = False
    out_dir = config.output_dir()

    with atomic_directory(out_dir) as tmp:
        assemblers = {
            split: _SplitAssembler(
                weights, geometry,
                ShardWriter(Path(tmp), split, input_width, encoder_width, rows_per_shard),
                config.prevdoc_domains, mixer_capacity=MIXER_ROWS,
            )
            for split in config.splits
        }
        docs = interleave([specs[i] for i in selected], skips)
        # interleave numbers sources by their position in `selected`; map back for counting.
        index_map = {k: i for k, i in enumerate(selected)}
        docs = (dataclasses.replace(d, source=index_map[d.source]) for d in docs)
        bar = tqdm(desc="prepare-data", unit="doc", disable=None)
        exports = _DocumentExport(Path(tmp), config.export_documents, heldout)
        try:
            with OrderedPool(DocumentTokenizer(tok), num_proc) as pool:
                # Unwanted documents (empty, other domain) travel as "" so that every count is
                # taken here, in input order, and stops exactly where a budget does.
                texts = lambda b: [d.text if _wanted(d, domains) else "" for d in b]  # noqa: E731
                for batch, (hashes, lengths, flat) in pool.imap(_batches(docs), key=texts):
                    offset = 0
                    for doc, h, n in zip(batch, hashes, lengths.tolist()):
                        tokens = flat[offset: offset + n]
                        offset += n
                        src = per_source[doc.source]
                        src.add("read")
                        reason = None
                        if not doc.text or doc.text.isspace():
                            reason = "empty"
                        elif domains and doc.domain not in domains:
                            reason = "domain_not_selected"
                        elif config.dedup and h in seen:
                            reason = "duplicate"
                        elif n < config.min_doc_tokens:
                            reason = "too_short"
                        elif config.max_doc_tokens and n > config.max_doc_tokens:
                            reason = "too_long"
                        if reason:
                            drops.add(reason)
                            src.add("drop:" + reason)
                            continue
                        if config.dedup:
                            seen.add(h)
                        src.add("kept")
                        src.add("tokens", n)
                        kept_docs += 1
                        kept_tokens += n
                        split = "test" if doc.domain in heldout else assign_split(h, config.splits)
                        assemblers[split].push(doc, tokens)
                        exports.add(split, doc)
                        if (config.max_documents and kept_docs >= config.max_documents) or (
                            config.max_tokens and kept_tokens >= config.max_tokens
                        ):
                            stopped_by_budget = True
                            break
                    bar.update(len(batch))
                    if stopped_by_budget:
                        break
        except BaseException:
            for a in assemblers.values():
                a.writer.abort()
            raise
        finally:
            bar.close()
            exports.close()

        if not stopped_by_budget:
            for i in selected:
                if per_source[i].get("kept", 0) == 0:
                    counts = {k[5:]: v for k, v in per_source[i].items() if k.startswith("drop:")}
                    why = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no document read"
                    raise CepeError(f"source {specs[i].spec!r}: no document left after filtering "
                                    f"({per_source[i].get('read', 0)} read; dropped: {why})")

        shards, splits_out, surplus_total = {}, {}, _Counter()
        short_prevdoc = 0
        for split, asm in assemblers.items():
            entries, surplus = asm.finish()
            for k, v in surplus.items():
                surplus_total.add(k, v)
            short_prevdoc += asm.prevdoc_short
            shards[split] = entries
            st = asm.stats
            splits_out[split] = {
                "rows": st.rows, "documents": st.documents, "tokens": st.tokens,
                "layouts": dict(sorted(st.layouts.items())),
                "domains": dict(sorted(st.domains.items())),
                "shards": entries,
            }
        total_rows = sum(s["rows"] for s in splits_out.values())
        if total_rows == 0:
            window = geometry.window(next(iter(weights)))[0]
            raise CepeError(f"no {config.layout} window could be built: {kept_docs} documents with {kept_tokens} tokens "
                            f"kept, a window needs {window} tokens{' inside one document' if 'prevdoc' in weights and len(weights) == 1 else ''}")
        if weights.keys() == {"prevdoc"}:
            drops.add("shorter_than_window", short_prevdoc)
        notes = empty_split_warnings(config, splits_out, kept_docs)

        params = {k: v for k, v in to_dict(config).items() if k not in NON_CONTENT_KEYS}
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "file_format": "arrow-ipc-file",
            "layout": config.layout,
            "layouts": {k: v for k, v in weights.items()},
            "decoder_len": input_width,
            "n_chunks": 0 if is_mlm else config.n_chunks,
            "chunk_len": 0 if is_mlm else config.chunk_len,
            "encoder_len": 0 if is_mlm else geometry.encoder_len,
            "input_width": input_width,
            "encoder_width": encoder_width or 0,
        }
        if is_mlm:
            manifest["mlm_len"] = config.mlm_len
        manifest.update({
            "columns": ["input_ids"] + ([] if is_mlm else ["encoder_input_ids"]) + ["domain", "layout", "doc_id"],
            "rows_per_shard": rows_per_shard,
            "tokenizer": tok_info,
            "documents": {"read": sum(c.get("read", 0) for c in per_source), "kept": kept_docs, "tokens": kept_tokens,
                          "stopped_by_budget": stopped_by_budget},
            "drops": dict(sorted(drops.items())),
            "skipped_lines": dict(sorted(skips.counts.items())),
            "skipped_examples": skips.samples,
            "rows_dropped": {"mix_surplus": dict(sorted(surplus_total.items()))} if len(weights) > 1 else {},
            "prevdoc_documents_without_window": short_prevdoc if "prevdoc" in weights else 0,
            "heldout_sources": sorted(heldout),
            "document_files": exports.summary(),
            "sources": [
                {**s.describe(), "documents_read": per_source[i].get("read", 0), "documents_kept": per_source[i].get("kept", 0),
                 "tokens": per_source[i].get("tokens", 0),
                 "drops": {k[5:]: v for k, v in sorted(per_source[i].items()) if k.startswith("drop:")},
                 "selected": i in selected}
                for i, s in enumerate(specs)
            ],
            "splits": splits_out,
            "params": params,
            "fingerprint": fingerprint(shards),
        })
        write_manifest(tmp, manifest)

    for note in notes:
        print(f"warning: {note}", file=sys.stderr, flush=True)
    elapsed = time.time() - started
    return {
        "output": str(out_dir),
        "layout": config.layout,
        "rows": {s: v["rows"] for s, v in splits_out.items()},
        "documents": manifest["documents"],
        "drops": manifest["drops"],
        "skipped_lines": manifest["skipped_lines"],
        "fingerprint": manifest["fingerprint"],
        "shards": sum(len(v) for v in shards.values()),
        "bytes": sum(e["bytes"] for v in shards.values() for e in v),
        "seconds": round(elapsed, 2),
        "tokens_per_second": round(kept_tokens / elapsed) if elapsed > 0 else None,
        "num_proc": num_proc,
        "warnings": notes,
    }
