"""`cepe serve`: the OpenAI-compatible server over a trained CEPE model (pipeline/serve/app.py).

Config section `serve` of params.yaml (run by hand, not a dvc stage). Binds to loopback unless
`host` says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config import ConfigError, field


@dataclass
class ServeConfig:
    model: str = field("runs/train/model", help="The trained CEPE model directory (a stage output or its model/)")
    tokenizer: str = field("", help="Tokenizer name/path ('' = the one saved with the model)")
    host: str = field("127.0.0.1", help="Address to bind (loopback by default; 0.0.0.0 exposes the server)")
    port: int = field(8000, help="TCP port (0 = any free port)")
    model_name: str = field("", help="Model name in responses ('' = the model directory's name)")
    device: str = field("auto", help="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field("auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    attn_implementation: str = field("sdpa", help="Decoder self-attention: sdpa | eager | flash_attention_2")
    fast_decode: bool = field(True, help="On a GPU: decoder packed for decoding and the split-KV attention (same tokens)")
    chunk_len: int = field(0, help="Encoder chunk length (0 = the one the model was trained with; another is refused)")
    decoder_len: int = field(0, help="Decoder window: prompt + generated tokens (0 = the trained one)")
    max_tokens: int = field(1024, help="Most tokens one request may generate")
    default_max_tokens: int = field(256, help="Tokens generated when a request gives no max_tokens")
    max_context_tokens: int = field(131072, help="Most encoder tokens one request may read (its documents together)")
    max_document_tokens: int = field(131072, help="Most tokens of one posted document")
    cache_gb: float = field(4.0, help="Device memory for cached document states (GB, LRU beyond it)")
    cache_dir: str = field("", help="Also keep document states as safetensors files here ('' = memory only)")
    max_batch: int = field(8, help="Requests decoded together in one batch")
    max_queue: int = field(64, help="Requests waiting at most; more get 429")
    max_request_bytes: int = field(8_388_608, help="Largest request body accepted (bytes)")
    encoder_chunk_batch: int = field(64, help="Chunks per encoder forward (bounds activation memory)")

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model: expected a trained CEPE model directory")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: expected 0..65535, got {self.port}")
        for name in ("max_tokens", "default_max_tokens", "max_context_tokens", "max_document_tokens",
                     "max_batch", "max_queue", "max_request_bytes", "encoder_chunk_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("chunk_len", "decoder_len"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected 0 (the model's) or a positive integer, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_tokens:
            raise ConfigError(f"default_max_tokens: {self.default_max_tokens} exceeds max_tokens {self.max_tokens}")
        if not self.cache_gb > 0:
            raise ConfigError(f"cache_gb: expected a positive number, got {self.cache_gb}")


def limits(config: Any) -> Any:
    from pipeline.serve.session import Limits

    return Limits(max_tokens=config.max_tokens, default_max_tokens=config.default_max_tokens,
                  max_context_tokens=config.max_context_tokens, max_document_tokens=config.max_document_tokens,
                  cache_bytes=int(config.cache_gb * (1 << 30)), cache_dir=config.cache_dir,
                  max_batch=config.max_batch, max_queue=config.max_queue,
                  encoder_chunk_batch=config.encoder_chunk_batch)


def build(config: ServeConfig) -> tuple[Any, Any]:
    """(session, ASGI app) for the config: the model loaded and checked, nothing bound yet."""
    from pathlib import Path

    from pipeline.serve.app import create_app
    from pipeline.serve.loading import load_serving_model
    from pipeline.serve.session import Session

    serving = load_serving_model(config.model, tokenizer=config.tokenizer, device=config.device, dtype=config.dtype,
                                 attn_implementation=config.attn_implementation, chunk_len=config.chunk_len,
                                 decoder_len=config.decoder_len, fast_decode=config.fast_decode)
    session = Session(serving, limits(config))
    name = config.model_name or Path(serving.path).resolve().name
    if name == "model":
        name = Path(serving.path).resolve().parent.name
    return session, create_app(session, name, config.max_request_bytes)


def run(config: ServeConfig) -> None:
    """Serve until interrupted."""
    import uvicorn

    session, app = build(config)
    print(f"serving {session.serving.path} on http://{config.host}:{config.port} (chunk_len "
          f"{session.serving.chunk_len}, decoder window {session.serving.decoder_len}, "
          f"{session.serving.device}, fast decode {'on' if session.serving.fast_decode else 'off'})", flush=True)
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    finally:
        session.close()
