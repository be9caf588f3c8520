"""Raw text sources: one stream of documents `{id, domain, text}` from specs a user types.

A source spec is a string, `SPEC[;key=value]...`, or in params.yaml a mapping with the same keys
and `source: SPEC`:

- `embedded`, `embedded:austen|kjv|abs-guide`: the public-domain corpus inside the package;
- a path: a file, a directory (searched recursively) or a glob, of `.jsonl`, `.json` (JSON lines
  or one array of objects), `.parquet`, `.txt` (one document per file), each optionally `.gz` or
  `.zst` compressed;
- `hf:NAME[:CONFIG[:SPLIT]]`: a Hugging Face dataset through `datasets.load_dataset(...,
  streaming=True)` (split `train` by default); `hf:json;data_files=a.jsonl,b.jsonl` and the like
  reach the packaged builders.

Keys: `domain` (default: the embedded corpus's domain, else the file/directory/dataset name),
`weight` (share of the interleaved stream, default 1), `text_field`, `id_field`, `data_files`.

Everything is read lazily, one document at a time, so memory does not depend on corpus size
(a `.json` array file is the exception: JSON arrays cannot be streamed by the standard library).
Problems in a file name the file and line. A bad line inside an otherwise good file is a counted
skip (reported in the manifest) unless `strict`; a file with no good line at all, a missing path,
a compressed file that is not what its suffix says, or a missing text field on the first record
is an error.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import gzip
import io
import json
import zlib
from pathlib import Path
from typing import Any, Iterator

from pipeline.data.corpus import embedded_files
from pipeline.errors import CepeError

FORMATS = (".jsonl", ".json", ".parquet", ".txt")
COMPRESSIONS = (".gz", ".zst")
SOURCE_KEYS = ("domain", "weight", "text_field", "id_field", "data_files")


@dataclasses.dataclass(frozen=True)
class Document:
    id: str
    domain: str
    text: str
    source: int  # index of the source it came from


@dataclasses.dataclass
class SourceSpec:
    """One parsed source: what to read and how to label it."""

    spec: str  # as the user typed it (without the ;key=value options)
    kind: str  # "embedded" | "files" | "hf"
    target: str  # embedded name, path/glob, or hub name
    domain: str
    weight: float = 1.0
    text_field: str = "text"
    id_field: str = "id"
    data_files: list[str] | None = None
    hf_config: str | None = None
    hf_split: str = "train"

    def describe(self) -> dict[str, Any]:
        out = {"spec": self.spec, "kind": self.kind, "domain": self.domain, "weight": self.weight,
               "text_field": self.text_field}
        if self.data_files:
            out["data_files"] = self.data_files
        return out


class Skips:
    """Counts bad lines by reason and keeps the first few with their file and line."""

    def __init__(self, strict: bool = False, keep: int = 50) -> None:
        self.strict = strict
        self.keep = keep
        self.counts: dict[str, int] = {}
        self.samples: list[dict[str, Any]] = []

    def add(self, reason: str, where: str, line: int | None, detail: str) -> None:
        loc = f"{where} line {line}" if line is not None else where
        if self.strict:
            raise CepeError(f"{loc}: {detail} (--strict)")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.samples) < self.keep:
            self.samples.append({"file": where, "line": line, "reason": reason, "detail": detail})


# --------------------------------------------------------------------------------------------
# parsing specs


def parse_source(item: str | dict[str, Any], text_field: str = "text", id_field: str = "id") -> SourceSpec:
    """Parse a source spec (string or mapping) into a `SourceSpec`; errors name the spec."""
    if isinstance(item, dict):
        opts = dict(item)
        spec = opts.pop("source", None) or opts.pop("spec", None) or opts.pop("path", None)
        if not isinstance(spec, str) or not spec:
            raise CepeError(f"source {item!r}: expected a mapping with a `source:` string")
    elif isinstance(item, str):
        spec, *rest = [p.strip() for p in item.split(";")]
        opts = {}
        for part in rest:
            if not part:
                continue
            if "=" not in part:
                raise CepeError(f"source {item!r}: option {part!r} is not key=value")
            k, v = part.split("=", 1)
            opts[k.strip()] = v.strip()
    else:
        raise CepeError(f"source {item!r}: expected a string or a mapping")
    unknown = sorted(set(opts) - set(SOURCE_KEYS))
    if unknown:
        raise CepeError(f"source {spec!r}: unknown option {unknown[0]!r} (known: {', '.join(SOURCE_KEYS)})")
    try:
        weight = float(opts.get("weight", 1.0))
    except (TypeError, ValueError):
        raise CepeError(f"source {spec!r}: weight must be a number, got {opts.get('weight')!r}") from None
    if not weight > 0:
        raise CepeError(f"source {spec!r}: weight must be > 0, got {weight}")
    data_files = opts.get("data_files")
    if isinstance(data_files, str):
        data_files = [f for f in data_files.split(",") if f]
    common = dict(weight=weight, text_field=str(opts.get("text_field", text_field)),
                  id_field=str(opts.get("id_field", id_field)))
    if spec == "embedded" or spec.startswith("embedded:"):
        name = spec.split(":", 1)[1] if ":" in spec else None
        files = embedded_files(name)  # validates the name
        domain = opts.get("domain") or (files[0][2] if len(files) == 1 else "")
        return SourceSpec(spec, "embedded", name or "", domain=str(domain), **common)
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if not parts[0] or len(parts) > 3:
            raise CepeError(f"source {spec!r}: expected hf:NAME[:CONFIG[:SPLIT]]")
        name = parts[0]
        config = parts[1] if len(parts) > 1 and parts[1] else None
        split = parts[2] if len(parts) > 2 and parts[2] else "train"
        domain = opts.get("domain") or (config or name.rstrip("/").split("/")[-1])
        return SourceSpec(spec, "hf", name, domain=str(domain), data_files=data_files, hf_config=config,
                          hf_split=split, **common)
    if data_files:
        raise CepeError(f"source {spec!r}: data_files only applies to hf: sources")
    return SourceSpec(spec, "files", spec, domain=str(opts.get("domain") or _path_domain(spec)), **common)


def _path_domain(spec: str) -> str:
    p = Path(spec)
    if globlib.has_magic(spec):
        p = Path(_glob_root(spec))
    name = p.name
    for suffix in COMPRESSIONS + FORMATS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for suffix in FORMATS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name or "default"


def _glob_root(pattern: str) -> str:
    """The directory part of a glob before its first wildcard (for relative document ids)."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if globlib.has_magic(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def file_format(path: Path) -> tuple[str, str | None]:
    """`(format, compression)` from a file name: `x.jsonl.gz` -> (".jsonl", ".gz")."""
    name = path.name.lower()
    comp = None
    for c in COMPRESSIONS:
        if name.endswith(c):
            comp, name = c, name[: -len(c)]
            break
    for f in FORMATS:
        if name.endswith(f):
            return f, comp
    return "", comp


def resolve_files(spec: SourceSpec) -> list[tuple[Path, str]]:
    """`[(path, relative name)]` of a path/dir/glob spec, sorted; errors name the spec."""
    target = spec.target
    if globlib.has_magic(target):
        root = Path(_glob_root(target))
        matches = sorted(Path(p) for p in globlib.glob(target, recursive=True))
        files = [p for p in matches if p.is_file() and file_format(p)[0]]
        if not matches:
            raise CepeError(f"source {spec.spec!r}: the pattern matches no file")
        if not files:
            raise CepeError(f"source {spec.spec!r}: matches no file of a supported type "
                            f"({', '.join(FORMATS)}, optionally {', '.join(COMPRESSIONS)})")
        return [(p, str(p.relative_to(root)) if p.is_relative_to(root) else str(p)) for p in files]
    path = Path(target)
    if not path.exists():
        raise CepeError(f"source {spec.spec!r}: no such file or directory")
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and file_format(p)[0] and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise CepeError(f"source {spec.spec!r}: directory holds no file of a supported type "
                            f"({', '.join(FORMATS)}, optionally {', '.join(COMPRESSIONS)})")
        return [(p, str(p.relative_to(path))) for p in files]
    if not file_format(path)[0]:
        raise CepeError(f"{path}: unsupported file type (expected {', '.join(FORMATS)}, optionally "
                        f"compressed {', '.join(COMPRESSIONS)})")
    return [(path, path.name)]


# --------------------------------------------------------------------------------------------
# reading files


class _CheckedStream(io.RawIOBase):
    """Wraps a decompressing stream so that a file that is not what its suffix says (or is
    truncated) raises a CepeError naming the file, whichever line it happens on."""

    def __init__(self, raw: Any, path: Path, what: str) -> None:
        self.raw, self.path, self.what = raw, path, what

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            data = self.raw.read(len(b))
        except (OSError, EOFError, zlib.error, ValueError) as exc:
            raise CepeError(f"{self.path}: not valid {self.what} data ({exc}); expected a "
                            f"{self.what}-compressed file because of its suffix") from None
        except Exception as exc:  # zstandard.ZstdError is not an OSError
            raise CepeError(f"{self.path}: not valid {self.what} data ({exc}); expected a "
                            f"{self.what}-compressed file because of its suffix") from None
        n = len(data)
        b[:n] = data
        return n

    def close(self) -> None:
        try:
            self.raw.close()
        finally:
            super().close()


def open_binary(path: Path) -> io.BufferedReader:
    """The decompressed bytes of a file, chosen by its suffix (.gz, .zst or none)."""
    _, comp = file_format(path)
    if comp == ".gz":
        return io.BufferedReader(_CheckedStream(gzip.open(path, "rb"), path, "gzip"), 1 << 20)
    if comp == ".zst":
        import zstandard

        fh = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(fh, closefd=True)
        return io.BufferedReader(_CheckedStream(reader, path, "zstd"), 1 << 20)
    return open(path, "rb", buffering=1 << 20)


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def iter_json_lines(fh: Any, path: Path, text_field: str, id_field: str, skips: Skips) -> Iterator[tuple[str, str]]:
    """`(local id, text)` per good line of a JSON-lines stream."""
    good = 0
    first_bad: str | None = None
    for lineno, raw in enumerate(fh, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError as exc:
            detail = f"not UTF-8 (byte {raw[exc.start:exc.start + 1]!r} at column {exc.start + 1})"
            first_bad = first_bad or f"line {lineno}: {detail}"
            skips.add("bad_utf8", str(path), lineno, detail)
            continue
        except ValueError as exc:
            detail = f"malformed JSON ({exc})"
            first_bad = first_bad or f"line {lineno}: {detail}"
            skips.add("malformed_json", str(path), lineno, detail)
            continue
        if not isinstance(obj, dict):
            detail = f"expected a JSON object, got {type(obj).__name__}"
            first_bad = first_bad or f"line {lineno}: {detail}"
            skips.add("malformed_json", str(path), lineno, detail)
            continue
        if text_field not in obj:
            if good == 0 and first_bad is None:
                raise CepeError(f"{path} line {lineno}: no field {text_field!r} (fields: "
                                f"{', '.join(sorted(map(str, obj))) or 'none'}); set text_field")
            skips.add("missing_text_field", str(path), lineno, f"no field {text_field!r}")
            continue
        text = obj[text_field]
        if not isinstance(text, str):
            skips.add("text_not_string", str(path), lineno, f"field {text_field!r} is {type(text).__name__}, expected a string")
            continue
        if (b"\\ud" in raw or b"\\uD" in raw) and _has_lone_surrogate(text):
            skips.add("bad_utf8", str(path), lineno, "unpaired UTF-16 surrogate escape")
            continue
        good += 1
        ident = obj.get(id_field)
        yield (str(ident) if ident is not None else str(lineno)), text
    if good == 0 and first_bad is not None:
        raise CepeError(f"{path}: no valid JSON line ({first_bad}); expected JSON lines with a {text_field!r} field")


def iter_json_array(fh: Any, path: Path, text_field: str, id_field: str, skips: Skips) -> Iterator[tuple[str, str]]:
    """`(local id, text)` per object of a file holding one JSON array."""
    data = fh.read()
    try:
        items = json.loads(data)
    except UnicodeDecodeError as exc:
        raise CepeError(f"{path}: not UTF-8 (byte offset {exc.start}); expected UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise CepeError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg}); expected an array of objects or JSON lines") from None
    if not isinstance(items, list):
        raise CepeError(f"{path}: expected a JSON array of objects (or JSON lines), got a {type(items).__name__}")
    good = 0
    for i, obj in enumerate(items):
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            if good == 0 and isinstance(obj, dict) and text_field not in obj:
                raise CepeError(f"{path} item {i}: no field {text_field!r} (fields: {', '.join(sorted(obj)) or 'none'}); set text_field")
            skips.add("missing_text_field", str(path), None, f"item {i}: no string field {text_field!r}")
            continue
        good += 1
        ident = obj.get(id_field)
        yield (str(ident) if ident is not None else str(i)), obj[text_field]


def iter_parquet(path: Path, text_field: str, id_field: str, skips: Skips) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CepeError(f"{path}: not a Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise CepeError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); set text_field")
    columns = [text_field] + ([id_field] if id_field in names and id_field != text_field else [])
    row = 0
    for batch in pf.iter_batches(batch_size=256, columns=columns):
        texts = batch.column(text_field).to_pylist()
        ids = batch.column(id_field).to_pylist() if len(columns) > 1 else [None] * len(texts)
        for text, ident in zip(texts, ids):
            row += 1
            if not isinstance(text, str):
                skips.add("text_not_string", str(path), row, f"column {text_field!r} is {type(text).__name__}, expected a string")
                continue
            yield (str(ident) if ident is not None else str(row)), text


def iter_file(path: Path, text_field: str, id_field: str, skips: Skips) -> Iterator[tuple[str, str]]:
    """`(local id, text)` of every document in one file, by its format."""
    fmt, _ = file_format(path)
    if fmt == ".parquet":
        if file_format(path)[1]:
            raise CepeError(f"{path}: compressed Parquet is not supported (Parquet compresses itself)")
        yield from iter_parquet(path, text_field, id_field, skips)
        return
    with open_binary(path) as fh:
        if fmt == ".txt":
            data = fh.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CepeError(f"{path}: not UTF-8 text (byte {data[exc.start:exc.start + 1]!r} at offset {exc.start})") from None
            yield "", text
            return
        if fmt == ".json":
            head = fh.peek(64)[:64].lstrip()
            if head.startswith(b"["):
                yield from iter_json_array(fh, path, text_field, id_field, skips)
                return
        yield from iter_json_lines(fh, path, text_field, id_field, skips)


def iter_hf(spec: SourceSpec, skips: Skips) -> Iterator[tuple[str, str]]:
    """Documents of a Hugging Face dataset, streamed (`datasets.load_dataset(streaming=True)`)."""
    import datasets

    kwargs: dict[str, Any] = {"split": spec.hf_split, "streaming": True}
    if spec.data_files:
        kwargs["data_files"] = spec.data_files
    try:
        ds = datasets.load_dataset(spec.target, spec.hf_config, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub/offline/builder errors all mean "cannot load"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CepeError(f"source {spec.spec!r}: cannot load the dataset ({type(exc).__name__}: {first}); "
                        f"expected a dataset reachable from here (hub names need network)") from None
    where = f"source {spec.spec!r}"
    good = 0
    it = iter(ds)
    index = 0
    while True:
        try:
            ex = next(it)
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001 - a file of the dataset cannot be read
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CepeError(f"{where}: reading failed at example {index} ({type(exc).__name__}: {first})") from None
        if spec.text_field not in ex:
            raise CepeError(f"{where}: no field {spec.text_field!r} (fields: {', '.join(sorted(ex))}); set text_field")
        text = ex[spec.text_field]
        if not isinstance(text, str):
            skips.add("text_not_string", where, index, f"field {spec.text_field!r} is {type(text).__name__}")
        else:
            good += 1
            ident = ex.get(spec.id_field)
            yield (str(ident) if ident is not None else str(index)), text
        index += 1


def iter_source(spec: SourceSpec, index: int, skips: Skips) -> Iterator[Document]:
    """All documents of one source, labelled with their id and domain."""
    if spec.kind == "embedded":
        for name, path, domain in embedded_files(spec.target or None):
            dom = spec.domain or domain
            for local, text in iter_file(path, spec.text_field, spec.id_field, skips):
                yield Document(f"{name}:{local}", dom, text, index)
    elif spec.kind == "hf":
        label = spec.target if not spec.hf_config else f"{spec.target}:{spec.hf_config}"
        for local, text in iter_hf(spec, skips):
            yield Document(f"{label}:{local}", spec.domain, text, index)
    else:
        for path, rel in resolve_files(spec):
            for local, text in iter_file(path, spec.text_field, spec.id_field, skips):
                yield Document(f"{rel}:{local}" if local else rel, spec.domain, text, index)


def check_sources(specs: list[SourceSpec]) -> None:
    """Fail before any work on a path that does not exist (and the like)."""
    for spec in specs:
        if spec.kind == "files":
            resolve_files(spec)
        elif spec.kind == "hf" and not _is_packaged_builder(spec.target):
            from pipeline.hub import require_local_or_hub

            require_local_or_hub(spec.target, "source", repo_type="dataset", label=f"source {spec.spec!r}")


def _is_packaged_builder(name: str) -> bool:
    """`hf:json`, `hf:parquet`, ...: builders inside `datasets` that read `data_files`, no hub."""
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    except ImportError:
        return name in ("json", "csv", "parquet", "text", "arrow", "pandas")
    return name in _PACKAGED_DATASETS_MODULES


def interleave(specs: list[SourceSpec], skips: Skips) -> Iterator[Document]:
    """All sources as one stream, each source's share of characters proportional to its weight.

    Deterministic (no random draws): the next document comes from the source that has
    delivered the fewest characters per unit of weight so far (ties: the earlier source). A
    source that runs out drops out; the others go on until all are exhausted, so weights shape
    the mixture while a budget (`max_documents` / `max_tokens`) cuts the stream, and every
    document is read once when there is none.
    """
    iters = {i: iter_source(s, i, skips) for i, s in enumerate(specs)}
    used = {i: 0.0 for i in iters}
    while iters:
        i = min(iters, key=lambda k: (used[k] / specs[k].weight, k))
        doc = next(iters[i], None)
        if doc is None:
            del iters[i]
            continue
        used[i] += len(doc.text) + 1
        yield doc
