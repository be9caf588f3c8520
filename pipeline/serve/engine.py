"""Generation for `cepe generate`, `cepe serve` and the serve benchmark: one engine, one worker.

A request becomes a `Job`: decoder prompt ids, the encoder states of its context (S, H_enc), how
many tokens to generate and how (greedy or sampled). The `Engine` runs a list of compatible jobs
as one batched `generate()` (prompts left-padded, contexts padded to the longest with a key
mask), hands every new token of every row to that job as it is produced, and stops each row at
its own token limit. Context is encoded by `encode_chunks`, whose states are stored without the
padding of short chunks: the states of several documents concatenate into exactly what encoding
their chunks together would give (every chunk is encoded independently of the others).

The `Worker` is the queue in front of the engine: one thread owns the model; requests wait in a
bounded queue; each turn takes up to `max_batch` waiting jobs that can share a batch (same
decoding settings, context or not) and runs them together. Document encoding takes the same lock,
so nothing else touches the model while it generates.
"""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from pipeline.errors import CepeError


@dataclass(frozen=True)
class Decoding:
    """How tokens are chosen; jobs batch together only when these are equal."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


class QueueFull(CepeError):
    """The worker's queue holds `max_queue` jobs already."""


@dataclass
class Job:
    """One generation request and, once done, its result.

    input_ids: the decoder prompt; context: (S, H_enc) encoder states on the model's device, or
    None; on_token(token_id) / on_text(delta) are called from the worker thread as tokens come.
    """

    input_ids: list[int]
    context: torch.Tensor | None
    max_new_tokens: int
    decoding: Decoding = Decoding()
    on_token: Callable[[int], None] | None = None
    on_text: Callable[[str], None] | None = None
    stop: tuple[str, ...] = ()  # stop sequences: generation ends where the text first contains one
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (end of sequence) or "length"
    error: BaseException | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    first_token: float | None = None
    finished: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _text: Any = None  # the TextSink of this job (when on_text is set)
    _stop_filter: Any = None

    def final_text(self, text: str) -> str:
        """The generated text cut before the first stop sequence (OpenAI's `stop`)."""
        cut = [text.find(s) for s in self.stop if s and s in text]
        return text[: min(cut)] if cut else text

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.submitted

    def batch_key(self) -> tuple[Any, ...]:
        return (self.decoding, self.context is not None)


def _text_sink(tokenizer: Any, emit: Callable[[str], None]) -> Any:
    """transformers' `TextStreamer` for one row, passing finalized text on instead of printing."""
    from transformers import TextStreamer

    class TextSink(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                emit(text)

    return TextSink(tokenizer, skip_prompt=False, skip_special_tokens=True)


class _StopFilter:
    """Passes streamed text on, holding back the last characters that could begin a stop
    sequence, and nothing from the first stop sequence on."""

    def __init__(self, emit: Callable[[str], None], stop: Sequence[str]):
        self.emit, self.stop = emit, [s for s in stop if s]
        self.hold = max(len(s) for s in self.stop) - 1
        self.buffer, self.stopped = "", False

    def __call__(self, text: str) -> None:
        if self.stopped:
            return
        self.buffer += text
        cut = [self.buffer.find(s) for s in self.stop if s in self.buffer]
        if cut:
            self.stopped = True
            out, self.buffer = self.buffer[: min(cut)], ""
        else:
            keep = len(self.buffer) - self.hold
            out, self.buffer = self.buffer[:keep], self.buffer[keep:]
        if out:
            self.emit(out)

    def end(self) -> None:
        if not self.stopped and self.buffer:
            self.emit(self.buffer)
        self.buffer = ""


class _Rows:
    """Streamer (transformers' `put`/`end` protocol) and per-row stopping criterion of a batch.

    `put` gets the prompt first ((B, T), skipped), then each step's (B,) tokens; rows already
    finished (their limit, an end-of-sequence token, a cancelled client) are ignored. `__call__`
    is the stopping criterion: a (B,) bool, True where the row is finished.
    """

    def __init__(self, jobs: Sequence[Job], eos: set[int], tokenizer: Any = None):
        self.jobs, self.eos, self.tokenizer = list(jobs), eos, tokenizer
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        now = time.perf_counter()
        for job, token in zip(self.jobs, value.reshape(len(self.jobs), -1)[:, -1].tolist()):
            if job.finish_reason is not None:
                continue
            if job.cancelled:
                job.finish_reason = "cancelled"
                continue
            if job.first_token is None:
                job.first_token = now
            if token in self.eos:
                job.finish_reason = "stop"
                continue
            job.tokens.append(int(token))
            if job.on_token is not None:
                job.on_token(int(token))
            if job._text is not None:
                job._text.put(torch.tensor([int(token)]))
            if job.stop and self.tokenizer is not None:
                text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
                if job.final_text(text) != text:
                    job.finish_reason = "stop"
                    continue
            if len(job.tokens) >= job.max_new_tokens:
                job.finish_reason = "length"

    def end(self) -> None:
        pass

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        done = [job.finish_reason is not None or job.cancelled for job in self.jobs]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _stopping(rows: _Rows) -> Any:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class PerRow(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
            return rows(input_ids, scores)

    return StoppingCriteriaList([PerRow()])


class Engine:
    """The model calls: encode context chunks, generate a batch of jobs. Thread-safe by `lock`."""

    def __init__(self, model: Any, tokenizer: Any, chunk_len: int, decoder_len: int,
                 encoder_chunk_batch: int | None = None, eos_ids: Sequence[int] | None = None,
                 pad_id: int | None = None):
        from pipeline.evaluate.adapters import eos_ids as model_eos_ids

        self.model, self.tokenizer = model, tokenizer
        self.chunk_len, self.decoder_len = int(chunk_len), int(decoder_len)
        if encoder_chunk_batch:
            model.config.encoder_chunk_batch_size = int(encoder_chunk_batch)
        if eos_ids is None:
            eos_ids = model_eos_ids(model, tokenizer)
        self.eos = [int(i) for i in eos_ids]  # [] = no end-of-sequence token (the benchmark's random ids)
        if pad_id is None:
            pad_id = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad_id if pad_id is not None else (self.eos[0] if self.eos else 0))
        self.lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -------------------------------------------------------------- context
    def chunks(self, ids: Sequence[int]) -> list[list[int]]:
        """Token ids in chunks of `chunk_len` from the start (only the last may be short)."""
        return [list(ids[i : i + self.chunk_len]) for i in range(0, len(ids), self.chunk_len)]

    @torch.inference_mode()
    def encode_chunks(self, chunks: Sequence[Sequence[int]]) -> torch.Tensor:
        """Chunk id lists -> their encoder states (S, H_enc), S = the chunks' real tokens.

        The padding of short chunks is dropped (`states[mask]`), not carried as a mask: cross-
        attention over the remaining states is the masked attention over all of them.
        """
        from pipeline.evaluate.adapters import encoder_tensors

        chunks = [c for c in chunks if len(c)]
        if not chunks:
            hidden = self.model.config.encoder_config.hidden_size
            return torch.empty(0, hidden, device=self.device, dtype=next(self.model.parameters()).dtype)
        if any(len(c) > self.chunk_len for c in chunks):
            self.model.check_chunk_len(max(len(c) for c in chunks))
        ids, mask = encoder_tensors([list(chunks)], self.chunk_len, self.pad_id, self.device)  # (1, n, L)
        self.model.check_chunk_len(ids.shape[-1])
        with self.lock:
            states, key_mask = self.model.encode(ids, mask)  # (1, n*L, H_enc), (1, n*L)
        return states[0][key_mask[0]].contiguous()  # (S, H_enc)

    # -------------------------------------------------------------- generation
    @torch.inference_mode()
    def run_batch(self, jobs: Sequence[Job]) -> None:
        """Generate every job of one batch (same `batch_key`); results are written into the jobs."""
        if not jobs:
            return
        if len({job.batch_key() for job in jobs}) != 1:
            raise ValueError("run_batch: jobs of one batch must share decoding settings and context presence")
        device = self.device
        now = time.perf_counter()
        for job in jobs:
            job.started = now
            if job.on_text is not None and self.tokenizer is not None:
                emit = job.on_text
                if job.stop:
                    job._stop_filter = emit = _StopFilter(job.on_text, job.stop)
                job._text = _text_sink(self.tokenizer, emit)
        width = max(len(job.input_ids) for job in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for b, job in enumerate(jobs):  # left padding: every row's last prompt token is at the end
            ids[b, width - len(job.input_ids):] = torch.tensor(job.input_ids, dtype=torch.long)
            mask[b, width - len(job.input_ids):] = 1
        decoding = jobs[0].decoding
        rows = _Rows(jobs, set(self.eos), self.tokenizer)
        kwargs: dict[str, Any] = dict(
            input_ids=ids.to(device), attention_mask=mask.to(device),
            max_new_tokens=max(job.max_new_tokens for job in jobs), num_beams=1, do_sample=decoding.do_sample,
            pad_token_id=self.pad_id, eos_token_id=self.eos or None, use_cache=True, streamer=rows,
            stopping_criteria=_stopping(rows),
        )
        if decoding.do_sample:
            kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=None)
            if decoding.seed is not None:
                torch.manual_seed(decoding.seed)
        else:  # silence sampling settings a model's generation_config may carry
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if jobs[0].context is not None:
            kwargs.update(self._context_batch([job.context for job in jobs]))
        try:
            with self.lock:
                self.model.generate(**kwargs)
        finally:
            end = time.perf_counter()
            for job in jobs:
                if job._text is not None:
                    job._text.end()
                if job._stop_filter is not None:
                    job._stop_filter.end()
                if job.finish_reason is None:
                    job.finish_reason = "length"
                job.finished = end

    def _context_batch(self, contexts: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """(S_b, H) states per row -> `encoder_hidden_states` (B, S_max, H) and, when lengths
        differ, `encoder_padding_mask` (B, S_max), True for real states."""
        longest = max(c.shape[0] for c in contexts)
        if all(c.shape[0] == longest for c in contexts):
            return {"encoder_hidden_states": torch.stack(list(contexts))}
        first = contexts[0]
        states = first.new_zeros(len(contexts), longest, first.shape[-1])
        key_mask = torch.zeros(len(contexts), longest, dtype=torch.bool, device=first.device)
        for b, c in enumerate(contexts):
            states[b, : c.shape[0]] = c
            key_mask[b, : c.shape[0]] = True
        return {"encoder_hidden_states": states, "encoder_padding_mask": key_mask}


class Worker:
    """One thread that runs queued jobs through the engine, up to `max_batch` at a time.

    `submit` never blocks: a full queue raises `QueueFull` (the server answers 429). Jobs that
    cannot share the current batch stay queued, in order, for the next turn.
    """

    def __init__(self, engine: Engine, max_batch: int = 8, max_queue: int = 64,
                 on_finished: Callable[[Job], None] | None = None):
        self.engine, self.max_batch, self.max_queue = engine, max(1, int(max_batch)), max(1, int(max_queue))
        self.on_finished = on_finished
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="cepe-generate", daemon=True)
        self.batches = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self._thread.start()

    def depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def submit(self, job: Job) -> Job:
        self.submit_many([job])
        return job

    def submit_many(self, jobs: Sequence[Job]) -> None:
        """Queue jobs that arrive together (all or none), so one turn can batch them."""
        with self._cond:
            if self._stop:
                raise CepeError("the generation worker has stopped")
            if len(self._pending) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting already (max_queue {self.max_queue})")
            now = time.perf_counter()
            for job in jobs:
                job.submitted = now
                self._pending.append(job)
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._stop:
                self._cond.wait()
            if self._stop and not self._pending:
                return None
            first = self._pending.popleft()
            batch, rest = [first], collections.deque()
            while self._pending:
                job = self._pending.popleft()
                if len(batch) < self.max_batch and job.batch_key() == first.batch_key():
                    batch.append(job)
                else:
                    rest.append(job)
            self._pending = rest
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            live = [job for job in batch if not job.cancelled]
            try:
                if live:
                    self.batches += 1
                    self.batch_sizes[len(live)] += 1
                    self.engine.run_batch(live)
            except BaseException as exc:  # noqa: BLE001 - a failed batch fails its jobs, not the worker
                for job in live:
                    job.error = exc
            for job in batch:
                if job.cancelled and job.finish_reason is None:
                    job.finish_reason = "cancelled"
                job.done.set()
                if self.on_finished is not None:
                    try:
                        self.on_finished(job)
                    except Exception:  # noqa: BLE001 - metrics must not stop the worker
                        pass


_ids = itertools.count()


def next_id(prefix: str) -> str:
    """Response ids: unique within the process, e.g. cmpl-1a2b3c-7."""
    return f"{prefix}-{_PROCESS:x}-{next(_ids)}"


_PROCESS = int(time.time() * 1000) & 0xFFFFFF
