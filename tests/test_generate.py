"""A model directory that stands alone, and `cepe generate` on it (tiny CEPE model, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from _serve_helpers import CHUNK_LEN, DECODER_LEN, TEXT, save_tiny_cepe
from cepe_cli.main import cli
from pipeline.errors import CepeError


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_cepe(tmp_path_factory.mktemp("gen") / "model")


@pytest.fixture
def context_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(TEXT * 4, encoding="utf-8")
    return path


class Recorder:
    def __init__(self):
        self.writes: list[str] = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass


def test_saved_directory_loads_with_auto_classes_and_records_its_geometry(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pipeline.model  # noqa: F401 - the one import the README names

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "CepeForCausalLM"
    assert (model.config.chunk_len, model.config.decoder_len) == (CHUNK_LEN, DECODER_LEN)
    from pipeline.data.tokenize import tokenizer_hash

    assert model.config.tokenizer_record["sha256"] == tokenizer_hash(AutoTokenizer.from_pretrained(model_dir))
    with pytest.raises(CepeError, match="trained with 16-token chunks"):
        model.generate(torch.tensor([[1, 5, 6]]), encoder_input_ids=torch.ones(1, 2, 32, dtype=torch.long),
                       max_new_tokens=2)


def test_generate_streams_the_tokens_model_generate_gives(model_dir, context_file):
    from pipeline.evaluate.adapters import CepePolicy, Request, encoder_tensors, make_wrapper
    from pipeline.serve.loading import load_serving_model
    from pipeline.stages.generate import GenerateConfig, run

    out = Recorder()
    result = run(GenerateConfig(model=str(model_dir), context=[str(context_file)], prompt="Who is Emma?",
                                max_new_tokens=24, device="cpu"), out=out)
    assert len(result["tokens"]) == 24 and result["context_tokens"] > 0
    assert result["decoder_tokens"] + 24 <= DECODER_LEN  # the decoder window holds prompt + answer
    assert len([w for w in out.writes if w.strip()]) > 3  # text arrived piece by piece

    # the reference: the same inputs through CepeForCausalLM.generate with padded chunks + mask
    serving = load_serving_model(str(model_dir), device="cpu")
    tok = serving.tokenizer
    prepared = CepePolicy(tok, DECODER_LEN, CHUNK_LEN, 512, make_wrapper("none", tok)).prepare(
        Request(prompt=context_file.read_text() + "\n\nWho is Emma?", max_new_tokens=24, chat=False))
    enc_ids, enc_mask = encoder_tensors([prepared.encoder_chunks], CHUNK_LEN, tok.pad_token_id, "cpu")
    ref = serving.model.generate(torch.tensor([prepared.input_ids]), encoder_input_ids=enc_ids,
                                 encoder_attention_mask=enc_mask, max_new_tokens=24, do_sample=False,
                                 eos_token_id=[-1], pad_token_id=tok.pad_token_id)
    assert result["tokens"] == ref[0, len(prepared.input_ids):].tolist()
    assert "".join(out.writes).strip() == tok.decode(result["tokens"], skip_special_tokens=True).strip()
    plain = run(GenerateConfig(model=str(model_dir), prompt="Who is Emma?", max_new_tokens=24, device="cpu"),
                out=Recorder())
    assert plain["tokens"] != result["tokens"]  # the context is read


def test_generate_cli(model_dir, context_file, tmp_path):
    args = ["generate", "--model", str(model_dir), "--context", str(context_file), "--max-new-tokens", "8",
            "--device", "cpu", "--params", str(tmp_path / "none.yaml")]
    (tmp_path / "none.yaml").write_text("{}\n")
    result = CliRunner().invoke(cli, args + ["--prompt", "Who is Emma?"])
    assert result.exit_code == 0, result.output
    assert "[8 tokens, length;" in result.output

    from_stdin = CliRunner().invoke(cli, args, input="Who is Emma?")
    assert from_stdin.exit_code == 0 and from_stdin.stdout == result.stdout and result.stdout.strip()

    chat = CliRunner().invoke(cli, args + ["--prompt", "Who is Emma?", "--chat", "true", "--sampling", "true"])
    assert chat.exit_code == 0, chat.output


@pytest.mark.parametrize("extra, message", [
    (["--chunk-len", "32"], "trained with 16-token chunks"),
    (["--context", "missing.txt"], "context[1]: missing.txt is not a file"),
    (["--decoder-len", "4096"], "decoder_len: 4096 exceeds the decoder's 256 positions"),
    (["--tokenizer", "MODEL/../other-tok"], "is not the tokenizer"),
])
def test_generate_refuses_with_one_line(model_dir, context_file, tmp_path, extra, message):
    if "MODEL/../other-tok" in extra:  # a tokenizer with another vocabulary hash
        from transformers import AutoTokenizer

        other = AutoTokenizer.from_pretrained(model_dir)
        other.add_tokens(["<extra-token>"])
        other.save_pretrained(tmp_path / "other-tok")
        extra = ["--tokenizer", str(tmp_path / "other-tok")]
    (tmp_path / "none.yaml").write_text("{}\n")
    result = CliRunner().invoke(cli, ["generate", "--model", str(model_dir), "--context", str(context_file),
                                      "--prompt", "Q", "--device", "cpu", "--params", str(tmp_path / "none.yaml"),
                                      *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.output


def test_a_directory_without_tokenizer_or_of_another_kind_is_refused(model_dir, tmp_path):
    from pipeline.serve.loading import load_serving_model

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((model_dir / name).read_bytes())
    with pytest.raises(CepeError, match="holds no tokenizer"):
        load_serving_model(str(bare), device="cpu")
    config = json.loads((model_dir / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps(config["decoder_config"]))
    with pytest.raises(CepeError, match="not a CEPE model"):
        load_serving_model(str(bare), device="cpu")


def test_training_stages_save_tokenizer_and_geometry(tmp_path):
    """The loop's save hook of every stage (pipeline/train/model_output.py) on a dataset whose
    manifest names the embedded tokenizer."""
    from pipeline.data.tokenize import load_tokenizer, tokenizer_info
    from pipeline.train.model_output import model_saver

    from conftest import tiny_cepe

    class Shards:
        manifest = {"tokenizer": tokenizer_info(load_tokenizer("embedded"), "embedded")}

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"input_ids": torch.zeros(48, dtype=torch.long), "encoder_input_ids": torch.zeros(3, 24)}

    class Wrapped:  # CepedExamples-style wrapper around the shards
        data = Shards()

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return self.data[i]

    model = tiny_cepe()
    model_saver(Wrapped(), "data/x")(model, tmp_path / "model", None)
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert (saved["chunk_len"], saved["decoder_len"]) == (24, 48)
    assert saved["tokenizer_record"]["sha256"] == Shards.manifest["tokenizer"]["sha256"]
    assert (tmp_path / "model" / "tokenizer.json").is_file()

    Shards.manifest["tokenizer"] = dict(Shards.manifest["tokenizer"], sha256="0" * 64)
    with pytest.raises(CepeError, match="the shards were made with 000000000000"):
        from pipeline.train.model_output import manifest_tokenizer

        manifest_tokenizer(Shards.manifest, "data/x")


def test_serve_binds_loopback_in_every_profile():
    """Every key of the hand-run sections is checked by tests/test_dvc_pipeline.py (the registry);
    here: the server listens on loopback unless a user says otherwise."""
    from pathlib import Path

    from pipeline.config import read_params
    from pipeline.profiles import render

    root = Path(__file__).resolve().parent.parent
    for profile in ("cpu", "tiny", "gpu", "paper"):
        import yaml

        assert yaml.safe_load(render(profile, root))["serve"]["host"] == "127.0.0.1", profile
    assert read_params(root / "params.yaml")["serve"]["host"] == "127.0.0.1"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_decode_on_gpu_gives_the_tokens_of_the_plain_path(model_dir, context_file):
    """`cepe generate` on a GPU packs the decoder and uses the split-KV attention: same tokens."""
    from pipeline.stages.generate import GenerateConfig, run

    common = dict(model=str(model_dir), context=[str(context_file)], prompt="Who is Emma?", max_new_tokens=24,
                  device="cuda", dtype="bfloat16")
    fast = run(GenerateConfig(fast_decode=True, **common), out=Recorder())
    plain = run(GenerateConfig(fast_decode=False, **common), out=Recorder())
    assert len(fast["tokens"]) == 24 and fast["tokens"] == plain["tokens"]
