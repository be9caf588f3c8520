"""`cepe index`: the passage index that retrieval-augmented evaluation searches, built once.

The corpus (jsonl(.gz) documents with a `text` field: a file, a folder of them, or `embedded`) is
cut into `passage_tokens`-token passages with the evaluated model's tokenizer (one passage = one
encoder chunk) and indexed with BM25 (`bm25s`) or, given an encoder model directory, a dense
mean-pooled retriever. The output directory holds plain files only (pipeline/evaluate/retrieval.py
describes them) with the corpus sha256 and every file's sha256 in `manifest.json`;
`cepe evaluate --task ralm` refuses an index that changed or was cut with another tokenizer. The
directory is replaced only when the build completes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config import ConfigError, field


@dataclass
class IndexConfig:
    corpus: str = field("embedded", help="documents to index: a jsonl(.gz) file, a folder of them, or 'embedded'")
    output: str = field("data/index", help="index directory to write")
    tokenizer: str = field("models/decoder", help="tokenizer that cuts the passages (the evaluated model's)")
    passage_tokens: int = field(256, help="tokens per passage (= the encoder's chunk length)")
    retriever: Literal["bm25", "dense"] = field("bm25", help="bm25 (bm25s, Lucene BM25) | dense (mean-pooled encoder, inner product)")
    bm25_k1: float = field(1.5, help="bm25: term-frequency saturation k1")
    bm25_b: float = field(0.75, help="bm25: length normalisation b")
    dense_model: str = field("", help="dense: encoder model directory loadable by AutoModel (e.g. a local Contriever)")
    dense_max_length: int = field(512, help="dense: truncate passages and queries to this many encoder tokens")
    batch_size: int = field(32, help="dense: passages per encoder forward")
    device: str = field("auto", help="dense: auto | cpu | cuda | cuda:N")

    def __post_init__(self) -> None:
        for name in ("passage_tokens", "dense_max_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.bm25_k1 < 0 or not 0 <= self.bm25_b <= 1:
            raise ConfigError(f"bm25_k1 / bm25_b: expected k1 >= 0 and 0 <= b <= 1, got {self.bm25_k1} / {self.bm25_b}")
        if self.retriever == "dense" and not self.dense_model:
            raise ConfigError("dense_model: retriever 'dense' needs an encoder model directory")
        if not self.output:
            raise ConfigError("output: an index directory is required")


def run(config: IndexConfig) -> dict[str, Any]:
    """Build the index; returns what it wrote (passages, documents, seconds)."""
    from pipeline.data.tokenize import tokenizer_info
    from pipeline.devices import resolve_device
    from pipeline.evaluate import models, ppl, retrieval
    from pipeline.io import atomic_directory

    start = time.time()
    docs, digest, files = ppl.read_documents(config.corpus)
    tokenizer = models.load_tokenizer(config.tokenizer)
    corpus = {"source": config.corpus, "sha256": digest, "files": files, "n_documents": len(docs)}
    with atomic_directory(config.output) as tmp:
        manifest = retrieval.build_index(
            tmp, docs, tokenizer, passage_tokens=config.passage_tokens, retriever=config.retriever, corpus=corpus,
            tokenizer_info=tokenizer_info(tokenizer, config.tokenizer), dense_model=config.dense_model,
            device=str(resolve_device(config.device)), dense_max_length=config.dense_max_length,
            batch_size=config.batch_size, k1=config.bm25_k1, b=config.bm25_b)
    return {"retriever": config.retriever, "n_passages": manifest["n_passages"], "n_documents": manifest["n_documents"],
            "corpus_sha256": digest, "output": config.output, "seconds": round(time.time() - start, 1)}
