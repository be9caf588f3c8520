"""Arrow shards: the writer, the manifest, the validator and the memory-mapped reader.

A shard directory (docs/architecture.md, "Shards"):

    manifest.json
    <split>/shard-00000.arrow ...     Arrow IPC file format, uncompressed (memory-mappable)

Columns: `input_ids` fixed_size_list<int32>[decoder_len] (mlm: [mlm_len]); `encoder_input_ids`
fixed_size_list<int32>[n_chunks * chunk_len] (absent for mlm); `domain`, `layout`, `doc_id`
strings. The IPC *file* format (not the stream format `datasets` writes) is used because its
footer gives random access to record batches; other stages open the files with
`pyarrow.ipc.open_file`.

Shards are written as rows arrive, one record batch of at most `batch_rows` rows at a time, and
closed at `rows_per_shard` rows, so memory holds one batch per split, never the corpus. Byte
identity: same rows in the same order give the same bytes (no timestamps, fixed batch
boundaries), and the manifest records each shard's sha256 plus a `fingerprint` over all of them.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.errors import CepeError
from pipeline.io import atomic_write_json, sha256_file

MANIFEST = "manifest.json"
FORMAT = "cepe-shards"
FORMAT_VERSION = 1
STRING_COLUMNS = ("domain", "layout", "doc_id")


def schema_for(decoder_width: int, encoder_width: int | None):
    import pyarrow as pa

    fields = [pa.field("input_ids", pa.list_(pa.int32(), decoder_width), nullable=False)]
    if encoder_width:
        fields.append(pa.field("encoder_input_ids", pa.list_(pa.int32(), encoder_width), nullable=False))
    fields += [pa.field(name, pa.string(), nullable=False) for name in STRING_COLUMNS]
    return pa.schema(fields)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def write_manifest(directory: str | os.PathLike[str], manifest: dict[str, Any]) -> Path:
    """Write a shard directory's `manifest.json` atomically: the one writer for data shards and
    teacher-logits shards alike. Written last, after every shard, so a directory with a manifest is
    complete; `format` names what the directory holds (`read_manifest` of each kind checks it)."""
    if not manifest.get("format"):
        raise ValueError("a shard manifest needs a `format`")
    path = Path(directory) / MANIFEST
    atomic_write_json(path, manifest)
    return path


def fingerprint(shards: dict[str, list[dict[str, Any]]]) -> str:
    """A stable hash over every shard's path and sha256, splits in sorted order."""
    h = hashlib.sha256()
    for split in sorted(shards):
        for entry in shards[split]:
            h.update(f"{entry['path']}\t{entry['sha256']}\t{entry['rows']}\n".encode())
    return h.hexdigest()


class ShardWriter:
    """Appends rows of one split to `root/<split>/shard-NNNNN.arrow` files.

    `add(input_ids (D,), encoder_input_ids (E,) or None, domain, layout, doc_id)` copies the row
    into a preallocated batch; a full batch becomes one record batch of the open shard file.
    """

    def __init__(self, root: Path, split: str, decoder_width: int, encoder_width: int | None,
                 rows_per_shard: int, batch_rows: int = 1024) -> None:
        self.root, self.split = Path(root), split
        self.dw, self.ew = decoder_width, encoder_width or 0
        self.schema = schema_for(decoder_width, encoder_width)
        self.rows_per_shard = max(1, rows_per_shard)
        self.batch_rows = max(1, min(batch_rows, self.rows_per_shard))
        self.dec = np.zeros((self.batch_rows, self.dw), dtype=np.int32)
        self.enc = np.zeros((self.batch_rows, self.ew), dtype=np.int32) if self.ew else None
        self.strings: dict[str, list[str]] = {k: [] for k in STRING_COLUMNS}
        self.n_batch = 0  # rows in the current batch
        self.n_shard = 0  # rows in the open shard (written batches)
        self.sink = None
        self.writer = None
        self.shards: list[dict[str, Any]] = []
        self.rows = 0

    def add(self, input_ids: np.ndarray, encoder_input_ids: np.ndarray | None, domain: str, layout: str, doc_id: str) -> None:
        k = self.n_batch
        self.dec[k] = input_ids
        if self.enc is not None:
            self.enc[k] = encoder_input_ids.reshape(-1)
        self.strings["domain"].append(domain)
        self.strings["layout"].append(layout)
        self.strings["doc_id"].append(doc_id)
        self.n_batch += 1
        self.rows += 1
        if self.n_batch == self.batch_rows or self.n_shard + self.n_batch == self.rows_per_shard:
            self._flush_batch()

    def _flush_batch(self) -> None:
        import pyarrow as pa

        if self.n_batch == 0:
            return
        if self.writer is None:
            path = self.root / self.split / shard_name(len(self.shards))
            path.parent.mkdir(parents=True, exist_ok=True)
            self.sink = pa.OSFile(str(path), "wb")
            self.writer = pa.ipc.new_file(self.sink, self.schema)
        n = self.n_batch
        cols = [pa.FixedSizeListArray.from_arrays(pa.array(self.dec[:n].reshape(-1)), self.dw)]
        if self.enc is not None:
            cols.append(pa.FixedSizeListArray.from_arrays(pa.array(self.enc[:n].reshape(-1)), self.ew))
        cols += [pa.array(self.strings[k], pa.string()) for k in STRING_COLUMNS]
        self.writer.write_batch(pa.RecordBatch.from_arrays(cols, schema=self.schema))
        self.n_shard += n
        self.n_batch = 0
        self.strings = {k: [] for k in STRING_COLUMNS}
        if self.n_shard >= self.rows_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.sink.close()
        index = len(self.shards)
        path = self.root / self.split / shard_name(index)
        self.shards.append({
            "path": f"{self.split}/{shard_name(index)}",
            "rows": self.n_shard,
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        })
        self.writer = self.sink = None
        self.n_shard = 0

    def close(self) -> list[dict[str, Any]]:
        self._flush_batch()
        self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Close open files without recording them (the directory is thrown away)."""
        if self.writer is not None:
            try:
                self.writer.close()
                self.sink.close()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
            self.writer = self.sink = None


# --------------------------------------------------------------------------------------------
# reading and checking


def read_manifest(root: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CepeError(f"{path}: no manifest; {root} is not a shard directory (run `cepe prepare-data`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CepeError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CepeError(f"{path}: not a cepe shard manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    return manifest


def shard_path(root: Path, entry: dict[str, Any], manifest: Path) -> Path:
    """`root / entry["path"]`, refused unless it names a file inside the shard directory.

    The check is on the path as written (relative, no `..`), not on where symlinks lead: a DVC
    cache may link shard files from elsewhere, which is the user's doing, while a manifest entry
    `../../x` or `/etc/x` would read a file the directory does not hold.
    """
    text = entry.get("path") if isinstance(entry, dict) else None
    if not isinstance(text, str) or not text:
        raise CepeError(f"{manifest}: a shard entry has no path ({entry!r})")
    rel = Path(text)
    if rel.is_absolute() or ".." in rel.parts or text.startswith("~") or "\\" in text:
        raise CepeError(f"{manifest}: shard path {text!r} leaves the shard directory "
                        f"(expected a relative path such as 'train/shard-00000.arrow')")
    return root / rel


# (path, size, mtime_ns, inode) of shard files whose sha256 this process has checked
_VERIFIED: set[tuple[str, int, int, int]] = set()


def _stamp(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def check_shard_digest(path: Path, entry: dict[str, Any], manifest: Path) -> None:
    """The shard's sha256 must be the manifest's; checked once per file per process.

    Why a checksum and not a per-batch check of token ids against the vocabulary: zeroed
    bytes are valid ids (0 is a real token), so only the checksum catches a zeroed shard, or
    any plausible-looking damage; it reads each shard once, the bytes training reads anyway,
    at about 1 GB/s (a one-off few seconds per 10 GB at open, per process). A file already
    checked (same path, size, mtime and inode) is not hashed again, in this process or in
    DataLoader workers that receive the dataset by pickling.
    """
    stamp = _stamp(path)
    if stamp in _VERIFIED:
        return
    digest = sha256_file(path)
    if digest != entry.get("sha256"):
        raise CepeError(f"{path}: sha256 {digest[:12]} does not match the manifest's {str(entry.get('sha256'))[:12]} "
                        f"(corrupt or overwritten); rebuild with `cepe prepare-data` (listed in {manifest})")
    _VERIFIED.add(stamp)


def check_tokenizer(record: dict[str, Any] | None, *, key: str, tokenizer_dirs: list[str | os.PathLike[str]],
                    vocab_size: int | None, model: str, tokenizer: Any = None) -> None:
    """Shards' token ids must be those of the model that reads them.

    `record` is the manifest's `tokenizer` entry. A `tokenizer` the stage already holds (a fast
    one) is hashed directly; else the first of `tokenizer_dirs` that holds a tokenizer (`tokenizer.json` / `tokenizer.model`) is hashed as `prepare-data` hashes its
    tokenizer (`pipeline.data.tokenize.tokenizer_hash`) and must equal the recorded sha256.
    Where no directory holds one (a bare weights folder, a hub id) or the shards record no
    hash, only what is left can be checked: the recorded vocabulary must fit the model's
    `vocab_size` (embedding rows).

    Raises:
        CepeError: naming the model, the shards and both tokenizers.
    """
    record = record or {}
    if record.get("sha256") and getattr(tokenizer, "backend_tokenizer", None) is not None:
        from pipeline.data.tokenize import tokenizer_hash

        theirs = tokenizer_hash(tokenizer)
        if theirs != record["sha256"]:
            raise CepeError(
                f"{model}: its tokenizer (sha256 {theirs[:12]}) is not the one of the windows in {key} "
                f"({record.get('name', '?')}, sha256 {str(record['sha256'])[:12]}); the model must read the "
                f"data's token ids: rebuild the shards with its tokenizer")
        return
    for folder in tokenizer_dirs:
        folder = Path(folder)
        if record.get("sha256") and any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
            from pipeline.data.tokenize import load_tokenizer, tokenizer_hash

            theirs = tokenizer_hash(load_tokenizer(str(folder)))
            if theirs != record["sha256"]:
                raise CepeError(
                    f"{model}: {folder} has another tokenizer (sha256 {theirs[:12]}) than the windows in {key} "
                    f"({record.get('name', '?')}, sha256 {str(record['sha256'])[:12]}); the model must read the "
                    f"data's token ids: rebuild the shards with its tokenizer (cepe prepare-data --tokenizer {folder})")
            return
    vocab = record.get("vocab_size")
    if vocab is not None and vocab_size is not None and int(vocab) > int(vocab_size):
        raise CepeError(f"{model}: a {vocab_size}-token vocabulary, but the windows in {key} were tokenized with a "
                        f"{vocab}-token tokenizer ({record.get('name', '?')}); the model must read the data's token "
                        f"ids: rebuild the shards with the model's tokenizer")


def _open_table(path: Path):
    """Memory-map one shard: IPC file format, or stream format as a fallback."""
    import pyarrow as pa

    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source).read_all()


def _fixed_view(chunk: Any, width: int) -> np.ndarray:
    """(rows, width) int32 numpy view of a fixed_size_list chunk (zero-copy)."""
    flat = chunk.flatten() if chunk.offset else chunk.values
    return flat.to_numpy(zero_copy_only=True).reshape(-1, width)


def verify_shards(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a shard directory against its manifest; raise CepeError on the first problem.

    Checks: every listed shard exists, has the recorded size and sha256, opens as Arrow with the
    manifest's schema and row count; no unlisted shard file lies beside them; per-split row
    counts add up; the fingerprint matches. Returns a short summary.
    """
    import pyarrow as pa

    root = Path(root)
    manifest = read_manifest(root)
    splits = manifest.get("splits") or {}
    dw = int(manifest["input_width"])
    ew = int(manifest.get("encoder_width") or 0) or None
    want_schema = schema_for(dw, ew)
    listed: dict[str, list[dict[str, Any]]] = {}
    for split, info in splits.items():
        entries = info.get("shards", [])
        listed[split] = entries
        total = 0
        for entry in entries:
            path = shard_path(root, entry, root / MANIFEST)
            if not path.is_file():
                raise CepeError(f"{path}: shard missing (listed in {root / MANIFEST})")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise CepeError(f"{path}: {size} bytes but the manifest says {entry['bytes']} (truncated or overwritten); rebuild with `cepe prepare-data`")
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                raise CepeError(f"{path}: sha256 {digest[:12]} does not match the manifest's {entry['sha256'][:12]} (corrupt); rebuild with `cepe prepare-data`")
            try:
                table = _open_table(path)
            except (pa.ArrowInvalid, OSError) as exc:
                raise CepeError(f"{path}: not a readable Arrow file ({exc})") from None
            if not table.schema.equals(want_schema):
                raise CepeError(f"{path}: schema {table.schema.names} does not match the manifest's geometry")
            if table.num_rows != entry["rows"]:
                raise CepeError(f"{path}: {table.num_rows} rows but the manifest says {entry['rows']}")
            total += table.num_rows
        if total != info.get("rows", total):
            raise CepeError(f"{root / MANIFEST}: split {split!r} lists {total} rows in its shards but records {info.get('rows')}")
        folder = root / split
        if folder.is_dir():
            known = {Path(e["path"]).name for e in entries}
            extra = sorted(p.name for p in folder.glob("*.arrow") if p.name not in known)
            if extra:
                raise CepeError(f"{folder / extra[0]}: shard not listed in {root / MANIFEST}")
    fp = fingerprint(listed)
    if fp != manifest.get("fingerprint"):
        raise CepeError(f"{root / MANIFEST}: fingerprint {str(manifest.get('fingerprint'))[:12]} does not match the shards ({fp[:12]})")
    return {"root": str(root), "fingerprint": fp, "rows": {s: int(i.get("rows", 0)) for s, i in splits.items()},
            "shards": sum(len(v) for v in listed.values())}


class ShardDataset:
    """Map-style, memory-mapped view of one split: `len()`, random access, picklable.

    `ds[i]` -> `{"input_ids": (D,) int32, "encoder_input_ids": (n_chunks, chunk_len) int32
    (not for mlm), "domain", "layout", "doc_id": str}`; arrays are fresh copies (writable, safe
    to hand to torch). Shards are memory-mapped on first use, so DataLoader workers share the
    page cache. Opening checks the manifest, the split, every shard's path (inside the
    directory), size and sha256 (`check_shard_digest`: once per file per process), so damaged
    data stops the stage before it trains, naming the shard; `verify_shards` checks the rest
    (schema, rows, fingerprint).
    """

    def __init__(self, root: str | os.PathLike[str], split: str) -> None:
        self.root = Path(root)
        self.split = split
        self.manifest = read_manifest(self.root)
        splits = self.manifest.get("splits") or {}
        if split not in splits:
            raise CepeError(f"{self.root / MANIFEST}: no split {split!r} (splits: {', '.join(splits) or 'none'})")
        self.entries = splits[split].get("shards", [])
        self.paths = []
        for entry in self.entries:
            path = shard_path(self.root, entry, self.root / MANIFEST)
            if not path.is_file():
                raise CepeError(f"{path}: shard missing (listed in {self.root / MANIFEST})")
            if path.stat().st_size != entry["bytes"]:
                raise CepeError(f"{path}: {path.stat().st_size} bytes but the manifest says {entry['bytes']} (truncated?); run `cepe prepare-data --verify {self.root}`")
            self.paths.append(path)
        for entry, path in zip(self.entries, self.paths):
            check_shard_digest(path, entry, self.root / MANIFEST)
        self.offsets = np.cumsum([0] + [int(e["rows"]) for e in self.entries])
        self.input_width = int(self.manifest["input_width"])
        self.encoder_shape = (
            (int(self.manifest["n_chunks"]), int(self.manifest["chunk_len"])) if self.manifest.get("encoder_width") else None
        )
        self._blocks: dict[int, list[tuple[int, dict[str, Any]]]] = {}
        self._starts: dict[int, list[int]] = {}

    # pickling: reopen the memory maps in the receiving process (the files checked here are
    # not hashed again there unless they changed)
    def __getstate__(self) -> dict[str, Any]:
        return {"root": str(self.root), "split": self.split, "verified": [_stamp(p) for p in self.paths]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        _VERIFIED.update(tuple(s) for s in state.get("verified", []))
        self.__init__(state["root"], state["split"])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _shard(self, k: int) -> list[tuple[int, dict[str, Any]]]:
        """Record batches of shard k as (first row, column views), opened on first use."""
        blocks = self._blocks.get(k)
        if blocks is None:
            table = _open_table(self.paths[k])
            blocks, start = [], 0
            for batch in table.to_batches():
                cols: dict[str, Any] = {"input_ids": _fixed_view(batch.column("input_ids"), self.input_width)}
                if self.encoder_shape is not None:
                    n, L = self.encoder_shape
                    cols["encoder_input_ids"] = _fixed_view(batch.column("encoder_input_ids"), n * L).reshape(-1, n, L)
                for name in STRING_COLUMNS:
                    cols[name] = batch.column(name)
                blocks.append((start, cols))
                start += batch.num_rows
            self._blocks[k] = blocks
            self._starts[k] = [start for start, _ in blocks]
        return blocks

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} rows")
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        local = index - int(self.offsets[k])
        blocks = self._shard(k)
        b = bisect.bisect_right(self._starts[k], local) - 1
        start, cols = blocks[b]
        r = local - start
        out: dict[str, Any] = {"input_ids": np.array(cols["input_ids"][r])}
        if "encoder_input_ids" in cols:
            out["encoder_input_ids"] = np.array(cols["encoder_input_ids"][r])  # (n_chunks, chunk_len)
        for name in STRING_COLUMNS:
            out[name] = cols[name][r].as_py()
        return out

    def order(self, seed: int, epoch: int = 0) -> np.ndarray:
        """The shuffled row order of an epoch: same (seed, epoch), same order, on any machine."""
        return ResumableSampler(len(self), seed=seed, epoch=epoch).order(epoch)

    def sampler(self, seed: int = 0, shuffle: bool = True) -> "ResumableSampler":
        return ResumableSampler(len(self), seed=seed, shuffle=shuffle)


class ResumableSampler:
    """Seeded row order over `n` rows that can stop and resume mid-epoch.

    An iterable of ints, so `torch.utils.data.DataLoader(ds, sampler=s)` takes it. Each pass
    yields the rest of the current epoch from `position` on, then moves to the next epoch
    (a fresh permutation). `state_dict()` / `load_state_dict()` save and restore (seed, epoch,
    position). Note: `position` counts indices handed out; a DataLoader with workers fetches
    ahead, so a training loop should save the number of samples it actually consumed as
    `position` (e.g. `{**s.state_dict(), "position": consumed}`).
    """

    def __init__(self, n: int, seed: int = 0, epoch: int = 0, position: int = 0, shuffle: bool = True) -> None:
        self.n, self.seed, self.epoch, self.position, self.shuffle = int(n), int(seed), int(epoch), int(position), shuffle

    def order(self, epoch: int | None = None) -> np.ndarray:
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return np.arange(self.n, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        while self.position < self.n:
            i = int(order[self.position])
            self.position += 1
            yield i
        self.epoch += 1
        self.position = 0

    def __len__(self) -> int:
        return self.n - self.position

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("n", self.n)) != self.n:
            raise CepeError(f"sampler state: saved for {state.get('n')} rows, this dataset has {self.n}; the data changed since the checkpoint")
        if not 0 <= int(state["position"]) <= self.n:
            raise CepeError(f"sampler state: position {state['position']} outside 0..{self.n}")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
