"""Benchmark `cepe prepare-data` against plain `tokenizer(texts)` over the same text.

For each corpus size it builds a directory of JSON-lines files from real text (the corpora in
`../shared/data` beside the checkout when present, else the embedded corpus), every copy of a
document made distinct by a one-line header so that de-duplication keeps it. Then, each in a
fresh process whose whole process tree is sampled for memory (sum of PSS, so pages shared by
forked workers count once):

- `threads`: plain `tokenizer(batch)` over ~1 MB batches, in one process (the fast tokenizer
  uses its own threads);
- `pool`: the same plain call in a pool of one process per core (what the stage does);
- `fast`: the tokenizer call the stage itself makes (`backend_tokenizer.encode_batch_fast`, no
  character offsets, no attention mask) in the same pool: tokenization alone, the floor;
- `stage`: `pipeline.stages.prepare_data.run` with the params.yaml defaults (mix prevdoc:concat
  2:1, decoder 512, encoder 8 x 256) reading those files and writing shards.

The texts for the baselines are read into memory before their clock starts; the stage's clock
includes reading, decompressing, hashing, filtering, windowing and writing. Tokenizer loading
(and the `transformers` import) happens before every clock. Overhead = stage wall time /
fastest plain baseline (`threads`, `pool`) wall time - 1, as the issue asks; overhead beyond
tokenization proper = stage / `fast` - 1. Results go to a JSON file; docs/results/prepare-data.md quotes
them.

    python benchmarks/bench_prepare.py --sizes-mb 50 200 --out docs/results/prepare-data.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"


# --------------------------------------------------------------------------------------------
# corpus


def source_documents() -> list[str]:
    files = sorted(SHARED.glob("*.jsonl.gz")) if SHARED.is_dir() else []
    if not files:
        files = sorted((REPO / "pipeline" / "resources" / "corpus").glob("*.jsonl.gz"))
    texts = []
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            texts += [json.loads(line)["text"] for line in fh]
    return [t for t in texts if t.strip()]


def build_corpus(folder: Path, size_mb: float, file_mb: float = 25.0) -> dict:
    """JSON-lines files holding at least `size_mb` MB of text (UTF-8 characters counted)."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = source_documents()
    target = int(size_mb * 1e6)
    written = n_docs = copy = 0
    fh, fbytes, fidx = None, 0, 0
    while written < target:
        for i, text in enumerate(docs):
            if fh is None or fbytes >= file_mb * 1e6:
                if fh:
                    fh.close()
                fh = open(folder / f"part-{fidx:04d}.jsonl", "w", encoding="utf-8")
                fidx, fbytes = fidx + 1, 0
            body = f"[copy {copy}]\n{text}"
            line = json.dumps({"id": f"{copy}-{i}", "text": body}, ensure_ascii=False) + "\n"
            fh.write(line)
            fbytes += len(line)
            written += len(body.encode("utf-8"))
            n_docs += 1
            if written >= target:
                break
        copy += 1
    fh.close()
    return {"text_mb": round(written / 1e6, 1), "documents": n_docs, "files": fidx}


def read_texts(folder: Path) -> list[str]:
    texts = []
    for f in sorted(folder.glob("*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            texts += [json.loads(line)["text"] for line in fh]
    return texts


def batches(texts: list[str], max_chars: int = 1_000_000):
    b, n = [], 0
    for t in texts:
        b.append(t)
        n += len(t)
        if n >= max_chars:
            yield b
            b, n = [], 0
    if b:
        yield b


# --------------------------------------------------------------------------------------------
# the three measured runs (each in its own process)


def cpu_seconds() -> float:
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


_TOK = None


def _pool_init() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _pool_work(batch: list[str]) -> int:
    return sum(len(x) for x in _TOK(batch)["input_ids"])


def _fast_work(batch: list[str]) -> int:
    encs = _TOK.backend_tokenizer.encode_batch_fast(batch, add_special_tokens=False)
    return sum(len(e.ids) for e in encs)


def child(mode: str, corpus: Path, output: Path) -> dict:
    global _TOK
    from pipeline.data.tokenize import load_tokenizer

    _TOK = tok = load_tokenizer("embedded")
    if mode == "stage":
        from pipeline.config import load_config
        from pipeline.stages.prepare_data import PrepareConfig, run

        cfg = load_config(PrepareConfig, "prepare", REPO / "params.yaml",
                          {"source": [str(corpus)], "output": str(output), "num_proc": 0})
        t0, c0 = time.perf_counter(), cpu_seconds()
        summary = run(cfg)
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "cpu_s": cpu_seconds() - c0, "documents": summary["documents"]["kept"],
                "tokens": summary["documents"]["tokens"], "rows": summary["rows"], "bytes": summary["bytes"],
                "drops": summary["drops"]}
    texts = read_texts(corpus)
    t0, c0 = time.perf_counter(), cpu_seconds()
    if mode == "threads":
        tokens = sum(sum(len(x) for x in tok(b)["input_ids"]) for b in batches(texts))
    else:
        import multiprocessing

        work = _fast_work if mode == "fast" else _pool_work
        with multiprocessing.get_context("fork").Pool(os.cpu_count(), initializer=_pool_init) as pool:
            tokens = sum(pool.imap(work, batches(texts)))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "cpu_s": cpu_seconds() - c0, "documents": len(texts), "tokens": tokens}


def measure(mode: str, corpus: Path, output: Path) -> dict:
    """Run `child(mode)` in a fresh process; sample the PSS of its process tree every 0.2 s."""
    import psutil

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, str(corpus), str(output)],
                            stdout=subprocess.PIPE, env=env, cwd=REPO)
    peak = {"pss": 0, "rss_main": 0}
    done = threading.Event()

    def sample() -> None:
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [p] + p.children(recursive=True)
                total = 0
                for q in procs:
                    try:
                        total += q.memory_full_info().pss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
                peak["pss"] = max(peak["pss"], total)
                peak["rss_main"] = max(peak["rss_main"], p.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    done.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed with status {proc.returncode}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result.update(peak_pss_mb=round(peak["pss"] / 2**20, 1), peak_rss_main_mb=round(peak["rss_main"] / 2**20, 1))
    result["tokens_per_s"] = round(result["tokens"] / result["wall_s"])
    result["documents_per_s"] = round(result["documents"] / result["wall_s"], 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[50, 200])
    ap.add_argument("--work", default=None, help="Scratch folder (default: a temporary one, removed at the end).")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "prepare-data.json"))
    ap.add_argument("--repeat", type=int, default=1, help="Runs of each mode per size; the fastest counts.")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="cepe-bench-"))
    results = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "sizes": []}
    try:
        for size in args.sizes_mb:
            corpus = work / f"corpus-{int(size)}mb"
            info = build_corpus(corpus, size)
            entry = {"corpus": info, "runs": {}}
            for _ in range(args.repeat):
                for mode in ("threads", "pool", "fast", "stage"):
                    out = work / f"shards-{int(size)}mb"
                    r = measure(mode, corpus, out)
                    shutil.rmtree(out, ignore_errors=True)
                    best = entry["runs"].get(mode)
                    if best is None or r["wall_s"] < best["wall_s"]:
                        entry["runs"][mode] = r
                    print(json.dumps({"size_mb": size, "mode": mode, **r}), flush=True)
            base = min(entry["runs"]["threads"]["wall_s"], entry["runs"]["pool"]["wall_s"])
            entry["overhead_vs_fastest_baseline"] = round(entry["runs"]["stage"]["wall_s"] / base - 1, 4)
            entry["overhead_vs_fast_tokenization"] = round(entry["runs"]["stage"]["wall_s"] / entry["runs"]["fast"]["wall_s"] - 1, 4)
            entry["cpu_overhead_vs_fast_tokenization"] = round(entry["runs"]["stage"]["cpu_s"] / entry["runs"]["fast"]["cpu_s"] - 1, 4)
            results["sizes"].append(entry)
            shutil.rmtree(corpus, ignore_errors=True)
            print(json.dumps({"size_mb": size, "overhead": entry["overhead_vs_fastest_baseline"]}), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(REPO))
        print(json.dumps(child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))))
    else:
        main()
