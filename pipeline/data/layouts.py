"""Example layouts: how token streams become the windows later stages read (docs/method.md §3).

Notation: D = decoder_len, n x L = n_chunks x chunk_len, E = n * L encoder tokens, T = E + D.

- `prevdoc` (RP-filter, §3.3): inside one document, window j covers tokens
  `[j*D, E + (j+1)*D)`: the encoder gets its first E tokens as (n, L), the decoder the last D.
  A document shorter than T gives no window; the tail after the last full window is unused.
- `concat` (RP-cat, §3.4): the documents of one (split, domain) are concatenated, BOS/EOS kept,
  and cut into the same windows over the concatenated stream, carrying the tail over to the
  next document. No length filter.
- `duplicate` (warm-up, §2.2): non-overlapping D-token windows of the concatenated stream; the
  encoder gets the decoder's own D tokens as (n, L) chunks (so n * L must equal D).
- `mlm` (encoder pretraining, §2.1): non-overlapping `mlm_len`-token windows of the concatenated
  stream; no encoder column.

Everything here is pure numpy over int32 arrays: no files, no tokenizer, so the windows can be
checked by hand in tests.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Iterator

import numpy as np

LAYOUTS = ("prevdoc", "concat", "duplicate", "mlm")
MIXABLE = ("prevdoc", "concat", "duplicate")


@dataclasses.dataclass(frozen=True)
class Geometry:
    decoder_len: int
    n_chunks: int
    chunk_len: int
    mlm_len: int = 512

    @property
    def encoder_len(self) -> int:
        return self.n_chunks * self.chunk_len

    def window(self, layout: str) -> tuple[int, int, int]:
        """(window length, stride, anchor) of a layout over a token stream.

        The anchor is the offset inside the window whose document labels the row (`doc_id`):
        the decoder's first token for prevdoc/concat, the window's first token otherwise.
        """
        if layout in ("prevdoc", "concat"):
            return self.encoder_len + self.decoder_len, self.decoder_len, self.encoder_len
        if layout == "duplicate":
            return self.decoder_len, self.decoder_len, 0
        if layout == "mlm":
            return self.mlm_len, self.mlm_len, 0
        raise ValueError(f"unknown layout {layout!r}")

    def split_window(self, layout: str, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(decoder ids (W, D), encoder ids (W, E) or None) from windows (W, window)."""
        if layout in ("prevdoc", "concat"):
            return windows[:, self.encoder_len:], windows[:, : self.encoder_len]
        if layout == "duplicate":
            return windows, windows  # encoder = the decoder's own tokens, read as (n, L)
        return windows, None


def window_starts(n_tokens: int, window: int, stride: int) -> np.ndarray:
    """Start offsets of all full windows: 0, stride, 2*stride, ... while start + window <= n."""
    if n_tokens < window:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, n_tokens - window + 1, stride, dtype=np.int64)


def sliding_windows(tokens: np.ndarray, window: int, stride: int) -> np.ndarray:
    """All full windows as a read-only view (W, window), W = len(window_starts(...))."""
    if len(tokens) < window:
        return np.zeros((0, window), dtype=tokens.dtype)
    return np.lib.stride_tricks.sliding_window_view(tokens, window)[::stride]


def prevdoc_windows(doc: np.ndarray, decoder_len: int, n_chunks: int, chunk_len: int) -> tuple[np.ndarray, np.ndarray]:
    """prevdoc windows of one document: (encoder (W, n, L), decoder (W, D)).

    Window j = doc[j*D : E + (j+1)*D]; encoder = its first E tokens reshaped (n, L), decoder =
    its last D tokens (CEPE `sample_mds_ab.py` with stride = dec).
    """
    e = n_chunks * chunk_len
    win = sliding_windows(doc, e + decoder_len, decoder_len)  # (W, E + D)
    return win[:, :e].reshape(-1, n_chunks, chunk_len), win[:, e:]


def duplicate_windows(tokens: np.ndarray, decoder_len: int, n_chunks: int, chunk_len: int) -> tuple[np.ndarray, np.ndarray]:
    """duplicate windows: (encoder (W, n, L), decoder (W, D)) with encoder == decoder reshaped."""
    if n_chunks * chunk_len != decoder_len:
        raise ValueError(f"duplicate needs n_chunks * chunk_len == decoder_len, got {n_chunks}*{chunk_len} != {decoder_len}")
    win = sliding_windows(tokens, decoder_len, decoder_len)  # (W, D)
    return win.reshape(-1, n_chunks, chunk_len), win


class WindowStream:
    """Concatenate documents and cut windows `[j*stride, j*stride + window)` over the stream.

    `push(tokens, doc_id)` returns the windows completed by that document (W, window) and the
    id of the document under each window's anchor. The unfinished tail (shorter than a window,
    plus the overlap of the next window) is carried to the next push, so memory is one window
    plus one document. `reset=True` per push (prevdoc) makes every document its own stream.
    """

    def __init__(self, window: int, stride: int, anchor: int = 0) -> None:
        if not (0 < stride <= window and 0 <= anchor < window):
            raise ValueError(f"bad window {window}, stride {stride}, anchor {anchor}")
        self.window, self.stride, self.anchor = window, stride, anchor
        self.buf = np.zeros(0, dtype=np.int32)
        self.starts: list[int] = []  # start offset of each document in buf
        self.ids: list[str] = []
        self.consumed = 0  # tokens that left the stream through windows (for accounting)

    def push(self, tokens: np.ndarray, doc_id: str, reset: bool = False) -> tuple[np.ndarray, list[str]]:
        if reset:
            self.buf, self.starts, self.ids = np.zeros(0, dtype=np.int32), [], []
        self.starts.append(len(self.buf))
        self.ids.append(doc_id)
        self.buf = np.concatenate([self.buf, np.asarray(tokens, dtype=np.int32)])
        wins = sliding_windows(self.buf, self.window, self.stride)
        w = len(wins)
        if w == 0:
            return wins, []
        anchors = np.arange(w) * self.stride + self.anchor
        labels = [self.ids[bisect.bisect_right(self.starts, int(a)) - 1] for a in anchors]
        # Keep what later windows still need: everything from the next window's start.
        cut = w * self.stride
        wins = wins.copy()  # detach from buf, which is about to be sliced
        self.buf = self.buf[cut:]
        keep = bisect.bisect_right(self.starts, cut) - 1
        self.starts = [max(0, s - cut) for s in self.starts[keep:]]
        self.ids = self.ids[keep:]
        return wins, labels

    @property
    def leftover(self) -> int:
        """Tokens still waiting in the stream (never part of a window if the input ends)."""
        return len(self.buf)


def assign_split(content_hash: bytes, fractions: dict[str, float]) -> str:
    """The split of a document, from a hash of its text: stable, and independent of the order
    documents arrive in, of other documents, and of the number of workers.

    `fractions` are visited in sorted name order so that reordering params.yaml keys cannot move
    documents between splits.
    """
    u = int.from_bytes(content_hash[:8], "big") / 2.0**64
    acc = 0.0
    names = sorted(fractions)
    for name in names:
        acc += fractions[name]
        if u < acc:
            return name
    return names[-1]


def swrr(weights: dict[str, float]) -> Iterator[str]:
    """Smooth weighted round-robin: an endless, deterministic sequence with the given shares.

    `{prevdoc: 2, concat: 1}` gives prevdoc, concat, prevdoc, prevdoc, concat, prevdoc, ...
    (ties go to the earlier key).
    """
    names = list(weights)
    total = float(sum(weights.values()))
    current = {k: 0.0 for k in names}
    while True:
        for k in names:
            current[k] += weights[k]
        best = max(names, key=lambda k: (current[k], -names.index(k)))
        current[best] -= total
        yield best


class Mixer:
    """Interleave rows of several layouts in an exact ratio, with bounded memory.

    Rows wait in one queue per layout; they leave in the order `swrr(weights)` names layouts.
    A layout that runs ahead of its share (its queue holds `capacity` rows) drops its newest
    rows, counted in `surplus`; at the end of input, rows that no longer fit the ratio are
    dropped too. The result is deterministic for a given input order.
    """

    def __init__(self, weights: dict[str, float], capacity: int) -> None:
        import collections

        self.schedule = swrr(weights)
        self.next = next(self.schedule)
        self.queues = {k: collections.deque() for k in weights}
        self.capacity = max(1, capacity)
        self.surplus = {k: 0 for k in weights}

    def push(self, layout: str, row: object) -> list[object]:
        """Add one row; returns the rows that may now be written, in output order."""
        q = self.queues[layout]
        if len(q) >= self.capacity and layout != self.next:
            self.surplus[layout] += 1
            return []
        q.append(row)
        out = []
        while self.queues[self.next]:
            out.append(self.queues[self.next].popleft())
            self.next = next(self.schedule)
        return out

    def finish(self) -> None:
        for k, q in self.queues.items():
            self.surplus[k] += len(q)
            q.clear()
