"""The serving benchmark (`cepe bench-serve`): documents encoded once, questions asked of them.

Random weights of the `cepe bench` shapes (pipeline/bench/presets.py, sides.py), through the
engine and worker `cepe serve` runs (pipeline/serve/): no HTTP, the same scheduling code.

- full attention: the decoder alone prefills document + question and gives its first token (the
  time a full-attention server spends before answering a question about a document it does not
  hold as a KV cache); measured first, then freed;
- CEPE, cold: the document's chunks encoded, then the question's first token;
- CEPE, cached: the document's states in the session's cache; a question submitted to the worker
  until its first token (what a request naming the document waits);
- memory: bytes of a cached document's states against its KV cache, and how many such
  documents the device's free memory holds beside the model;
- throughput: 1, 8, 32 ... concurrent clients, each with its own cached document, each
  generating `gen_tokens` tokens; the worker batches them (up to the largest client count).
  Each client's document is a copy of one encoded document (same size and cost, encoded once to
  keep the run short).

Writes `serve.json` and `serve.md` into `output_dir`, rewritten after every measurement.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable

import torch

from pipeline.bench import costs
from pipeline.bench.device import GB, Memory, attempt, describe, release
from pipeline.devices import resolve_device, resolve_dtype


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ids(n: int, vocab: int, generator: torch.Generator) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=generator).tolist()


class ServeBench:
    def __init__(self, config: Any, log: Callable[[str], None] | None = None):
        self.config = config
        self.log = log or (lambda msg: print(msg, flush=True))
        self.device = resolve_device(config.device, option="bench_serve.device")
        self.dtype = resolve_dtype(config.dtype, self.device, option="bench_serve.dtype")
        self.memory = Memory(self.device)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.started = time.perf_counter()
        self.report: dict[str, Any] = {"config": dict(vars(config)), "device": describe(self.device), "results": {}}

    # -------------------------------------------------------------- bookkeeping
    def over_budget(self) -> bool:
        budget = self.config.time_budget_s
        return bool(budget) and time.perf_counter() - self.started > budget

    def save(self) -> None:
        from pipeline.bench.serve_report import write_report

        self.report["wall_s"] = round(time.perf_counter() - self.started, 1)
        write_report(self.report, self.config.output_dir)

    def record(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if self.over_budget():
            result = {"skipped": "time_budget_s"}
        else:
            self.log(f"bench-serve: {name} ...")
            result = attempt(fn, keep_going=True)
        self.report["results"][name] = result
        self.save()
        return result

    # -------------------------------------------------------------- full attention
    def full_attention(self, decoder_config: Any) -> dict[str, Any]:
        from pipeline.bench.sides import FullAttention

        c = self.config
        total = c.document_tokens + c.question_tokens
        side = FullAttention(decoder_config, self.device, self.dtype, max_positions=total)
        ids = torch.tensor([_ids(total, side.shape.vocab, self.generator)], device=self.device)
        times = []
        self.memory.reset_peak()
        with torch.inference_mode():
            for i in range(c.warmup + c.repeats):
                _sync(self.device)
                start = time.perf_counter()
                out = side.model(input_ids=ids, use_cache=True, logits_to_keep=1)
                out.logits[:, -1].argmax(-1).tolist()  # the first token, on the host
                seconds = time.perf_counter() - start
                del out
                if i >= c.warmup:
                    times.append(seconds)
        peak = self.memory.peak()
        result = {"tokens": total, "prefill_first_token_s": statistics.median(times), "runs": len(times),
                  "kv_cache_bytes": total * costs.full_bytes_per_token(side.shape, side.dtype_bytes),
                  "peak_gb": None if peak is None else round(peak / GB, 2)}
        del side
        return result

    # -------------------------------------------------------------- CEPE
    def build_session(self, decoder_config: Any, encoder_config: Any) -> Any:
        from pipeline.bench.sides import Cepe
        from pipeline.serve.loading import ServingModel, enable_fast_decode
        from pipeline.serve.session import Limits, Session

        c = self.config
        side = Cepe(decoder_config, encoder_config, self.device, self.dtype,
                    encoder_chunk_batch=c.encoder_chunk_batch or None)
        model = side.model
        model.generation_config.eos_token_id = None  # random ids: every client generates gen_tokens
        fast = bool(c.fast_decode) and self.device.type == "cuda"
        if fast:
            enable_fast_decode(model)
        self.report["fast_decode"] = fast
        serving = ServingModel(model, None, "random weights", c.chunk_len, c.question_tokens + c.gen_tokens, fast)
        free = self.memory.free_and_total()
        cache_bytes = int(free[0] - c.reserve_gb * GB) if free else 1 << 40
        limits = Limits(max_tokens=c.gen_tokens, default_max_tokens=c.gen_tokens,
                        max_context_tokens=c.document_tokens, max_document_tokens=c.document_tokens,
                        cache_bytes=max(cache_bytes, 1), max_batch=max(c.clients), max_queue=max(c.clients) + 1,
                        encoder_chunk_batch=c.encoder_chunk_batch)
        session = Session(serving, limits, eos_ids=[])
        self.vocab = side.shape.vocab
        self.side = side
        return session

    def ask(self, session: Any, contexts: list[torch.Tensor | None], max_new: int) -> list[Any]:
        """Submit one question per context to the worker at once; wait for all."""
        jobs = [session.job(_ids(self.config.question_tokens, self.vocab, self.generator), ctx, max_new,
                            session_decoding()) for ctx in contexts]
        session.worker.submit_many(jobs)  # clients arriving together
        for job in jobs:
            job.done.wait()
            if job.error is not None:
                raise job.error
        return jobs

    def cold(self, session: Any) -> dict[str, Any]:
        """Encode the document, then the question's first token; the states stay cached."""
        c = self.config
        times, encode_times = [], []
        doc = None
        for i in range(c.warmup + c.repeats):
            ids = _ids(c.document_tokens, self.vocab, self.generator)
            _sync(self.device)
            start = time.perf_counter()
            doc = session.encode_tokens(f"doc-{i:032x}", [ids], "document", c.document_tokens)
            _sync(self.device)
            encoded = time.perf_counter()
            self.ask(session, [doc.states], 1)
            end = time.perf_counter()
            if i >= c.warmup:
                times.append(end - start)
                encode_times.append(encoded - start)
        session.cache.put(doc, write=False)
        self.document = doc
        return {"tokens": doc.tokens, "chunks": doc.chunks, "encode_s": statistics.median(encode_times),
                "encode_first_token_s": statistics.median(times), "runs": len(times)}

    def cached(self, session: Any) -> dict[str, Any]:
        c = self.config
        ttfts = []
        for i in range(c.warmup + c.repeats):
            context = session.context([self.document.id], [])
            (job,) = self.ask(session, [context], 1)
            if i >= c.warmup:
                ttfts.append(job.time_to_first_token)
        return {"first_token_s": statistics.median(ttfts), "runs": len(ttfts), "cache_hits": session.cache.hits}

    def memory_use(self, session: Any) -> dict[str, Any]:
        doc = self.document
        kv = doc.tokens * costs.full_bytes_per_token(self.side.shape, self.side.dtype_bytes)
        free = self.memory.free_and_total()
        out = {"document_state_bytes": doc.bytes, "kv_cache_bytes": kv, "state_over_kv": doc.bytes / kv,
               "weights_gb": round(self.side.weight_bytes / GB, 2)}
        if free:
            usable = free[0] - self.config.reserve_gb * GB
            out.update(free_gb=round(free[0] / GB, 2), total_gb=round(free[1] / GB, 2),
                       documents_fit=int(usable // doc.bytes), kv_caches_fit=int(usable // kv))
        return out

    def throughput(self, session: Any, clients: int) -> dict[str, Any]:
        c = self.config
        docs = [self.document] + [copy.copy(self.document) for _ in range(clients - 1)]
        for i, doc in enumerate(docs[1:], 1):  # each client's own document in the cache
            doc.id = f"doc-{clients:08x}{i:024x}"
            doc.states = self.document.states.clone()
            session.cache.put(doc, write=False)
        batches = session.worker.batches
        _sync(self.device)
        start = time.perf_counter()
        jobs = self.ask(session, [session.context([d.id], []) for d in docs], c.gen_tokens)
        seconds = time.perf_counter() - start
        tokens = sum(len(j.tokens) for j in jobs)
        for doc in docs[1:]:
            session.cache.delete(doc.id)
        release()
        ttft = [j.time_to_first_token for j in jobs]
        return {"clients": clients, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                "batches": session.worker.batches - batches, "first_token_s_median": statistics.median(ttft),
                "first_token_s_max": max(ttft)}

    # -------------------------------------------------------------- the run
    def run(self) -> dict[str, Any]:
        from pipeline.bench.presets import decoder_config, encoder_config

        c = self.config
        dconf = decoder_config(c.decoder)
        econf = encoder_config(c.encoder, dconf.vocab_size)
        if c.full_attention:
            self.record("full_attention", lambda: self.full_attention(dconf))
            release()
        session = self.build_session(dconf, copy.deepcopy(econf))
        try:
            self.record("cold", lambda: self.cold(session))
            if "tokens" in self.report["results"]["cold"]:
                self.record("cached", lambda: self.cached(session))
                self.record("memory", lambda: self.memory_use(session))
                for n in c.clients:
                    self.record(f"clients_{n}", lambda n=n: self.throughput(session, n))
        finally:
            session.close()
        self.report["complete"] = all("skipped" not in r and "error" not in r and "oom" not in r
                                      for r in self.report["results"].values())
        self.save()
        return self.report


def session_decoding() -> Any:
    from pipeline.serve.engine import Decoding

    return Decoding()  # greedy, as `cepe bench` decodes


def run_bench_serve(config: Any, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    return ServeBench(config, log).run()


__all__ = ["ServeBench", "run_bench_serve"]
