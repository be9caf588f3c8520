"""`cepe prepare-data`: raw text -> filtered, tokenized, windowed Arrow shards (docs/method.md §3).

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

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config import ConfigError, field

LAYOUT_CHOICES = ("prevdoc", "concat", "duplicate", "mlm", "mix")
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


def run(config: PrepareConfig) -> dict[str, Any]:
    """Build the shard directory; returns a summary (the manifest's counts and where it is).

    Raises:
        CepeError: a bad source or file, a tokenizer that cannot be loaded, a source with no
            document left after filtering, no window at all, or a full disk. Nothing is left at `output` then
            (an existing directory there stays as it was); the same holds for Ctrl-C and SIGTERM.
    """
    from pipeline.data.build import build_shards

    return build_shards(config)
