"""`cepe prepare-data`: raw text -> filtered, tokenized, windowed Arrow shards (cepe-method.md §3).

One invocation writes one layout (or one mixture of layouts) to one output directory, so each
DVC stage that needs data has its own output. The defaults are the CPU-sized embedded run: the
public-domain corpus and SmolLM2 tokenizer that ship with the package, a 512-token decoder
window with 8 x 256 = 2048 encoder tokens before it (SmolLM2-135M gains most of what context can
give it within ~2K tokens, see offline.md), and the paper's prevdoc:concat = 2:1 mixture.

How the other stages get their data (each line is one DVC stage; `{layout}` in `output` is
replaced by the layout name, so the defaults line up with the other stages' `data:` defaults):

    cepe prepare-data                                       # params `prepare`: mix -> data/shards/mix
    cepe prepare-data --layout prevdoc                      # RP-filter only  -> data/shards/prevdoc
    cepe prepare-data --layout concat                       # RP-cat only     -> data/shards/concat
    cepe prepare-data --layout duplicate --decoder-len 256 --n-chunks 4 --chunk-len 64
                                                            # warm-up (§2.2)  -> data/shards/duplicate
    cepe prepare-data --layout mlm --mlm-len 512            # encoder MLM     -> data/shards/mlm
    cepe prepare-data --section prepare_eval ...            # any other params section, same keys

`--verify DIR` checks a built directory against its manifest instead of building.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config import ConfigError, field, to_dict
from pipeline.errors import CepeError

LAYOUT_CHOICES = ("prevdoc", "concat", "duplicate", "mlm", "mix")
# Config keys that cannot change the shards' content (left out of the manifest's params so that
# the manifest, and its sha256 that teacher-logits records, is the same for the same data).
NON_CONTENT_KEYS = ("output", "num_proc")
# Rows a layout may queue in a mix while it is ahead of its share (per split): with the default
# window (2560 int32 = 10 KB) that is 10 MB per queue, whatever the corpus size. Part of the
# content definition (it decides which surplus rows are dropped), so it is a constant here.
MIXER_ROWS = 1024


@dataclass
class PrepareConfig:
    """Settings of `cepe prepare-data` (params.yaml section `prepare`)."""

    source: list[str | dict] = field(
        default_factory=lambda: ["embedded"],
        help="Source spec SPEC[;key=value...]: embedded[:austen|kjv|abs-guide], a file/dir/glob of "
        ".jsonl/.json/.parquet/.txt (optionally .gz/.zst), or hf:NAME[:CONFIG[:SPLIT]]; keys domain, "
        "weight, text_field, id_field, data_files.",
    )
    corpus_dir: str = field("pipeline/resources/corpus",
                            help="The folder `{corpus_dir}` stands for in a source spec (e.g. {corpus_dir}/perl-doc.jsonl.gz); "
                            "dvc.yaml makes it a dependency of the prepare stages.")
    tokenizer: str = field("embedded", help="Decoder tokenizer: embedded (SmolLM2), a local folder, or a transformers name.")
    layout: Literal["prevdoc", "concat", "duplicate", "mlm", "mix"] = field(
        "mix", help="Example layout: prevdoc, concat, duplicate (warm-up), mlm, or mix (ratios in `mix`)."
    )
    mix: dict = field(default_factory=lambda: {"prevdoc": 2, "concat": 1},
                      help="layout: mix ratios by rows, e.g. {prevdoc: 2, concat: 1} (the paper's 2:1).")
    output: str = field("data/shards/{layout}", help="Output directory; {layout} is replaced by the layout name.")
    decoder_len: int = field(512, help="Decoder tokens per window (D).")
    n_chunks: int = field(8, help="Encoder chunks per window (n).")
    chunk_len: int = field(256, help="Tokens per encoder chunk (L); the encoder gets n x L tokens before the decoder's.")
    mlm_len: int = field(512, help="Tokens per mlm sequence (layout mlm).")
    splits: dict = field(default_factory=lambda: {"train": 0.9, "validation": 0.05, "test": 0.05},
                         help="Split fractions; a document's split comes from a hash of its text.")
    text_field: str = field("text", help="Field/column holding the text (JSON, Parquet, hf); a source's own key wins.")
    id_field: str = field("id", help="Field/column holding a document id (optional; else the line/row number).")
    min_doc_tokens: int = field(0, help="Drop documents shorter than this many tokens (BOS and EOS included); 0: no minimum.")
    max_doc_tokens: int = field(0, help="Drop documents longer than this many tokens; 0: no maximum.")
    dedup: bool = field(True, help="Drop exact duplicate documents (same text), keeping the first.")
    domains: list[str] = field(default_factory=list, help="Keep only these domains (empty: all).")
    prevdoc_domains: list[str] = field(default_factory=list,
                                       help="Domains that feed prevdoc windows in a mix (empty: all); the paper's RP-filter uses arxiv and book.")
    heldout_sources: list[str] = field(default_factory=list,
                                       help="Domains held out of training: every document of theirs goes to the test split "
                                       "(a domain no training window comes from), whatever its hash.")
    export_documents: list[str] = field(default_factory=list,
                                        help="Splits whose kept documents are also written whole to <output>/documents/<split>.jsonl.gz "
                                        "({id, domain, text, heldout_source}): the held-out documents `cepe evaluate --task ppl` reads.")
    max_documents: int = field(0, help="Stop after this many kept documents (0: read everything).")
    max_tokens: int = field(0, help="Stop after this many kept document tokens (0: read everything).")
    shard_size_mb: float = field(64.0, help="Target shard size in MiB (rows per shard = size / row bytes).")
    num_proc: int = field(0, help="Tokenizer worker processes (0: one per CPU core; 1: in-process). Output does not depend on it.")
    strict: bool = field(False, help="Fail on the first bad line instead of counting and skipping it.")

    def __post_init__(self) -> None:
        if not self.source:
            raise ConfigError("source: expected at least one source (e.g. embedded)")
        if not self.corpus_dir and any("{corpus_dir}" in str(s) for s in self.source):
            raise ConfigError("corpus_dir: a source names {corpus_dir} but corpus_dir is empty")
        if not self.tokenizer:
            raise ConfigError("tokenizer: expected a tokenizer name or path (e.g. embedded)")
        for key in ("decoder_len", "n_chunks", "chunk_len", "mlm_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected an integer >= 1, got {getattr(self, key)}")
        for key in ("min_doc_tokens", "max_doc_tokens", "max_documents", "max_tokens", "num_proc"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: expected an integer >= 0, got {getattr(self, key)}")
        if self.max_doc_tokens and self.max_doc_tokens < self.min_doc_tokens:
            raise ConfigError(f"max_doc_tokens: {self.max_doc_tokens} is below min_doc_tokens {self.min_doc_tokens}")
        if not self.shard_size_mb > 0:
            raise ConfigError(f"shard_size_mb: expected a size > 0, got {self.shard_size_mb}")
        if not self.output:
            raise ConfigError("output: expected a directory")
        self._check_splits()
        if self.heldout_sources and "test" not in self.splits:
            raise ConfigError("heldout_sources: the documents of a held-out source go to the test split; splits has no 'test'")
        unknown = [s for s in self.export_documents if s not in self.splits]
        if unknown:
            raise ConfigError(f"export_documents: {unknown[0]!r} is not one of the splits ({', '.join(self.splits)})")
        weights = self.layout_weights()
        if "mlm" in weights and len(weights) > 1:
            raise ConfigError("mix: mlm rows have no encoder column and cannot be mixed with other layouts")
        if "duplicate" in weights and self.n_chunks * self.chunk_len != self.decoder_len:
            raise ConfigError(
                f"n_chunks: duplicate needs n_chunks * chunk_len == decoder_len, got {self.n_chunks} x "
                f"{self.chunk_len} != {self.decoder_len} (the paper's warm-up: decoder_len 256, n_chunks 4, chunk_len 64)"
            )

    def _check_splits(self) -> None:
        if not self.splits:
            raise ConfigError("splits: expected at least one split, e.g. {train: 1.0}")
        for name, frac in self.splits.items():
            if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
                raise ConfigError(f"splits: {name!r} is not a usable split name")
            if not isinstance(frac, (int, float)) or isinstance(frac, bool) or frac < 0:
                raise ConfigError(f"splits.{name}: expected a fraction >= 0, got {frac!r}")
        total = sum(self.splits.values())
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"splits: fractions add up to {total:g}, expected 1")

    def layout_weights(self) -> dict[str, float]:
        """`{layout: weight}`: one entry for a single layout, the mixture for `mix`."""
        from pipeline.data.layouts import LAYOUTS, MIXABLE

        if self.layout != "mix":
            return {self.layout: 1.0}
        if not self.mix:
            raise ConfigError("mix: expected ratios such as {prevdoc: 2, concat: 1}")
        out = {}
        for name in LAYOUTS:  # canonical order: the schedule does not depend on key order
            if name in self.mix:
                w = self.mix[name]
                if not isinstance(w, (int, float)) or isinstance(w, bool) or not w > 0:
                    raise ConfigError(f"mix.{name}: expected a ratio > 0, got {w!r}")
                out[name] = float(w)
        unknown = sorted(set(self.mix) - set(LAYOUTS))
        if unknown:
            raise ConfigError(f"mix: unknown layout {unknown[0]!r} (expected {', '.join(MIXABLE)})")
        return out

    def output_dir(self) -> Path:
        return Path(self.output.replace("{layout}", self.layout))


# --------------------------------------------------------------------------------------------


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


def _in_corpus_dir(spec: str | dict, corpus_dir: str) -> str | dict:
    """A source spec with `{corpus_dir}` replaced by the configured folder."""
    if isinstance(spec, dict):
        return {k: _in_corpus_dir(v, corpus_dir) if k in ("source", "spec", "path") else v for k, v in spec.items()}
    return str(spec).replace("{corpus_dir}", corpus_dir.rstrip("/"))


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


def run(config: PrepareConfig) -> dict[str, Any]:
    """Build the shard directory; returns a summary (the manifest's counts and where it is).

    Raises:
        CepeError: a bad source or file, a tokenizer that cannot be loaded, a source with no
            document left after filtering, or no window at all. Nothing is left at `output` then
            (an existing directory there stays as it was); the same holds for Ctrl-C and SIGTERM.
    """
    with _sigterm_as_interrupt():
        return _run(config)


def _run(config: PrepareConfig) -> dict[str, Any]:
    from tqdm import tqdm

    from pipeline.data.layouts import Geometry, assign_split
    from pipeline.data.shards import FORMAT, FORMAT_VERSION, MANIFEST, ShardWriter, fingerprint
    from pipeline.data.sources import Skips, check_sources, interleave, parse_source
    from pipeline.data.tokenize import DocumentTokenizer, OrderedPool, load_tokenizer, tokenizer_info
    from pipeline.io import atomic_directory, atomic_write_json

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
        atomic_write_json(Path(tmp) / MANIFEST, manifest)

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
    }
