"""A passage index over a corpus, built once (`cepe index`) and searched by `cepe evaluate --task ralm`.

Passages: every document of the corpus (jsonl(.gz) with a `text` field, read by
`pipeline.evaluate.ppl.read_documents`) is tokenized with the evaluated model's tokenizer (no
special tokens) and cut into consecutive `passage_tokens`-token passages, so that one passage is
one encoder chunk. Retrievers:

- `bm25`: BM25 (Lucene variant) from the `bm25s` package over the passages' text (lower-cased
  word tokens, English stop words removed);
- `dense`: mean-pooled last hidden states of a `transformers` AutoModel the user gives by
  directory (Contriever's recipe), scored by inner product.

The index is a directory of plain files, none of which can run code when read:
`manifest.json` (format, corpus sha256, tokenizer, retriever settings, every file's sha256),
`passages.jsonl` ({doc, doc_key, text} per passage), `tokens.npy` (int32 (n_passages,
passage_tokens), right-padded with -1), and `bm25/` (bm25s's own npy + json files, loaded with
allow_pickle=False) or `embeddings.npy` (float32 (n_passages, dim)).
`doc_key` (sha256 of the document's text, 16 hex) lets a search leave out the passages of the
document a query comes from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import CepeError

FORMAT = "cepe-retrieval-index"
VERSION = 1
RETRIEVERS = ("bm25", "dense")


def doc_key(text: str) -> str:
    """The key that ties a passage to its document: sha256 of the document's text, 16 hex digits."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _bm25s() -> Any:
    try:
        import bm25s
    except ImportError:
        raise CepeError("retriever bm25: the bm25s package is not installed (pip install 'cepe[retrieval]')") from None
    return bm25s


# --- passages --------------------------------------------------------------------------------


def cut_passages(docs: list[tuple[str, str]], tokenizer: Any, passage_tokens: int) -> tuple[list[dict[str, str]], Any]:
    """([{doc, doc_key, text}], int32 array (n, passage_tokens) padded with -1) for documents."""
    import numpy as np

    rows: list[dict[str, str]] = []
    chunks: list[list[int]] = []
    texts = [doc[1] for doc in docs]  # (id, text, ...) rows: ppl.read_documents' Doc or plain pairs
    for start in range(0, len(texts), 256):  # batches: the fast tokenizer runs them in parallel
        encoded = tokenizer(texts[start : start + 256], add_special_tokens=False)["input_ids"]
        for doc, ids in zip(docs[start : start + 256], encoded):
            doc_id, text = doc[0], doc[1]
            key = doc_key(text)
            for i in range(0, len(ids), passage_tokens):
                piece = list(ids[i : i + passage_tokens])
                rows.append({"doc": doc_id, "doc_key": key, "text": tokenizer.decode(piece, skip_special_tokens=True)})
                chunks.append(piece)
    tokens = np.full((len(chunks), passage_tokens), -1, dtype=np.int32)
    for i, piece in enumerate(chunks):
        tokens[i, : len(piece)] = piece
    return rows, tokens


# --- dense encoder ---------------------------------------------------------------------------


class DenseEncoder:
    """Mean-pooled last hidden states of an AutoModel (padding excluded), as Contriever embeds."""

    def __init__(self, path: str, device: str = "cpu", max_length: int = 512, batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path).to(device).eval()
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CepeError(f"dense_model {path!r} cannot be loaded: {first}") from None
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.device, self.max_length, self.batch_size = device, max_length, max(1, batch_size)

    def encode(self, texts: list[str]) -> Any:
        """float32 array (len(texts), hidden)."""
        import numpy as np
        import torch

        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[i : i + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            mask = batch["attention_mask"][..., None].to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H)
            out.append(pooled.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def model_fingerprint(path: str) -> str:
    """sha256 over a model directory's config and weight files (names and bytes)."""
    from pipeline.io import sha256_file

    root = Path(path)
    files = sorted(p for p in root.iterdir() if p.suffix in (".json", ".safetensors", ".bin", ".txt", ".model")) if root.is_dir() else []
    if not files:
        raise CepeError(f"dense_model: {path} is not a model directory")
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode() + b"\0" + sha256_file(p).encode())
    return digest.hexdigest()


# --- building --------------------------------------------------------------------------------


def build_index(out: Path, docs: list[tuple[str, str]], tokenizer: Any, *, passage_tokens: int, retriever: str,
                corpus: dict[str, Any], tokenizer_info: dict[str, Any], dense_model: str = "", device: str = "cpu",
                dense_max_length: int = 512, batch_size: int = 32, k1: float = 1.5, b: float = 0.75) -> dict[str, Any]:
    """Write the index files into `out` (an empty, temporary directory); returns the manifest."""
    import numpy as np

    from pipeline.io import atomic_write_json, atomic_write_text, sha256_file

    if retriever not in RETRIEVERS:
        raise CepeError(f"retriever: expected one of {', '.join(RETRIEVERS)}, got {retriever!r}")
    rows, tokens = cut_passages(docs, tokenizer, passage_tokens)
    if not rows:
        raise CepeError("corpus: no passages (every document is empty)")
    atomic_write_text(out / "passages.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    np.save(out / "tokens.npy", tokens, allow_pickle=False)
    settings: dict[str, Any]
    if retriever == "bm25":
        bm25s = _bm25s()
        corpus_tokens = bm25s.tokenize([r["text"] for r in rows], stopwords="en", show_progress=False)
        model = bm25s.BM25(k1=k1, b=b, method="lucene")
        model.index(corpus_tokens, show_progress=False)
        model.save(str(out / "bm25"), allow_pickle=False, show_progress=False)
        settings = {"method": "lucene", "k1": k1, "b": b, "stopwords": "en", "package": f"bm25s {bm25s.__version__}"}
    else:
        if not dense_model:
            raise CepeError("dense_model: the dense retriever needs an encoder model directory (--dense-model PATH)")
        encoder = DenseEncoder(dense_model, device, dense_max_length, batch_size)
        emb = encoder.encode([r["text"] for r in rows]).astype(np.float32)
        np.save(out / "embeddings.npy", emb, allow_pickle=False)
        settings = {"model": dense_model, "fingerprint": model_fingerprint(dense_model), "pooling": "mean",
                    "score": "inner product", "max_length": dense_max_length, "dim": int(emb.shape[1])}
    files = {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = {
        "format": FORMAT, "version": VERSION, "retriever": retriever, retriever: settings,
        "corpus": corpus, "tokenizer": tokenizer_info, "passage_tokens": passage_tokens,
        "n_passages": len(rows), "n_documents": len({r["doc_key"] for r in rows}), "files": files,
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


# --- loading and searching -------------------------------------------------------------------


@dataclass
class Hit:
    index: int  # passage number in the index
    score: float


class PassageIndex:
    """A built index, verified on load (format, every file's sha256)."""

    def __init__(self, root: str | Path, device: str = "cpu", verify: bool = True):
        import numpy as np

        from pipeline.io import sha256_file

        self.root = Path(root)
        path = self.root / "manifest.json"
        if not path.is_file():
            raise CepeError(f"index: {self.root} is not an index directory (no manifest.json; build one with `cepe index`)")
        try:
            self.manifest = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CepeError(f"index: {path} is not valid JSON ({exc.msg})") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise CepeError(f"index: {path} is not a {FORMAT} v{VERSION} manifest")
        if verify:
            for name, digest in self.manifest["files"].items():
                f = self.root / name
                if not f.is_file() or sha256_file(f) != digest:
                    raise CepeError(f"index: {f} is missing or changed since the index was built (rebuild with `cepe index`)")
        self.retriever = self.manifest["retriever"]
        self.passage_tokens = int(self.manifest["passage_tokens"])
        self.tokens = np.load(self.root / "tokens.npy", allow_pickle=False)
        self.passages = [json.loads(line) for line in (self.root / "passages.jsonl").read_text(encoding="utf-8").splitlines()]
        self.doc_keys = np.array([p["doc_key"] for p in self.passages])
        if self.retriever == "bm25":
            self._bm25 = _bm25s().BM25.load(str(self.root / "bm25"), allow_pickle=False, show_progress=False)
        else:
            settings = self.manifest["dense"]
            if model_fingerprint(settings["model"]) != settings["fingerprint"]:
                raise CepeError(f"index: the dense model {settings['model']} changed since the index was built (rebuild with `cepe index`)")
            self._emb = np.load(self.root / "embeddings.npy", allow_pickle=False)
            self._encoder = DenseEncoder(settings["model"], device, int(settings["max_length"]))

    def __len__(self) -> int:
        return len(self.passages)

    def passage_ids(self, i: int) -> list[int]:
        """Token ids of passage i (padding removed)."""
        row = self.tokens[i]
        return [int(t) for t in row[row >= 0]]

    def search(self, queries: list[str], k: int, exclude_docs: list[str | None] | None = None) -> list[list[Hit]]:
        """Top-k passages per query, best first; `exclude_docs[q]`: a doc_key whose passages query q
        must not get. BM25 returns fewer than k where fewer passages share a term with the query."""
        import numpy as np

        k = min(k, len(self))
        if k <= 0 or not queries:
            return [[] for _ in queries]
        excl = exclude_docs or [None] * len(queries)
        results: list[list[Hit]] = []
        if self.retriever == "dense":
            q = self._encoder.encode(queries)  # (Q, H)
            scores = q @ self._emb.T  # (Q, N)
            for qi in range(len(queries)):
                row = scores[qi].copy()
                if excl[qi] is not None:
                    row[self.doc_keys == excl[qi]] = -np.inf
                top = np.argsort(-row, kind="stable")[:k]
                results.append([Hit(int(i), float(row[i])) for i in top if np.isfinite(row[i])])
            return results
        bm25s = _bm25s()
        for qi, query in enumerate(queries):
            tokens = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)
            mask = None
            if excl[qi] is not None:
                mask = (self.doc_keys != excl[qi]).astype(np.float32)
                if not mask.any():
                    results.append([])
                    continue
            kk = min(k, int(mask.sum()) if mask is not None else k)
            docs, scores = self._bm25.retrieve(tokens, k=kk, show_progress=False, weight_mask=mask)
            # a score of 0 shares no query term: not retrieved (bm25s fills k with arbitrary ones)
            hits = [Hit(int(i), float(s)) for i, s in zip(docs[0], scores[0]) if s > 0]
            results.append(hits)
        return results
