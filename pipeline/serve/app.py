"""`cepe serve`: an OpenAI-compatible HTTP server around one session (FastAPI + uvicorn).

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (streamed as server-sent events
`data: {...}` ... `data: [DONE]` with `"stream": true`), `POST /v1/documents` (`{"text"}` or
`{"passages"}` -> `{"id"}`), `GET`/`DELETE /v1/documents/{id}`, `GET /v1/models`, `GET /health`,
`GET /metrics` (Prometheus text). A completion names cached documents with `"documents": [id,
...]` and/or carries inline `"context": text | [texts]` (encoded for that request only) beside
its `prompt` / `messages`; the `openai` client sends both through `extra_body`.

Every refusal is a 4xx with `{"error": {"message", "type", "param", "code"}}`; bodies are capped
in bytes before they are parsed; an unexpected failure answers 500 in the same shape and the
server goes on. Generation runs on the session's worker thread; handlers wait on it without
blocking the event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.errors import CepeError
from pipeline.serve.engine import Decoding, Job, QueueFull, next_id
from pipeline.serve.session import RequestError, Session

# ---------------------------------------------------------------------------------------------
# Request bodies (strict types: "5" is not an integer; unknown fields are ignored, as OpenAI's
# clients send some this server has no use for)
# ---------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _Generation(_Body):
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None  # at most 4 non-empty sequences, as OpenAI's API
    documents: list[str] = Field(default_factory=list, max_length=256)
    context: str | list[str] | None = None


class CompletionRequest(_Generation):
    prompt: str | list[str]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)


class DocumentRequest(_Body):
    text: str | None = None
    passages: list[str] | None = Field(None, max_length=65536)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "none"}  # pydantic names a union's member in the location


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location -> the request field, e.g. ("body", "messages", 0, "role") ->
    "messages[0].role"."""
    parts = [str(p) for p in loc[1 if loc and loc[0] == "body" else 0:]]
    parts = [p for p in parts if p not in _TYPE_TAGS and "[" not in p and "-" not in p]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or None


def invalid(exc: ValidationError) -> RequestError:
    """pydantic's first complaint as a 400 naming the field."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return RequestError(f"the body is not valid JSON ({first.get('ctx', {}).get('error', '')})", None,
                            code="invalid_json")
    param = _validation_param(tuple(first.get("loc", ())))
    message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
    value = first.get("input")
    if isinstance(value, (str, int, float, bool)) or value is None:
        message += f" (got {json.dumps(value)[:80]})"
    return RequestError(message, param, code="invalid_value")


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse a request body over `max_bytes` (Content-Length or as it streams)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await self._refuse(send)
        seen = 0

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except BodyTooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(error_body(f"request body over {self.max_bytes} bytes (serve.max_request_bytes)",
                                     code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
class Metrics:
    """Prometheus counters of one server (its own registry, so several apps can live in one process)."""

    def __init__(self, session: Session):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("cepe_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("cepe_prompt_tokens", "Decoder prompt tokens of finished generations", registry=r)
        self.generated = Counter("cepe_generated_tokens", "Tokens generated", registry=r)
        self.context_tokens = Counter("cepe_context_tokens", "Encoder tokens read by finished generations", registry=r)
        self.cache_hits = Gauge("cepe_document_cache_hits", "Document lookups served from the cache", registry=r)
        self.cache_misses = Gauge("cepe_document_cache_misses", "Document lookups the cache did not hold", registry=r)
        self.ttft = Histogram("cepe_time_to_first_token_seconds", "From queueing to the first generated token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.duration = Histogram("cepe_generation_seconds", "From queueing to the last token",
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)
        Gauge("cepe_queue_depth", "Requests waiting for the worker", registry=r).set_function(session.worker.depth)
        Gauge("cepe_document_cache_bytes", "Bytes of cached encoder states", registry=r).set_function(
            lambda: session.cache.bytes)
        Gauge("cepe_documents_cached", "Documents in the memory cache", registry=r).set_function(
            lambda: len(session.cache))
        self.session = session

    def finished(self, job: Job) -> None:
        self.generated.inc(len(job.tokens))
        self.prompt_tokens.inc(len(job.input_ids))
        if job.context is not None:
            self.context_tokens.inc(int(job.context.shape[0]))
        if job.time_to_first_token is not None:
            self.ttft.observe(job.time_to_first_token)
        if job.finished is not None:
            self.duration.observe(job.finished - job.submitted)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        self.cache_hits.set(self.session.cache.hits)
        self.cache_misses.set(self.session.cache.misses)
        return generate_latest(self.registry)


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------
def create_app(session: Session, model_name: str, max_request_bytes: int = 8 << 20) -> Any:
    """The ASGI app (FastAPI, wrapped in the body-size limit) serving `session`."""
    app = FastAPI(title="cepe serve", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(session)
    session.worker.on_finished = metrics.finished
    app.state.session, app.state.metrics = session, metrics

    def refuse(status: int, body: dict[str, Any]) -> JSONResponse:
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError) -> JSONResponse:
        return refuse(exc.status, error_body(str(exc), param=exc.param, code=exc.code))

    @app.exception_handler(QueueFull)
    async def _busy(request: Request, exc: QueueFull) -> JSONResponse:
        return refuse(429, error_body(f"server busy: {exc}; retry later", "rate_limit_error", code="queue_full"))

    @app.exception_handler(CepeError)
    async def _cepe(request: Request, exc: CepeError) -> JSONResponse:
        return refuse(400, error_body(str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return refuse(exc.status_code, error_body(f"{request.method} {request.url.path}: {exc.detail}", kind))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return refuse(500, error_body(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                                      "server_error"))

    @app.middleware("http")
    async def _count(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
        return response

    # ---------------------------------------------------------------- helpers
    async def parse(request: Request, model: type[BaseModel]) -> Any:
        """The body as `model`, whatever the Content-Type says (curl -d sends a form type)."""
        raw = await request.body()
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            raise invalid(exc) from None

    async def in_thread(fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    def stops(body: _Generation) -> list[str]:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise RequestError("stop: expected at most 4 non-empty strings", "stop")
        return stop

    def decoding(body: _Generation) -> Decoding:
        if body.temperature == 0:
            return Decoding()
        return Decoding(do_sample=True, temperature=body.temperature, top_p=body.top_p, seed=body.seed)

    def inline(body: _Generation) -> list[str]:
        if body.context is None:
            return []
        return [body.context] if isinstance(body.context, str) else list(body.context)

    async def prepare(body: _Generation, ids: list[int], param: str) -> Job:
        requested = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        max_new = session.max_new_tokens(requested)
        session.check_window(ids, max_new, param)
        stop, how = stops(body), decoding(body)
        context = await in_thread(session.context, body.documents, inline(body))
        return session.job(ids, context, max_new, how, stop=stop)

    async def run(job: Job, stream: bool, chunk: Any, final: Any, first: Any = None) -> Any:
        """Submit `job`; answer with the whole result, or as server-sent events if streaming."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        job.on_text = lambda text: loop.call_soon_threadsafe(events.put_nowait, ("text", text))
        session.worker.submit(job)

        async def wait_done() -> None:
            await asyncio.to_thread(job.done.wait)
            events.put_nowait(("done", None))

        waiter = asyncio.create_task(wait_done())
        if not stream:
            try:
                await waiter
            except asyncio.CancelledError:
                job.cancelled = True
                raise
            if job.error is not None:
                raise job.error
            return JSONResponse(final(job, session.text(job)))

        async def sse() -> Any:
            try:
                if first is not None:
                    yield f"data: {json.dumps(first())}\n\n"
                while True:
                    kind, value = await events.get()
                    if kind == "done":
                        break
                    yield f"data: {json.dumps(chunk(value))}\n\n"
                if job.error is not None:
                    yield f"data: {json.dumps(error_body(f'generation failed: {job.error}', 'server_error'))}\n\n"
                else:
                    yield f"data: {json.dumps(chunk(None, job))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = not job.done.is_set()

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def usage(job: Job) -> dict[str, int]:
        return {"prompt_tokens": len(job.input_ids), "completion_tokens": len(job.tokens),
                "total_tokens": len(job.input_ids) + len(job.tokens),
                "context_tokens": 0 if job.context is None else int(job.context.shape[0])}

    # ---------------------------------------------------------------- routes
    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await parse(request, CompletionRequest)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise RequestError("prompt: expected one prompt (a string or a list of one)", "prompt")
        job = await prepare(body, session.prompt_ids(prompts[0]), "prompt")
        rid, created = next_id("cmpl"), int(time.time())

        def base() -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name}

        def chunk(text: str | None, done: Job | None = None) -> dict[str, Any]:
            choice = {"index": 0, "text": text or "", "logprobs": None,
                      "finish_reason": done.finish_reason if done else None}
            out = {**base(), "choices": [choice]}
            if done is not None:
                out["usage"] = usage(done)
            return out

        def final(done: Job, text: str) -> dict[str, Any]:
            return {**base(), "choices": [{"index": 0, "text": text, "logprobs": None,
                                           "finish_reason": done.finish_reason}], "usage": usage(done)}

        return await run(job, body.stream, chunk, final)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await parse(request, ChatRequest)
        ids = session.chat_ids([m.as_dict() for m in body.messages])
        job = await prepare(body, ids, "messages")
        rid, created = next_id("chatcmpl"), int(time.time())

        def base() -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}

        def first() -> dict[str, Any]:
            return {**base(), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None}]}

        def chunk(text: str | None, done: Job | None = None) -> dict[str, Any]:
            delta = {} if done is not None else {"content": text}
            out = {**base(), "choices": [{"index": 0, "delta": delta,
                                          "finish_reason": done.finish_reason if done else None}]}
            if done is not None:
                out["usage"] = usage(done)
            return out

        def final(done: Job, text: str) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": done.finish_reason}], "usage": usage(done)}

        return await run(job, body.stream, chunk, final, first)

    @app.post("/v1/documents")
    async def add_document(request: Request) -> Any:
        body = await parse(request, DocumentRequest)
        doc, created = await in_thread(session.add_document, body.text, body.passages)
        out = doc.describe("memory")
        out["created"] = created
        return JSONResponse(out, status_code=201 if created else 200)

    @app.get("/v1/documents/{doc_id}")
    async def get_document(doc_id: str) -> Any:
        doc, where = await in_thread(lambda: session.cache.get(doc_id, count=False))
        if doc is None:
            raise RequestError(f"no document {doc_id!r}", "id", status=404, code="document_not_found")
        return doc.describe(where)

    @app.delete("/v1/documents/{doc_id}")
    async def delete_document(doc_id: str) -> Any:
        if not await in_thread(session.cache.delete, doc_id):
            raise RequestError(f"no document {doc_id!r}", "id", status=404, code="document_not_found")
        return {"id": doc_id, "object": "document", "deleted": True}

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "cepe"}]}

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok", "model": model_name, "queue": session.worker.depth(),
                "documents": len(session.cache), "cache_bytes": session.cache.bytes,
                "chunk_len": session.serving.chunk_len, "decoder_len": session.serving.decoder_len}

    @app.get("/metrics")
    async def prometheus() -> Any:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return BodyLimit(app, max_request_bytes)
