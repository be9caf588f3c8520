"""How CEPE divides a total number of tokens between its encoder and its decoder (no torch import,
so configs can validate lengths cheaply)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Split:
    """How CEPE splits `total` tokens: the decoder keeps min(decoder_len, total // 2) (4K at 8K
    and above, 2K/2K at 4K: the paper's E/D splits, docs/method.md §4), the encoder the rest."""

    total: int
    decoder_tokens: int
    context_tokens: int
    chunk_len: int

    @classmethod
    def of(cls, total: int, decoder_len: int, chunk_len: int) -> "Split":
        decoder = min(decoder_len, total // 2)
        return cls(total, decoder, total - decoder, chunk_len)

    @property
    def n_chunks(self) -> int:
        return self.context_tokens // self.chunk_len
