"""Layouts produce exactly the token windows docs/method.md §3 describes (hand-checked)."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

from pipeline.data.layouts import (
    Geometry,
    Mixer,
    WindowStream,
    assign_split,
    duplicate_windows,
    prevdoc_windows,
    swrr,
    window_starts,
)


def test_prevdoc_windows_by_hand():
    # D=4, n=2, L=3 -> E=6, T=10; window j = doc[4j : 6 + 4(j+1)], starts 0, 4, 8, 12 (12+10 <= 23).
    doc = np.arange(23, dtype=np.int32)
    enc, dec = prevdoc_windows(doc, decoder_len=4, n_chunks=2, chunk_len=3)
    assert enc.shape == (4, 2, 3) and dec.shape == (4, 4)
    assert enc[0].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert dec[0].tolist() == [6, 7, 8, 9]
    assert enc[1].tolist() == [[4, 5, 6], [7, 8, 9]]
    assert dec[1].tolist() == [10, 11, 12, 13]
    assert dec[3].tolist() == [18, 19, 20, 21]  # token 22 is the unused tail
    # The decoder windows tile the document after the first E tokens, without overlap or gap.
    assert np.concatenate(dec).tolist() == list(range(6, 22))


def test_prevdoc_short_document_gives_nothing():
    enc, dec = prevdoc_windows(np.arange(9, dtype=np.int32), 4, 2, 3)  # 9 < T = 10
    assert enc.shape == (0, 2, 3) and dec.shape == (0, 4)
    enc, dec = prevdoc_windows(np.arange(10, dtype=np.int32), 4, 2, 3)  # exactly T: one window
    assert dec.tolist() == [[6, 7, 8, 9]]


def test_concat_stream_crosses_documents_by_hand():
    # D=2, n=2, L=2 -> E=4, T=6, stride 2; docs are concatenated with their own BOS/EOS kept.
    g = Geometry(decoder_len=2, n_chunks=2, chunk_len=2)
    s = WindowStream(*g.window("concat"))
    a = np.array([1, 10, 11, 12, 2], dtype=np.int32)  # BOS, 3 tokens, EOS
    b = np.array([1, 20, 21, 22, 23, 2], dtype=np.int32)
    w1, ids1 = s.push(a, "a")
    assert len(w1) == 0 and ids1 == []  # 5 tokens < T
    w2, ids2 = s.push(b, "b")
    stream = np.concatenate([a, b])  # 11 tokens: windows start at 0, 2, 4
    assert w2.tolist() == [stream[0:6].tolist(), stream[2:8].tolist(), stream[4:10].tolist()]
    dec, enc = g.split_window("concat", w2)
    # stream = 1 10 11 12 2 | 1 20 21 22 23 2; decoders are stream[4:6], [6:8], [8:10].
    assert dec.tolist() == [[2, 1], [20, 21], [22, 23]]
    assert enc.tolist() == [[1, 10, 11, 12], [11, 12, 2, 1], [2, 1, 20, 21]]
    # doc_id is the document of the decoder's first token: stream[4] = EOS of a, stream[6], stream[8] in b.
    assert ids2 == ["a", "b", "b"]
    assert s.leftover == 11 - 6  # the next window starts at 6


def test_concat_stream_equals_one_pass_over_the_concatenation():
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 100, size=int(n), dtype=np.int32) for n in rng.integers(1, 40, size=30)]
    for window, stride, anchor in [(10, 4, 6), (7, 7, 0), (5, 1, 2)]:
        s = WindowStream(window, stride, anchor)
        got = [w for d in docs for w in s.push(d, "x")[0].tolist()]
        full = np.concatenate(docs)
        want = [full[i: i + window].tolist() for i in window_starts(len(full), window, stride)]
        assert got == want


def test_duplicate_encoder_is_the_decoder():
    enc, dec = duplicate_windows(np.arange(10, dtype=np.int32), decoder_len=4, n_chunks=2, chunk_len=2)
    assert dec.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # non-overlapping; tokens 8, 9 unused
    assert enc.tolist() == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    with pytest.raises(ValueError):
        duplicate_windows(np.arange(10, dtype=np.int32), 4, 3, 2)


def test_mlm_windows_are_consecutive_and_have_no_encoder():
    g = Geometry(decoder_len=8, n_chunks=2, chunk_len=4, mlm_len=3)
    s = WindowStream(*g.window("mlm"))
    w, _ = s.push(np.arange(10, dtype=np.int32), "d")
    dec, enc = g.split_window("mlm", w)
    assert dec.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] and enc is None


def test_swrr_gives_the_paper_ratio():
    seq = list(itertools.islice(swrr({"prevdoc": 2.0, "concat": 1.0}), 9))
    assert seq == ["prevdoc", "concat", "prevdoc"] * 3


def test_mixer_keeps_the_ratio_and_bounds_memory():
    m = Mixer({"prevdoc": 2.0, "concat": 1.0}, capacity=3)
    out = []
    for i in range(10):  # concat arrives first and alone: 3 queued, then its newest rows drop
        out += m.push("concat", ("c", i))
    assert len(m.queues["concat"]) == 3 and m.surplus["concat"] == 7 and out == []
    for i in range(4):
        out += m.push("prevdoc", ("p", i))
    assert [r[0] for r in out] == ["p", "c", "p", "p", "c", "p"]
    assert [r[1] for r in out if r[0] == "c"] == [0, 1]
    m.finish()
    assert m.surplus["concat"] == 8 and all(not q for q in m.queues.values())


def test_assign_split_is_stable_and_follows_fractions():
    fr = {"train": 0.8, "validation": 0.1, "test": 0.1}
    hashes = [hashlib.blake2b(str(i).encode(), digest_size=16).digest() for i in range(20000)]
    got = [assign_split(h, fr) for h in hashes]
    counts = {k: got.count(k) / len(got) for k in fr}
    assert abs(counts["train"] - 0.8) < 0.02 and abs(counts["test"] - 0.1) < 0.01
    # Key order in params.yaml does not move documents.
    assert got == [assign_split(h, dict(reversed(list(fr.items())))) for h in hashes]
