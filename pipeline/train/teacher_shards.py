"""Teacher top-k shards on disk: Arrow IPC files index-aligned with the data shards.

Layout, mirroring a data shard directory one file for one file and one row for one row:

    <logits_dir>/manifest.json
    <logits_dir>/<split>/shard-NNNNN.arrow      (same names and row counts as the data's)

Columns (per row, one decoder window; n = decoder_len positions, k entries each, flattened so a
row is one contiguous fixed-size run that memory-maps without copying):

    topk_probs  fixed_size_list<float16>[n*k]   the teacher's top-k probabilities, sorted
    topk_ids    fixed_size_list<int32>[n*k]     their token ids
    tail        fixed_size_list<float16>[n]     1 - sum(top-k): the mass of everything else
    row_hash    int64                           hash of the tokens the teacher read (alignment)

At k = 50 that is 50*2 + 50*4 + 2 = 302 bytes per position, about 1.2 MB per 4K-token window;
the paper's 2.5M windows of 2048 positions come to ~1.5 TB, as the reference's MDS files did.

The manifest records what the numbers depend on, so that `pipeline.train.teacher_align` can
refuse shards made from another data build, tokenizer, split, teacher or geometry.
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from pipeline.data.shards import MANIFEST
from pipeline.errors import CepeError
from pipeline.train.teacher import IDS, LOGITS_FORMAT, PROBS, ROW_HASH, TAIL

LOGITS_VERSION = 1


def logits_schema(n: int, k: int) -> pa.Schema:
    return pa.schema([
        pa.field(PROBS, pa.list_(pa.float16(), n * k), nullable=False),
        pa.field(IDS, pa.list_(pa.int32(), n * k), nullable=False),
        pa.field(TAIL, pa.list_(pa.float16(), n), nullable=False),
        pa.field(ROW_HASH, pa.int64(), nullable=False),
    ])


def _fixed(values: np.ndarray, size: int, dtype: Any) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values, dtype=dtype).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, size)


def write_logits_shard(path: str | os.PathLike[str], n: int, k: int,
                       chunks: Iterable[dict[str, np.ndarray]]) -> int:
    """Write one shard from chunks of rows; returns the number of rows written.

    Each chunk holds `topk_probs` (b, n, k), `topk_ids` (b, n, k), `tail` (b, n) and
    `row_hash` (b,), any numeric dtypes (cast to fp16 / int32 / int64 here). One record batch per
    chunk, so a shard streams to disk without being held in memory.
    """
    schema = logits_schema(n, k)
    rows = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for chunk in chunks:
            b = len(chunk[ROW_HASH])
            probs, ids, tail = chunk[PROBS], chunk[IDS], chunk[TAIL]
            if probs.shape != (b, n, k) or ids.shape != (b, n, k) or tail.shape != (b, n):
                raise ValueError(f"chunk shapes {probs.shape}, {ids.shape}, {tail.shape} do not fit n={n}, k={k}")
            batch = pa.record_batch([
                _fixed(probs, n * k, np.float16),
                _fixed(ids, n * k, np.int32),
                _fixed(tail, n, np.float16),
                pa.array(np.asarray(chunk[ROW_HASH], dtype=np.int64)),
            ], schema=schema)
            writer.write_batch(batch)
            rows += b
    return rows


class _Shard:
    """One memory-mapped logits file: row r -> views into its record batches (no copies)."""

    def __init__(self, path: Path, n: int, k: int):
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        self.n, self.k = n, k
        self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self.starts = [0]
        for b in self.batches:
            self.starts.append(self.starts[-1] + b.num_rows)
        self._flat: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def _columns(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if i not in self._flat:
            b = self.batches[i]

            def flat(name: str, size: int) -> np.ndarray:
                col = b.column(name)
                values = col.values.to_numpy(zero_copy_only=True)
                return values[col.offset * size : (col.offset + len(col)) * size]

            self._flat[i] = (flat(PROBS, self.n * self.k), flat(IDS, self.n * self.k), flat(TAIL, self.n),
                             b.column(ROW_HASH).to_numpy(zero_copy_only=True))
        return self._flat[i]

    def row(self, r: int) -> dict[str, Any]:
        i = bisect.bisect_right(self.starts, r) - 1
        j = r - self.starts[i]
        probs, ids, tail, hashes = self._columns(i)
        nk = self.n * self.k
        return {
            PROBS: probs[j * nk : (j + 1) * nk].reshape(self.n, self.k),
            IDS: ids[j * nk : (j + 1) * nk].reshape(self.n, self.k),
            TAIL: tail[j * self.n : (j + 1) * self.n],
            ROW_HASH: int(hashes[j]),
        }


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The logits manifest; a missing or foreign one is a CepeError naming the file."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CepeError(f"{path}: not found (run `cepe teacher-logits` first, or set teacher_mode: online)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CepeError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if manifest.get("format") != LOGITS_FORMAT:
        raise CepeError(f"{path}: not a teacher-logits manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != LOGITS_VERSION:
        raise CepeError(f"{path}: version {manifest.get('version')} is not the supported {LOGITS_VERSION}; recompute it")
    return manifest


class TeacherLogits:
    """A split of teacher top-k shards as a map-style dataset, in the data shards' row order.

    `logits[i]` -> `topk_probs` (n, k) fp16, `topk_ids` (n, k) int32, `tail` (n,) fp16 and
    `row_hash` (int) of global row i (shard by shard, in manifest order). Files are opened lazily
    in each process (the object pickles into DataLoader workers without its memory maps).
    """

    def __init__(self, root: str | os.PathLike[str], split: str):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        splits = self.manifest.get("splits", {})
        if split not in splits:
            raise CepeError(f"{self.root / MANIFEST}: no split {split!r} (it has: {', '.join(splits) or 'none'})")
        self.split = split
        self.n, self.k = int(self.manifest["decoder_len"]), int(self.manifest["k"])
        self.files = [s["file"] for s in splits[split]["shards"]]
        for name in self.files:  # a file name inside <split>/, never a path that leaves it
            if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
                raise CepeError(f"{self.root / MANIFEST}: shard file {name!r} is not a file name inside "
                                f"{self.root / split} (expected e.g. 'shard-00000.arrow')")
        self.rows = [int(s["rows"]) for s in splits[split]["shards"]]
        self.offsets = np.cumsum([0] + self.rows)
        self._open: dict[int, _Shard] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def shard(self, i: int) -> _Shard:
        if i not in self._open:
            path = self.root / self.split / self.files[i]
            if not path.is_file():
                raise CepeError(f"{path}: listed in {self.root / MANIFEST} but missing")
            shard = _Shard(path, self.n, self.k)
            if len(shard) != self.rows[i]:
                raise CepeError(f"{path}: holds {len(shard)} rows, the manifest says {self.rows[i]}")
            self._open[i] = shard
        return self._open[i]

    def locate(self, index: int) -> tuple[int, int]:
        """Global row -> (shard number, row within shard)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        i = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return i, int(index - self.offsets[i])

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, r = self.locate(int(index))
        return self.shard(i).row(r)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index in range(len(self)):
            yield self[index]
