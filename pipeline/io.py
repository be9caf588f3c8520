"""Atomic file and directory writes, shared by every stage.

A stage never leaves a half-written output: files are written to a temporary name in the same
directory and renamed into place (rename is atomic on POSIX within one filesystem); directories
are built under a temporary sibling name and renamed when complete.

Temporary names are `.<name>.<pid>.<random>.tmp`: a process killed with -9 cannot remove its own,
so the next write of the same output (`remove_stale_temps`, called by `atomic_directory`, and
by the training loop at start) removes those whose process is gone, and says so on stderr.
JSON is written strict: NaN and infinities become null (`finite_or_null`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.errors import CepeError

# "No space left on device" and "disk quota exceeded": the disk, not the program, is at fault.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def remove_stale_temps(path: str | os.PathLike[str], log: Callable[[str], None] = _err) -> list[Path]:
    """Remove the temporary siblings an interrupted earlier write of `path` left; say so.

    Only this module's own names for `path` (`.<name>.<pid>.<random>.tmp`, and the pid-less
    `.<name>.<random>.tmp` of earlier versions) whose process is no longer running; and when
    `path` is missing but `.<name>.old` exists (killed between the two renames of
    `atomic_directory`), the old version is put back. Returns what was removed.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:(\d+)\.)?[A-Za-z0-9_]+\.tmp$")
    removed = []
    for candidate in parent.iterdir():
        match = pattern.match(candidate.name)
        if not match:
            continue
        pid = match.group(1)
        if pid is not None and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue  # another live process is writing it
        if pid is not None and int(pid) == os.getpid():
            continue
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
        removed.append(candidate)
        log(f"removed {candidate}, left by an interrupted earlier run")
    old = parent / f".{path.name}.old"
    if old.is_dir() and not path.exists():
        os.replace(old, path)
        log(f"restored {path} from {old}, left by a run interrupted while replacing it")
    return removed


def finite_or_null(obj: Any) -> Any:
    """NaN/inf -> None, through dicts, lists and tuples: what strict JSON can hold."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> None:
    """Strict JSON (NaN/inf as null), written atomically."""
    text = json.dumps(finite_or_null(obj), indent=indent, sort_keys=False, default=str, allow_nan=False)
    atomic_write_text(path, text + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block completes.

    On any exception (Ctrl-C included) the temporary directory is removed and `path` is left as
    it was before.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{path}: already exists")
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def is_disk_full(exc: BaseException) -> bool:
    """True for a write that failed because the disk (or quota) is full; pyarrow's IO errors carry
    the errno only in their message."""
    if not isinstance(exc, OSError):
        return False
    return exc.errno in DISK_FULL_ERRNOS or "No space left on device" in str(exc) or "[errno 28]" in str(exc)


def _free_mib(path: Path) -> float | None:
    for candidate in (path, *path.resolve().parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free / 2**20
            except OSError:
                return None
    return None


@contextlib.contextmanager
def disk_full_as_error(path: str | os.PathLike[str], option: str = "output") -> Iterator[None]:
    """Turn a full disk inside the block into one line naming `path` and `option`.

    Meant around a stage's `atomic_directory` / atomic writes: by the time the error reaches
    here they have removed their temporary files, so the message can say nothing was left.

    Raises:
        CepeError: "OPTION: no space left on the device of PATH (N MiB free); nothing was written
            (what was there before is kept): free space or choose another --OPTION".
    """
    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        free = _free_mib(Path(path))
        room = f" ({free:.0f} MiB free)" if free is not None else ""
        raise CepeError(
            f"{option}: no space left on the device of {path}{room}; nothing was written (what was there "
            f"before is kept): free some space or choose another --{option.replace('_', '-')}"
        ) from None
