"""The embedded default corpus: public-domain books that ship inside the package.

`pipeline/resources/corpus/` holds three gzip'd JSON-lines files (see its README for provenance
and licence). The source spec `embedded` reads all three, `embedded:NAME` one of them; each has a
fixed domain name so that the manifest's per-domain counts read naturally.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import CepeError

CORPUS_DIR = Path(__file__).resolve().parent.parent / "resources" / "corpus"

# name -> (file, domain). Order is the order `embedded` reads them in.
EMBEDDED: dict[str, tuple[str, str]] = {
    "austen": ("austen.jsonl.gz", "books"),
    "kjv": ("kjv.jsonl.gz", "bible"),
    "abs-guide": ("abs-guide.jsonl.gz", "manual"),
}


def embedded_files(name: str | None = None) -> list[tuple[str, Path, str]]:
    """`[(name, path, domain)]` for `embedded` (name None) or `embedded:NAME`."""
    names = list(EMBEDDED) if name in (None, "", "all") else [name]
    out = []
    for n in names:
        if n not in EMBEDDED:
            raise CepeError(f"source 'embedded:{n}': unknown embedded corpus (expected one of {', '.join(EMBEDDED)})")
        fname, domain = EMBEDDED[n]
        path = CORPUS_DIR / fname
        if not path.is_file():
            raise CepeError(f"{path}: embedded corpus file missing from the installation")
        out.append((n, path, domain))
    return out
