"""A saved CEPE model directory, loaded for generation, with what it was trained with checked.

The directory holds the weights, the tokenizer and, in `config.json`, the chunk length, decoder
window and tokenizer identity of its training (pipeline/train/model_output.py). Loading refuses
what would silently give worse output: another chunk length than trained, a tokenizer whose
hash differs from the recorded one, a directory that is not a CEPE model.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import CepeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
DEFAULT_CHUNK_LEN = 256  # the paper's, for models saved before the chunk length was recorded


@dataclass
class ServingModel:
    """A loaded model and the geometry every request is prepared with."""

    model: Any
    tokenizer: Any
    path: str
    chunk_len: int
    decoder_len: int
    fast_decode: bool  # decoder packed for decoding, split-KV attention (GPU only)

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> Any:
        return next(self.model.parameters()).dtype

    @property
    def encoder_hidden_size(self) -> int:
        return int(self.model.config.encoder_config.hidden_size)


def _read_config(path: Path, key: str) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise CepeError(f"{key}: {path} holds no saved model (no config.json); expected a trained model/ directory")
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CepeError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(values, dict) or values.get("model_type") != "cepe":
        kind = values.get("model_type") if isinstance(values, dict) else None
        raise CepeError(f"{key}: {path} is a {kind!r} model, not a CEPE model (model_type 'cepe'); "
                        f"give a warmup/train/distill output's model/")
    return values


def resolve_model_path(path: str, key: str = "model") -> Path:
    """A stage output directory or its `model/`: whichever holds the config."""
    p = Path(path)
    if not p.exists():
        raise CepeError(f"{key}: {path} does not exist; expected a trained model directory (e.g. runs/train/model)")
    if not (p / "config.json").is_file() and (p / "model" / "config.json").is_file():
        p = p / "model"
    return p


def load_serving_model(path: str, *, tokenizer: str = "", device: str = "auto", dtype: str = "auto",
                       attn_implementation: str = "sdpa", chunk_len: int = 0, decoder_len: int = 0,
                       fast_decode: bool = True, key: str = "model") -> ServingModel:
    """Load a CEPE model directory and its tokenizer for generation.

    Args:
        tokenizer: another tokenizer to use ("" = the one saved in the directory).
        chunk_len / decoder_len: 0 = the recorded ones; a chunk length other than the recorded
            one is refused.
        fast_decode: on a GPU, pack the decoder for decoding and use the split-KV attention
            (pipeline/fastdecode/decode_packing.py, decode_ops.py); the tokens are the same.
    Raises:
        CepeError: a missing or non-CEPE directory, no tokenizer, a tokenizer of another hash
            than recorded, another chunk length than trained, a decoder window over the decoder's
            positions.
    """
    from pipeline.data.tokenize import tokenizer_hash
    from pipeline.evaluate.models import load_model, load_tokenizer, max_positions

    p = resolve_model_path(path, key)
    values = _read_config(p, key)
    if not tokenizer and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise CepeError(f"{key}: {p} holds no tokenizer (models trained before it was saved with them); "
                        f"pass --tokenizer with the tokenizer of its training data")
    tok = load_tokenizer(tokenizer or str(p))
    record = values.get("tokenizer_record") or {}
    if record.get("sha256") and tokenizer_hash(tok) != record["sha256"]:
        raise CepeError(f"tokenizer: {tokenizer or p} (sha256 {tokenizer_hash(tok)[:12]}) is not the tokenizer "
                        f"{p} was trained with ({record.get('name')}, sha256 {record['sha256'][:12]})")
    model = load_model(str(p), dtype=dtype, device=device, attn_implementation=attn_implementation)
    trained = values.get("chunk_len")
    if chunk_len:
        model.check_chunk_len(chunk_len)
    chunk = int(chunk_len or trained or DEFAULT_CHUNK_LEN)
    if not trained:
        print(f"note: {p} records no training chunk length; encoding context in {chunk}-token chunks",
              file=sys.stderr, flush=True)  # stdout is the answer of `cepe generate`
    limit = max_positions(model)
    window = int(decoder_len or values.get("decoder_len") or min(2048, limit or 2048))
    if limit and window > limit:
        raise CepeError(f"decoder_len: {window} exceeds the decoder's {limit} positions")
    fast = bool(fast_decode) and model.device.type == "cuda"
    if fast:
        enable_fast_decode(model)
    return ServingModel(model, tok, str(p), chunk, window, fast)


def enable_fast_decode(model: Any) -> None:
    """The GPU decode path `cepe bench` measures: q/k/v and gate/up packed into one product each
    (one-token products on the GEMV kernel) and the split-KV self-attention "cepe_decode"."""
    from pipeline.fastdecode import decode_ops
    from pipeline.fastdecode.decode_packing import pack_for_decoding

    pack_for_decoding(model)
    model.decoder.set_attn_implementation(decode_ops.register_attention())
