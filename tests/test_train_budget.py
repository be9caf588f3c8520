"""The loop's wall-clock budget (`max_time_s`) and its throughput / MFU figures."""

from __future__ import annotations

import math
import time

import pytest
import torch

from _train_helpers import pattern_corpus
from conftest import tiny_decoder
from pipeline.config import ConfigError
from pipeline.train.collate import LmCollator
from pipeline.train.loop import LoopOptions, TrainTask, list_checkpoints, run_training
from pipeline.train.losses import causal_lm_loss, eval_last_tokens_nll

TRAIN = pattern_corpus(32, 33, seed=0)
VAL = pattern_corpus(4, 33, seed=1)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def slow_loss(model, batch):
    time.sleep(0.05)  # every step takes at least 50 ms, so a 0.12 s budget ends within 3 steps
    return causal_lm_loss(model, batch)


def task(seed=0, flops=None):
    model = tiny_decoder(seed=seed)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("model.embed_tokens."))
    return TrainTask(model=model, train_data=TRAIN, collate=LmCollator(), compute_loss=slow_loss, val_data=VAL,
                     val_collate=LmCollator(eval_last=16), eval_nll=eval_last_tokens_nll, flops_per_example=flops)


def opts(tmp_path, name, **kw):
    values = dict(output=str(tmp_path / name), max_steps=12, batch_size=4, lr=3e-3, warmup_ratio=0.1,
                  progress=False, seed=3)
    values.update(kw)
    return LoopOptions(**values)


def test_budget_stops_at_a_step_with_a_checkpoint_and_the_schedule_of_max_steps(tmp_path):
    t = task(flops=1000.0)
    m = run_training(t, opts(tmp_path, "budget", max_time_s=0.12))
    assert m["stopped_by"] == "max_time_s"
    assert 1 <= m["steps"] < 12, m["steps"]
    assert m["wall_time_s"] >= 0.12
    ckpts = list_checkpoints(tmp_path / "budget" / "checkpoints")
    assert [p.name for p in ckpts] == [f"step-{m['steps']}"]
    assert (tmp_path / "budget" / "model" / "config.json").is_file()
    assert m["val_loss"] is not None
    # the learning rate is the max_steps schedule's at the step reached (warm-up 2 steps, cosine over 12)
    k = m["steps"]
    expected = 3e-3 * k / 2 if k < 2 else 3e-3 * 0.5 * (1 + math.cos(math.pi * (k - 2) / 10))
    assert m["lr_last"] == pytest.approx(expected)
    # throughput: decoder tokens only (no encoder input), analytic FLOPs per step, no MFU on CPU
    assert m["decoder_tokens_per_s"] == pytest.approx(m["tokens_seen"] / m["wall_time_s"])
    assert m["encoder_tokens_per_s"] == 0
    assert m["flops_per_step"] == pytest.approx(1000.0 * 4)
    assert m["model_flops_per_s"] == pytest.approx(1000.0 * m["samples_seen"] / m["wall_time_s"])
    if not torch.cuda.is_available():
        assert m["peak_flops_per_s"] is None and m["mfu"] is None


def test_a_budget_stop_resumes_to_the_uninterrupted_weights(tmp_path):
    stopped = run_training(task(), opts(tmp_path, "a", max_time_s=0.12))
    assert stopped["stopped_by"] == "max_time_s"
    # the same run with the budget lifted resumes from the budget's checkpoint (max_time_s does not
    # define the computation) and ends where a run without a budget ends
    resumed_task = task()
    resumed = run_training(resumed_task, opts(tmp_path, "a"), resume="auto")
    full_task = task()
    full = run_training(full_task, opts(tmp_path, "b"))
    assert resumed["steps"] == full["steps"] == 12 and resumed["stopped_by"] == "max_steps"
    for (n, p), (_, q) in zip(resumed_task.model.named_parameters(), full_task.model.named_parameters()):
        assert torch.equal(p, q), n


def test_a_spent_budget_trains_no_further_step_on_resume(tmp_path):
    first = run_training(task(), opts(tmp_path, "c", max_time_s=0.12))
    again = run_training(task(), opts(tmp_path, "c", max_time_s=0.12), resume="auto")
    assert again["steps"] == first["steps"] and again["stopped_by"] == "max_time_s"


def test_negative_budget_is_refused():
    with pytest.raises(ConfigError, match="max_time_s"):
        LoopOptions(max_time_s=-1)
