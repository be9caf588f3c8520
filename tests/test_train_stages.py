"""The three training stages end to end on tiny models and tiny shard directories (CPU, seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from _train_helpers import write_shards
from conftest import tiny_decoder


from pipeline.errors import CepeError  # noqa: E402
from pipeline.stages.pretrain_encoder import PretrainEncoderConfig  # noqa: E402
from pipeline.stages.pretrain_encoder import run as run_pretrain  # noqa: E402
from pipeline.stages.train import TrainConfig  # noqa: E402
from pipeline.stages.train import run as run_train  # noqa: E402
from pipeline.stages.warmup import WarmupConfig  # noqa: E402
from pipeline.stages.warmup import run as run_warmup  # noqa: E402

QUICK = dict(progress=False, warmup_ratio=0.1, eval_windows=8, seed=0, grad_accum=1)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny decoder and mlm / duplicate / prevdoc shard directories."""
    root = tmp_path_factory.mktemp("stages")
    decoder = tiny_decoder()
    with torch.no_grad():  # a random 0.02-init head caps every logit near 1: let it be confident
        decoder.lm_head.weight.mul_(10)
    decoder.save_pretrained(root / "decoder")
    return {
        "root": root,
        "decoder": root / "decoder",
        "mlm": write_shards(root / "mlm", "mlm", n_train=64, n_val=8, decoder_len=32),
        "duplicate": write_shards(root / "dup", "duplicate", n_train=256, n_val=8, decoder_len=32, n_chunks=4, chunk_len=8),
        "prevdoc": write_shards(root / "prev", "prevdoc", n_train=256, n_val=8, decoder_len=32, n_chunks=4, chunk_len=8),
    }


def _decoder_state(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_pretrain_encoder_learns_and_saves_a_loadable_encoder(world, tmp_path):
    config = PretrainEncoderConfig(data=str(world["mlm"]), output=str(tmp_path / "enc"), num_layers=2, hidden_size=32,
                                   intermediate_size=64, num_heads=4, max_position_embeddings=64, max_steps=25,
                                   batch_size=8, lr=1e-2, **QUICK)
    metrics = run_pretrain(config)
    assert metrics["loss"] < metrics["loss_first"] - 0.5, metrics
    assert metrics["val_ppl"] < 129  # below uniform guessing over the vocabulary + [MASK]
    # the MLM stage's inputs are encoder tokens, and its FLOPs the MLM count of its windows
    assert metrics["decoder_tokens_per_s"] == 0 and metrics["encoder_tokens_per_s"] > 0
    assert metrics["flops_per_step"] == pytest.approx(8 * metrics["flops_per_example"]) and metrics["flops_per_example"] > 0
    from pipeline.model import load_encoder

    encoder = load_encoder(tmp_path / "enc" / "model")
    assert encoder.config.vocab_size == 129 and encoder.config.mask_token_id == 128
    assert (tmp_path / "enc" / "config.yaml").is_file()


@pytest.mark.parametrize("encoder", ["random", "decoder-layers"])
def test_warmup_learns_to_copy_with_a_frozen_decoder(world, tmp_path, encoder):
    before = _decoder_state(world["decoder"])
    config = WarmupConfig(data=str(world["duplicate"]), output=str(tmp_path / "warm"), decoder=str(world["decoder"]),
                          encoder=encoder, encoder_layers=1, encoder_hidden_size=32, encoder_intermediate_size=64,
                          encoder_heads=4, max_steps=30, batch_size=16, lr=3e-3, eval_last_tokens=16, **QUICK)
    metrics = run_warmup(config)
    # Each window uses 4 random tokens: the frozen decoder alone cannot know which (its loss
    # stays at the first step's, ~6); only reading the encoder through cross-attention helps.
    assert metrics["loss"] < metrics["loss_first"] - 1.5, metrics
    assert metrics["val_loss"] < metrics["loss_first"] - 1.0, metrics
    assert metrics["eval_last_tokens"] == 16
    assert metrics["decoder_tokens_per_s"] > 0 and metrics["encoder_tokens_per_s"] > 0  # both sides counted
    assert metrics["flops_per_example"] > 0 and metrics["stopped_by"] == "max_steps"

    from pipeline.model import CepeForCausalLM

    model = CepeForCausalLM.from_pretrained(tmp_path / "warm" / "model")
    after = model.decoder.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value), name  # frozen decoder bit-identical
    assert any(".cross_attn.o_proj" in k and v.abs().sum() > 0 for k, v in after.items())  # o moved off zero


def test_train_from_warmup_with_context_masking(world, tmp_path):
    warm = WarmupConfig(data=str(world["duplicate"]), output=str(tmp_path / "warm"), decoder=str(world["decoder"]),
                        encoder="random", encoder_layers=1, encoder_hidden_size=32, encoder_intermediate_size=64,
                        encoder_heads=4, max_steps=10, batch_size=16, lr=3e-3, **QUICK)
    warm_metrics = run_warmup(warm)
    config = TrainConfig(data=[str(world["prevdoc"])], output=str(tmp_path / "train"), model=str(tmp_path / "warm"),
                         max_steps=20, batch_size=16, lr=3e-3, eval_last_tokens=16, **QUICK)
    metrics = run_train(config)
    assert metrics["loss_first"] < warm_metrics["loss_first"] - 0.3  # started from the warm-up's weights
    assert metrics["loss"] < metrics["loss_first"] - 0.3, metrics
    assert metrics["val_loss"] is not None and metrics["stage"] == "train"
    saved = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert saved["steps"] == 20 and saved["tokens_seen"] == 20 * 16 * (32 + 32)


def test_stage_inputs_are_checked_before_any_work(world, tmp_path):
    with pytest.raises(CepeError, match="^data: .*no manifest.json"):
        run_train(TrainConfig(data=[str(tmp_path / "none")], output=str(tmp_path / "t"), **QUICK))
    with pytest.raises(CepeError, match="^data: .*'duplicate'.*this stage reads 'prevdoc' or 'concat'"):
        run_train(TrainConfig(data=[str(world["duplicate"])], output=str(tmp_path / "t"), **QUICK))
    with pytest.raises(CepeError, match="^model: no such directory: .*nowhere$"):
        run_train(TrainConfig(data=[str(world["prevdoc"])], model=str(tmp_path / "nowhere"),
                              output=str(tmp_path / "t"), **QUICK))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CepeError, match="^model: .*no saved model"):
        run_train(TrainConfig(data=[str(world["prevdoc"])], model=str(tmp_path / "empty"),
                              output=str(tmp_path / "t"), **QUICK))
    with pytest.raises(CepeError, match="^encoder: no such directory: "):
        run_warmup(WarmupConfig(data=str(world["duplicate"]), decoder=str(world["decoder"]),
                                encoder=str(tmp_path / "enc"), output=str(tmp_path / "w"), **QUICK))
    assert not (tmp_path / "t").exists() and not (tmp_path / "w").exists()
