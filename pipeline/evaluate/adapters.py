"""Model adapters: how a long prompt becomes model inputs, and batched greedy generation.

evaluation.md 2.6 asks for one adapter interface with two input policies:

- `vanilla` (plain decoders, and the decoder-alone baseline of a CEPE model): the whole prompt
  goes into the decoder; if it is longer than `max_length` tokens it is cut in the middle
  exactly as LongBench's `pred.py` does (decode the first and last `max_length // 2` tokens,
  concatenate the two texts with no separator, re-tokenize), or, for ZeroSCROLLS, the document
  is cut on the right and the query kept (`truncation="keep-query"`).
- `cepe` (`cepe-concat-truncate-left`, CEPE's own policy for CEPED): the decoder keeps the last
  `decoder_max_len - max_new_tokens` tokens of the prompt (the end of the context plus the
  instruction/question); the tokens before them overflow into the encoder as `chunk_len`-token
  chunks, left-truncated to the `max_encoder_chunks` chunks nearest the decoder part.

Chat wrappers (`[INST]...[/INST]` for Llama-2-chat, or the tokenizer's own chat template) are
applied AFTER truncation, to the decoder's text only, as LongBench does.

Generation is batched (left padding, one attention mask), greedy unless sampling is asked for,
uses the KV cache, and passes the encoder chunks to `generate()`, which runs the encoder once per
example (the CEPE model's contract).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from pipeline.errors import CepeError

CHAT_WRAPPERS = ("none", "llama2", "template")


def make_wrapper(kind: str, tokenizer: Any) -> Callable[[str], str]:
    """The chat wrapper LongBench's `build_chat` would apply, by kind.

    - none: the prompt as is (base models);
    - llama2: exactly `f"[INST]{prompt}[/INST]"`, no spaces, no system prompt (pred.py);
    - template: the tokenizer's chat template with one user turn and the generation prompt.
    """
    if kind == "none":
        return lambda prompt: prompt
    if kind == "llama2":
        return lambda prompt: f"[INST]{prompt}[/INST]"
    if kind == "template":
        if not getattr(tokenizer, "chat_template", None):
            raise CepeError("chat_wrapper: 'template' needs a tokenizer with a chat template; this one has none")

        def wrap(prompt: str) -> str:
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )

        return wrap
    raise CepeError(f"chat_wrapper: expected one of {', '.join(CHAT_WRAPPERS)}, got {kind!r}")


def encode(tokenizer: Any, text: str, special: bool = True) -> list[int]:
    """Token ids of `text`; special tokens (BOS) added unless the text already starts with BOS
    (a chat template that writes `<s>` itself must not get a second one)."""
    bos = getattr(tokenizer, "bos_token", None)
    if special and bos and text.startswith(bos):
        special = False
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


@dataclass
class Prepared:
    """Model inputs for one prompt.

    input_ids: the decoder prompt (with BOS when the tokenizer adds one).
    encoder_chunks: token-id lists of at most `chunk_len` each, oldest first; [] when none.
    prompt_tokens: tokens of the untruncated prompt (no special tokens).
    dropped_tokens: prompt tokens that reached neither the decoder nor the encoder.
    """

    input_ids: list[int]
    encoder_chunks: list[list[int]] = field(default_factory=list)
    prompt_tokens: int = 0
    dropped_tokens: int = 0


@dataclass
class Request:
    """One generation request: the prompt text and how to decode it."""

    prompt: str
    max_new_tokens: int
    chat: bool = True  # apply the chat wrapper (LongBench skips it for few-shot and code tasks)
    stop_on_newline: bool = False  # samsum: eos_token_id=[eos, id("\n")] and at least 1 new token
    query_start: int | None = None  # ZeroSCROLLS: where the query begins in `prompt`
    separator: str = ""  # ZeroSCROLLS: text inserted where the document was cut
    suffix: str = ""  # appended after the chat wrapper, never truncated (RULER's answer prefix)


class VanillaPolicy:
    """Everything in the decoder; middle truncation (LongBench) or keep-query truncation."""

    name = "vanilla"

    def __init__(self, tokenizer: Any, max_length: int, wrap: Callable[[str], str], truncation: str = "middle"):
        if max_length < 2:
            raise CepeError(f"max_length: expected at least 2 tokens, got {max_length}")
        self.tokenizer, self.max_length, self.wrap, self.truncation = tokenizer, max_length, wrap, truncation

    def prepare(self, request: Request) -> Prepared:
        tok = self.tokenizer
        ids = encode(tok, request.prompt)  # measured WITH BOS, as pred.py does
        n_prompt = len(encode(tok, request.prompt, special=False))
        prompt = request.prompt
        dropped = 0
        if len(ids) > self.max_length:
            if request.query_start is not None:
                return self._keep_query(request, n_prompt)
            half = int(self.max_length / 2)
            prompt = tok.decode(ids[:half], skip_special_tokens=True) + tok.decode(ids[-half:], skip_special_tokens=True)
            dropped = len(ids) - 2 * half
        text = self.wrap(prompt) if request.chat else prompt
        return Prepared(encode(tok, text + request.suffix), [], n_prompt, dropped)

    def _keep_query(self, request: Request, n_prompt: int) -> Prepared:
        """ZeroSCROLLS `process_model_input`: document prefix cut on the right, then
        separator + query. Upstream tokenizes both parts with special tokens (T5 adds only EOS);
        for decoder-only models the second part is tokenized without BOS so that no BOS lands
        in the middle of the prompt."""
        tok = self.tokenizer
        qs = int(request.query_start)  # type: ignore[arg-type]
        tail = encode(tok, request.separator + request.prompt[qs:], special=False)
        head = encode(tok, request.prompt[:qs])
        keep = max(self.max_length - len(tail), 0)
        ids = head[:keep] + tail
        dropped = max(len(head) - keep, 0)
        if (request.chat and self.wrap("") != "") or request.suffix:
            text = tok.decode(ids, skip_special_tokens=True)
            ids = encode(tok, (self.wrap(text) if request.chat else text) + request.suffix)
        return Prepared(ids, [], n_prompt, dropped)


class CepePolicy:
    """`cepe-concat-truncate-left`: decoder keeps the prompt's end, the overflow is encoded."""

    name = "cepe-concat-truncate-left"

    def __init__(self, tokenizer: Any, decoder_max_len: int, chunk_len: int, max_encoder_chunks: int,
                 wrap: Callable[[str], str]):
        self.tokenizer, self.decoder_max_len, self.wrap = tokenizer, decoder_max_len, wrap
        self.chunk_len, self.max_encoder_chunks = chunk_len, max_encoder_chunks

    def split(self, ids: Sequence[int], budget: int) -> tuple[list[int], list[list[int]], int]:
        """(decoder ids, encoder chunks, dropped) for prompt `ids` and a decoder budget.

        The chunks are aligned to the END of the overflow, so that the chunk nearest the decoder
        text is full; only the oldest chunk may be short (the batch pads it on the right).
        """
        if len(ids) <= budget:
            return list(ids), [], 0
        dec = list(ids[len(ids) - budget:])
        over = list(ids[: len(ids) - budget])
        keep = self.max_encoder_chunks * self.chunk_len
        enc = over[len(over) - keep:] if keep < len(over) else over
        dropped = len(over) - len(enc)
        chunks: list[list[int]] = []
        end = len(enc)
        while end > 0:
            start = max(0, end - self.chunk_len)
            chunks.insert(0, enc[start:end])
            end = start
        return dec, chunks, dropped

    def prepare(self, request: Request) -> Prepared:
        tok = self.tokenizer
        body = encode(tok, request.prompt, special=False)
        wrap = self.wrap if request.chat else (lambda s: s)
        overhead = len(encode(tok, wrap("") + request.suffix))  # BOS + wrapper + suffix tokens
        budget = self.decoder_max_len - request.max_new_tokens - overhead
        if budget < 1:
            raise CepeError(
                f"decoder_max_len: {self.decoder_max_len} leaves no room for a prompt after "
                f"{request.max_new_tokens} new tokens and {overhead} wrapper tokens"
            )
        dec, chunks, dropped = self.split(body, budget)
        text = request.prompt if not chunks else tok.decode(dec, skip_special_tokens=True)
        return Prepared(encode(tok, wrap(text) + request.suffix), chunks, len(body), dropped)


# --- batched generation ----------------------------------------------------------------------


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids from the generation config and the tokenizer together (chat models often stop on
    an end-of-turn token the tokenizer's eos_token does not name)."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    cfg = getattr(gen, "eos_token_id", None)
    for value in (cfg if isinstance(cfg, (list, tuple)) else [cfg]):
        if value is not None and value not in ids:
            ids.append(int(value))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def newline_id(tokenizer: Any) -> int:
    """`tokenizer.encode("\\n", add_special_tokens=False)[-1]`, as pred.py computes it for samsum."""
    return tokenizer.encode("\n", add_special_tokens=False)[-1]


def _batches(items: list[Prepared], batch_size: int) -> Iterable[list[int]]:
    """Index batches: same number of encoder chunks in a batch (a fully padded chunk would
    have no key to attend to), longest prompts first so padding stays small."""
    order = sorted(range(len(items)), key=lambda i: (len(items[i].encoder_chunks), -len(items[i].input_ids)))
    batch: list[int] = []
    for i in order:
        if batch and (len(items[batch[0]].encoder_chunks) != len(items[i].encoder_chunks) or len(batch) >= batch_size):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def encoder_tensors(chunk_lists: list[list[list[int]]], chunk_len: int, pad_id: int, device: Any) -> tuple[Any, Any]:
    """Pad per-example chunk lists to `(B, n, chunk_len)` ids and a matching 0/1 mask."""
    import torch

    n = max(len(c) for c in chunk_lists)
    ids = torch.full((len(chunk_lists), n, chunk_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk_lists), n, chunk_len), dtype=torch.long)
    for b, chunks in enumerate(chunk_lists):
        for j, chunk in enumerate(chunks):
            ids[b, j, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
            mask[b, j, : len(chunk)] = 1
    return ids.to(device), mask.to(device)


class Generator:
    """Runs a list of Requests through one model with one input policy, batched, with a bar."""

    def __init__(self, model: Any, tokenizer: Any, policy: Any, batch_size: int = 1, chunk_len: int = 256,
                 do_sample: bool = False, top_p: float = 1.0, temperature: float = 1.0, progress: bool = True):
        self.model, self.tokenizer, self.policy = model, tokenizer, policy
        self.batch_size, self.chunk_len = max(1, batch_size), chunk_len
        self.do_sample, self.top_p, self.temperature, self.progress = do_sample, top_p, temperature, progress

    def prepare(self, requests: list[Request]) -> list[Prepared]:
        return [self.policy.prepare(r) for r in requests]

    def generate(self, requests: list[Request], desc: str = "generate") -> tuple[list[str], list[Prepared]]:
        """Predictions (decoded with skip_special_tokens=True) in request order, and the inputs."""
        from tqdm.auto import tqdm

        prepared = self.prepare(requests)
        outputs: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc=desc, unit="ex", disable=not self.progress, dynamic_ncols=True)
        # A batch must share decoding settings: group by (max_new_tokens, stop_on_newline) first.
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.max_new_tokens, r.stop_on_newline), []).append(i)
        for (max_new, stop_nl), idx in groups.items():
            sub = [prepared[i] for i in idx]
            for batch in _batches(sub, self.batch_size):
                texts = self._generate_batch([sub[j] for j in batch], max_new, stop_nl)
                for j, text in zip(batch, texts):
                    outputs[idx[j]] = text
                bar.update(len(batch))
        bar.close()
        return outputs, prepared

    def generate_prepared(self, prepared: list[Prepared], max_new_tokens: int, eos_token_ids: list[int],
                          desc: str = "generate") -> list[str]:
        """Predictions for inputs a task built itself (e.g. one retrieved passage per encoder
        chunk), batched as `generate` does, stopping at any of `eos_token_ids`."""
        from tqdm.auto import tqdm

        outputs: list[str] = [""] * len(prepared)
        bar = tqdm(total=len(prepared), desc=desc, unit="ex", disable=not self.progress, dynamic_ncols=True)
        for batch in _batches(prepared, self.batch_size):
            texts = self._generate_batch([prepared[j] for j in batch], max_new_tokens, False, eos_token_ids)
            for j, text in zip(batch, texts):
                outputs[j] = text
            bar.update(len(batch))
        bar.close()
        return outputs

    def _generate_batch(self, items: list[Prepared], max_new_tokens: int, stop_on_newline: bool,
                        eos_token_ids: list[int] | None = None) -> list[str]:
        import torch

        tok, model = self.tokenizer, self.model
        device = next(model.parameters()).device
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(len(p.input_ids) for p in items)
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for b, p in enumerate(items):  # left padding: the last prompt token is at the end
            ids[b, width - len(p.input_ids):] = torch.tensor(p.input_ids, dtype=torch.long)
            mask[b, width - len(p.input_ids):] = 1
        eos = eos_ids(model, tok)
        kwargs: dict[str, Any] = dict(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            num_beams=1, do_sample=self.do_sample, pad_token_id=pad_id, use_cache=True,
        )
        if self.do_sample:
            kwargs.update(top_p=self.top_p, temperature=self.temperature)
        else:  # silence sampling settings a model's generation_config may carry
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if stop_on_newline:
            # samsum in pred.py: min_length=context_length+1, eos=[eos, "\n"]
            kwargs.update(eos_token_id=[tok.eos_token_id, newline_id(tok)], min_new_tokens=1)
        else:
            kwargs.update(eos_token_id=eos_token_ids or eos)
        if items[0].encoder_chunks:
            enc_ids, enc_mask = encoder_tensors([p.encoder_chunks for p in items], self.chunk_len, pad_id, device)
            kwargs.update(encoder_input_ids=enc_ids, encoder_attention_mask=enc_mask)
        with torch.inference_mode():
            out = model.generate(**kwargs)
        new = out[:, width:]
        return [tok.decode(row, skip_special_tokens=True) for row in new]
