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
    """A shard directory in the documented schema (docs/architecture.md "Shards"), written with
    pyarrow: manifest.json + <split>/shard-00000.arrow.

    Layouts: `mlm` (input_ids only), `duplicate` (the encoder chunks are the decoder window's own
    first n_chunks*chunk_len tokens), `prevdoc` (the encoder chunks are the tokens just before the
    window in one random stream whose second half repeats its first, so context predicts it).
    """
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_val)):
        rows: dict[str, list] = {"input_ids": [], "encoder_input_ids": [], "domain": [], "layout": [], "doc_id": []}
        for i in range(n):
            if layout == "mlm":
                ids = random_tokens(rng, (decoder_len,))
                ids[0] = 1
                enc = None
            elif layout == "duplicate":
                ids = random_tokens(rng, (decoder_len,))
                enc = ids[: n_chunks * chunk_len].copy()
            else:  # prevdoc: context = the tokens right before; the window repeats them
                ctx = random_tokens(rng, (n_chunks * chunk_len,))
                ids = np.resize(ctx, decoder_len).astype(np.int32)
                enc = ctx
            rows["input_ids"].append(ids.tolist())
            if enc is not None:
                rows["encoder_input_ids"].append(enc.tolist())
            rows["domain"].append("test")
            rows["layout"].append(layout)
            rows["doc_id"].append(f"{split}-{i}")
        fields = [pa.field("input_ids", pa.list_(pa.int32(), decoder_len))]
        if layout != "mlm":
            fields.append(pa.field("encoder_input_ids", pa.list_(pa.int32(), n_chunks * chunk_len)))
        else:
            rows.pop("encoder_input_ids")
        fields += [pa.field(k, pa.string()) for k in ("domain", "layout", "doc_id")]
        table = pa.table({f.name: rows[f.name] for f in fields}, schema=pa.schema(fields))
        (root / split).mkdir(exist_ok=True)
        with pa.OSFile(str(root / split / "shard-00000.arrow"), "wb") as sink:
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
    manifest = {"layout": layout, "decoder_len": decoder_len, "n_chunks": n_chunks, "chunk_len": chunk_len,
                "splits": {"train": n_train, "validation": n_val},
                "tokenizer": {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
                              "mask_token_id": VOCAB}}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root
