"""A generation session: one loaded model, its document cache, its worker, and the limits.

Everything a request needs prepared before it reaches the engine happens here, so the HTTP
server (app.py), `cepe generate` and the serve benchmark share it: prompt and chat-template
tokenization, the decoder window check, document encoding and caching, assembling a request's
context from cached and inline documents, and the per-request limits. Errors are `CepeError`s
with a `param` (the request field at fault) and a `status` for the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from pipeline.errors import CepeError
from pipeline.serve.documents import Document, DocumentCache, document_id, model_key
from pipeline.serve.engine import Decoding, Engine, Job, Worker


class RequestError(CepeError):
    """A request the session refuses: HTTP `status`, the OpenAI-style `param` and `code`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclass
class Limits:
    """Bounds on what one request, and the server as a whole, may hold."""

    max_tokens: int = 1024  # generated tokens per request
    default_max_tokens: int = 256
    max_context_tokens: int = 131072  # encoder tokens per request (all its documents)
    max_document_tokens: int = 131072  # tokens of one posted document
    cache_bytes: int = 4 << 30  # encoder states kept in device memory
    cache_dir: str = ""  # also keep them as safetensors files here ("" = memory only)
    max_batch: int = 8  # requests decoded together
    max_queue: int = 64  # requests waiting at most
    encoder_chunk_batch: int = 64  # chunks per encoder forward


class Session:
    def __init__(self, serving: Any, limits: Limits, on_finished: Any = None, eos_ids: Sequence[int] | None = None):
        self.serving, self.limits = serving, limits
        self.model, self.tokenizer = serving.model, serving.tokenizer
        self.engine = Engine(self.model, self.tokenizer, serving.chunk_len, serving.decoder_len,
                             encoder_chunk_batch=limits.encoder_chunk_batch or None, eos_ids=eos_ids)
        self.cache = DocumentCache(limits.cache_bytes, limits.cache_dir or None,
                                   model_key(self.model, serving.chunk_len), serving.device, serving.dtype)
        self.worker = Worker(self.engine, limits.max_batch, limits.max_queue, on_finished=on_finished)

    def close(self) -> None:
        self.worker.close()

    # -------------------------------------------------------------- text -> ids
    def text_ids(self, text: str) -> list[int]:
        """Context text as encoder tokens (no BOS/EOS)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, prompt: str) -> list[int]:
        from pipeline.evaluate.adapters import encode

        return encode(self.tokenizer, prompt)

    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The tokenizer's chat template with the generation prompt (BOS not doubled)."""
        from pipeline.evaluate.adapters import encode

        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("messages: this model's tokenizer has no chat template; use /v1/completions",
                               "messages", code="no_chat_template")
        try:
            text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - templates raise on roles they do not accept
            raise RequestError(f"messages: the chat template refused them ({str(exc).splitlines()[0]})",
                               "messages") from None
        return encode(self.tokenizer, text)

    def max_new_tokens(self, requested: int | None) -> int:
        n = self.limits.default_max_tokens if requested is None else int(requested)
        if n < 1:
            raise RequestError(f"max_tokens: expected a positive integer, got {n}", "max_tokens")
        if n > self.limits.max_tokens:
            raise RequestError(f"max_tokens: {n} exceeds this server's limit of {self.limits.max_tokens}",
                               "max_tokens", code="max_tokens_exceeded")
        return n

    def check_window(self, ids: Sequence[int], max_new: int, param: str) -> None:
        window = self.serving.decoder_len
        if len(ids) + max_new > window:
            raise RequestError(
                f"{param}: {len(ids)} prompt tokens + {max_new} new tokens exceed the decoder window of {window}; "
                f"put long text into documents (they go to the encoder)", param, code="context_length_exceeded")

    # -------------------------------------------------------------- documents
    def add_document(self, text: str | None = None, passages: Sequence[str] | None = None) -> tuple[Document, bool]:
        """Encode a document unless cached; (document, whether it was encoded now)."""
        if (text is None) == (passages is None):
            raise RequestError("expected exactly one of text or passages", "text")
        kind, content = ("text", text) if text is not None else ("passages", list(passages or []))
        if kind == "passages" and not content:
            raise RequestError("passages: expected at least one passage", "passages")
        doc_id = document_id(kind, content)
        found, _ = self.cache.get(doc_id)
        if found is not None:
            return found, False
        doc = self.encode_document(doc_id, [content] if kind == "text" else content, kind,
                                   self.limits.max_document_tokens)
        self.cache.put(doc)
        return doc, True

    def encode_document(self, doc_id: str, texts: Sequence[str], param: str, limit: int) -> Document:
        """Texts -> their chunks (each text chunked from its start) -> a Document (not cached)."""
        return self.encode_tokens(doc_id, [self.text_ids(text) for text in texts], param, limit)

    def encode_tokens(self, doc_id: str, parts: Sequence[Sequence[int]], param: str, limit: int) -> Document:
        """Token id lists (each chunked from its start) -> a Document (not cached)."""
        chunks: list[list[int]] = []
        tokens = 0
        for ids in parts:
            tokens += len(ids)
            if tokens > limit:
                raise RequestError(f"{param}: more than {limit} tokens (serve.max_document_tokens / "
                                   f"max_context_tokens)", param, status=413, code="context_length_exceeded")
            chunks.extend(self.engine.chunks(ids))
        if not tokens:
            raise RequestError(f"{param}: the document has no tokens", param)
        hidden = self.serving.encoder_hidden_size
        try:
            self.cache.check_fits(tokens * hidden * torch.finfo(self.serving.dtype).bits // 8)
        except CepeError as exc:
            raise RequestError(str(exc), param, status=413, code="context_length_exceeded") from None
        states = self.engine.encode_chunks(chunks)
        return Document(doc_id, states, tokens, len(chunks))

    def context(self, document_ids: Sequence[str], inline: Sequence[str]) -> torch.Tensor | None:
        """A request's encoder states: its cached documents, then its inline ones, in order."""
        parts: list[torch.Tensor] = []
        tokens = 0
        for i, doc_id in enumerate(document_ids):
            doc, _ = self.cache.get(doc_id)
            if doc is None:
                raise RequestError(f"documents[{i}]: no document {doc_id!r} (never posted, deleted, or evicted "
                                   f"from the cache: post it again)", f"documents[{i}]", status=404,
                                   code="document_not_found")
            parts.append(doc.states)
            tokens += doc.tokens
        for i, text in enumerate(inline):
            doc = self.encode_document("", [text], f"context[{i}]", self.limits.max_context_tokens - tokens)
            parts.append(doc.states)
            tokens += doc.tokens
        if tokens > self.limits.max_context_tokens:
            raise RequestError(f"documents: {tokens} context tokens exceed this server's limit of "
                               f"{self.limits.max_context_tokens}", "documents", status=413,
                               code="context_length_exceeded")
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)  # (S, H_enc)

    # -------------------------------------------------------------- generation
    def job(self, input_ids: list[int], context: torch.Tensor | None, max_new: int, decoding: Decoding,
            on_text: Any = None, stop: Sequence[str] = ()) -> Job:
        return Job(input_ids=input_ids, context=context, max_new_tokens=max_new, decoding=decoding, on_text=on_text,
                   stop=tuple(stop))

    def text(self, job: Job) -> str:
        """A finished job's text, cut before its first stop sequence."""
        return job.final_text(self.tokenizer.decode(list(job.tokens), skip_special_tokens=True))
