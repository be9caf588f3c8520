"""Documents encoded once: their encoder states, cached by content hash.

A document is a text (chunked from its start in `chunk_len`-token chunks) or a list of passages
(each passage chunked on its own, the retrieval case). Its id is a hash of that content, so the
same document posted twice is encoded once. States live on the model's device in an LRU bounded
in bytes; with a directory they are also written as safetensors files (tensor "states" and
string metadata only: reading one runs no code) and read back on a miss, e.g. after a restart.
Files are keyed by the model as well, so states of another model are never served.
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import CepeError

ID_PREFIX = "doc-"


def document_id(kind: str, content: str | list[str]) -> str:
    """`doc-<sha256 of the content>[:32]`; `kind` is "text" or "passages"."""
    payload = json.dumps([kind, content], ensure_ascii=False, separators=(",", ":"))
    return ID_PREFIX + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def model_key(model: Any, chunk_len: int) -> str:
    """What the states of a document depend on besides its text: the encoder's weights (sampled,
    pipeline/train/teacher.py's fingerprint), its config, and the chunk length."""
    from pipeline.train.teacher import weights_fingerprint

    h = hashlib.sha256()
    h.update(weights_fingerprint(model.encoder, skip=()).encode())
    h.update(json.dumps(model.config.encoder_config.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(int(chunk_len)).encode())
    return h.hexdigest()[:16]


@dataclass
class Document:
    id: str
    states: torch.Tensor  # (S, H_enc) on the model's device
    tokens: int
    chunks: int

    @property
    def bytes(self) -> int:
        return self.states.numel() * self.states.element_size()

    def describe(self, where: str) -> dict[str, Any]:
        return {"id": self.id, "object": "document", "tokens": self.tokens, "chunks": self.chunks,
                "bytes": self.bytes, "cached": where}


class DocumentCache:
    """LRU of `Document`s bounded by `max_bytes` of states, optionally backed by `directory`."""

    def __init__(self, max_bytes: int, directory: str | None, key: str, device: torch.device, dtype: torch.dtype):
        self.max_bytes, self.key, self.device, self.dtype = int(max_bytes), key, device, dtype
        self.directory = Path(directory) / key if directory else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self._docs: collections.OrderedDict[str, Document] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._docs)

    def _path(self, doc_id: str) -> Path | None:
        if self.directory is None or not doc_id.startswith(ID_PREFIX) or not doc_id[len(ID_PREFIX):].isalnum():
            return None  # ids are hex: nothing else reaches the file system
        return self.directory / f"{doc_id}.safetensors"

    def check_fits(self, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            raise CepeError(f"document: its states take {nbytes} bytes, more than the cache's "
                            f"{self.max_bytes} (serve.cache_gb)")

    def put(self, doc: Document, write: bool = True) -> None:
        """Insert (most recent), evicting the least recently used until it fits; write its file
        (replacing one that could not be read back)."""
        self.check_fits(doc.bytes)
        with self._lock:
            old = self._docs.pop(doc.id, None)
            if old is not None:
                self.bytes -= old.bytes
            while self._docs and self.bytes + doc.bytes > self.max_bytes:
                _, evicted = self._docs.popitem(last=False)
                self.bytes -= evicted.bytes
                self.evictions += 1
            self._docs[doc.id] = doc
            self.bytes += doc.bytes
        path = self._path(doc.id)
        if path is not None and write:
            self._write(path, doc)

    def get(self, doc_id: str, count: bool = True) -> tuple[Document | None, str]:
        """(document, "memory" | "disk") or (None, "") when neither holds it."""
        with self._lock:
            doc = self._docs.get(doc_id)
            if doc is not None:
                self._docs.move_to_end(doc_id)
                self.hits += count
                return doc, "memory"
        path = self._path(doc_id)
        if path is not None and path.is_file():
            doc = self._read(path, doc_id)
            if doc is not None:
                self.put(doc, write=False)
                self.hits += count
                return doc, "disk"
        self.misses += count
        return None, ""

    def delete(self, doc_id: str) -> bool:
        """Drop a document from memory and from the directory; False if it was in neither."""
        found = False
        with self._lock:
            doc = self._docs.pop(doc_id, None)
            if doc is not None:
                self.bytes -= doc.bytes
                found = True
        path = self._path(doc_id)
        if path is not None and path.is_file():
            path.unlink()
            found = True
        return found

    def _write(self, path: Path, doc: Document) -> None:
        from safetensors.torch import save

        from pipeline.io import atomic_write_bytes

        meta = {"id": doc.id, "model_key": self.key, "tokens": str(doc.tokens), "chunks": str(doc.chunks)}
        atomic_write_bytes(path, save({"states": doc.states.detach().to("cpu").contiguous()}, metadata=meta))

    def _read(self, path: Path, doc_id: str) -> Document | None:
        """A cached file, or None (and the file left alone) if it is not this model's or is damaged."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                states = fh.get_tensor("states")
        except Exception:  # noqa: BLE001 - a damaged file is a miss; the document is encoded again
            return None
        if meta.get("id") != doc_id or meta.get("model_key") != self.key or states.dim() != 2:
            return None
        return Document(doc_id, states.to(self.device, self.dtype), int(meta.get("tokens", 0)),
                        int(meta.get("chunks", 0)))
