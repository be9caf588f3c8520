"""Helpers shared by the training tests: tiny corpora, tiny shard directories, quick options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VOCAB = 128  # = conftest.TINY_VOCAB; ids 0-2 are pad/BOS/EOS


def pattern_corpus(n: int, length: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Arithmetic progressions mod 125 (+3): learnable by a tiny decoder in a few steps."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        step, start = rng.integers(1, 12), rng.integers(0, 125)
        out.append({"input_ids": ((start + step * np.arange(length)) % 125 + 3).astype(np.int32)})
    return out


def random_tokens(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(3, VOCAB, size=shape).astype(np.int32)


def write_shards(root: Path, layout: str, *, n_train: int, n_val: int, decoder_len: int, n_chunks: int = 0,
                 chunk_len: int = 0, seed: int = 0) -> Path:
    """A shard directory in the project's format (pipeline.data.shards: ShardWriter + manifest).

    Layouts: `mlm` (input_ids only: BOS + one token repeated), `duplicate` (the encoder chunks are
    the decoder window's own first n_chunks*chunk_len tokens), `prevdoc` (context and window drawn
    from the same 4 tokens, so the context predicts the window's vocabulary).
    """
    from pipeline.data.shards import FORMAT, FORMAT_VERSION, MANIFEST, ShardWriter, fingerprint

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    enc_width = 0 if layout == "mlm" else n_chunks * chunk_len
    splits, shards = {}, {}
    for split, n in (("train", n_train), ("validation", n_val)):
        writer = ShardWriter(root, split, decoder_len, enc_width or None, rows_per_shard=max(n // 2, 1), batch_rows=16)
        for i in range(n):
            if layout == "mlm":  # one token repeated: a masked token is any unmasked neighbour
                ids = np.full(decoder_len, rng.integers(3, VOCAB), dtype=np.int32)
                ids[0] = 1
                enc = None
            else:
                # Each window (and its context) draws from its own 4 tokens: with the decoder
                # frozen, only reading the context through cross-attention tells which 4, so
                # the loss falls from ln(125) towards ln(4) only if the encoder path learns.
                subset = rng.choice(np.arange(3, VOCAB), size=4, replace=False).astype(np.int32)
                ids = rng.choice(subset, size=decoder_len).astype(np.int32)
                if layout == "duplicate":
                    enc = ids[: n_chunks * chunk_len].copy()
                else:
                    enc = rng.choice(subset, size=n_chunks * chunk_len).astype(np.int32)
            writer.add(ids, enc, "test", layout, f"{split}-{i}")
        shards[split] = writer.close()
        splits[split] = {"rows": n, "shards": shards[split]}
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "layout": layout, "decoder_len": decoder_len,
        "n_chunks": n_chunks, "chunk_len": chunk_len, "encoder_len": enc_width, "input_width": decoder_len,
        "encoder_width": enc_width, "splits": splits, "fingerprint": fingerprint(shards),
        "tokenizer": {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return root


