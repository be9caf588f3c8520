"""`cepe generate`: one answer from a trained CEPE model, streamed to stdout.

Config section `generate` of params.yaml (run by hand, not a dvc stage). The context files and
the prompt are joined as `cepe evaluate`'s `cepe-concat-truncate-left` policy joins a long
prompt (pipeline/evaluate/adapters.py: CepePolicy): the decoder keeps the end (the prompt and
the tail of the context that fits in its window with the new tokens); everything before goes to
the encoder in chunks of the length the model was trained with. `chat` wraps the decoder's text
in the tokenizer's chat template. Greedy unless `sampling`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from pipeline.config import ConfigError, field
from pipeline.errors import CepeError


@dataclass
class GenerateConfig:
    model: str = field("runs/train/model", help="The trained CEPE model directory (a stage output or its model/)")
    tokenizer: str = field("", help="Tokenizer name/path ('' = the one saved with the model)")
    context: list[str] = field(default_factory=list, help="Text files read as context, in order (UTF-8)")
    prompt: str = field("", help="The prompt / question (else --prompt-file, else standard input)")
    prompt_file: str = field("", help="Read the prompt from this file")
    max_new_tokens: int = field(256, help="Tokens to generate at most")
    chat: bool = field(False, help="Wrap the decoder's text in the tokenizer's chat template")
    sampling: bool = field(False, help="Sample (top-p) instead of greedy decoding")
    top_p: float = field(0.95, help="top-p when sampling")
    temperature: float = field(1.0, help="Temperature when sampling")
    seed: int = field(42, help="Seed of the sampling")
    max_encoder_chunks: int = field(512, help="Keep at most this many context chunks (the ones nearest the prompt)")
    chunk_len: int = field(0, help="Encoder chunk length (0 = the one the model was trained with; another is refused)")
    decoder_len: int = field(0, help="Decoder window: prompt + generated tokens (0 = the trained one)")
    device: str = field("auto", help="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field("auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    attn_implementation: str = field("sdpa", help="Decoder self-attention: sdpa | eager | flash_attention_2")
    fast_decode: bool = field(True, help="On a GPU: decoder packed for decoding and the split-KV attention (same tokens)")

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model: expected a trained CEPE model directory")
        if self.prompt and self.prompt_file:
            raise ConfigError("prompt, prompt_file: give one of them, not both")
        for name in ("max_new_tokens", "max_encoder_chunks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("chunk_len", "decoder_len"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected 0 (the model's) or a positive integer, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: expected 0 < top_p <= 1, got {self.top_p}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: expected a positive number, got {self.temperature}")


def _read_text(path: str, key: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise CepeError(f"{key}: {path} is not a file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CepeError(f"{key}: {path} is not UTF-8 text (byte {exc.start})") from None


def read_prompt(config: GenerateConfig, stdin: TextIO) -> str:
    if config.prompt:
        return config.prompt
    if config.prompt_file:
        return _read_text(config.prompt_file, "prompt_file")
    if stdin.isatty():
        raise CepeError("prompt: give --prompt TEXT, --prompt-file FILE, or the prompt on standard input")
    text = stdin.read()
    if not text.strip():
        raise CepeError("prompt: standard input was empty; give --prompt TEXT or --prompt-file FILE")
    return text


def run(config: GenerateConfig, out: TextIO | None = None, stdin: TextIO | None = None) -> dict[str, Any]:
    """Generate, writing text to `out` (stdout) as it comes; returns what was generated and read."""
    from pipeline.evaluate.adapters import CepePolicy, Request, make_wrapper
    from pipeline.serve.engine import Decoding, Engine, Job
    from pipeline.serve.loading import load_serving_model

    out = out or sys.stdout
    prompt = read_prompt(config, stdin or sys.stdin)
    contexts = [_read_text(path, f"context[{i}]") for i, path in enumerate(config.context)]
    serving = load_serving_model(config.model, tokenizer=config.tokenizer, device=config.device, dtype=config.dtype,
                                 attn_implementation=config.attn_implementation, chunk_len=config.chunk_len,
                                 decoder_len=config.decoder_len, fast_decode=config.fast_decode)
    tok = serving.tokenizer
    wrap = make_wrapper("template" if config.chat else "none", tok)
    policy = CepePolicy(tok, serving.decoder_len, serving.chunk_len, config.max_encoder_chunks, wrap)
    text = "\n\n".join([*contexts, prompt]) if contexts else prompt
    prepared = policy.prepare(Request(prompt=text, max_new_tokens=config.max_new_tokens, chat=config.chat))
    engine = Engine(serving.model, tok, serving.chunk_len, serving.decoder_len)
    states = engine.encode_chunks(prepared.encoder_chunks) if prepared.encoder_chunks else None
    decoding = (Decoding(do_sample=True, temperature=config.temperature, top_p=config.top_p, seed=config.seed)
                if config.sampling else Decoding())

    def emit(piece: str) -> None:
        out.write(piece)
        out.flush()

    job = Job(input_ids=prepared.input_ids, context=states, max_new_tokens=config.max_new_tokens,
              decoding=decoding, on_text=emit)
    engine.run_batch([job])
    out.write("\n")
    out.flush()
    return {"tokens": job.tokens, "finish_reason": job.finish_reason, "decoder_tokens": len(prepared.input_ids),
            "context_tokens": 0 if states is None else int(states.shape[0]), "dropped_tokens": prepared.dropped_tokens,
            "time_to_first_token_s": job.time_to_first_token}
