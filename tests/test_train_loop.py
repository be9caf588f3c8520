"""The training loop on a tiny plain Llama: learning, freezing, accumulation, checkpoints, resume."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from _train_helpers import pattern_corpus
from conftest import tiny_decoder
from pipeline.train.collate import LmCollator
from pipeline.train.loop import (
    LoopOptions,
    ResumableBatchSampler,
    TrainingInterrupted,
    TrainTask,
    evaluate_nll,
    list_checkpoints,
    run_training,
)
from pipeline.train.losses import causal_lm_loss, eval_last_tokens_nll

FROZEN_PREFIXES = ("model.embed_tokens.", "model.layers.0.")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP spin contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(seed: int = 0):
    model = tiny_decoder(seed=seed)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(FROZEN_PREFIXES))
    return model


TRAIN = pattern_corpus(48, 33, seed=0)
VAL = pattern_corpus(8, 33, seed=1)


def make_task(model, compute_loss=causal_lm_loss):
    return TrainTask(model=model, train_data=TRAIN, collate=LmCollator(), compute_loss=compute_loss,
                     val_data=VAL, val_collate=LmCollator(eval_last=16), eval_nll=eval_last_tokens_nll)


def options(tmp_path, name="run", **kw):
    values = dict(output=str(tmp_path / name), max_steps=8, batch_size=4, lr=3e-3, warmup_ratio=0.1,
                  progress=False, seed=3)
    values.update(kw)
    return LoopOptions(**values)


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loss_falls_frozen_weights_bit_identical_and_outputs_written(tmp_path):
    model = make_model()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    val_before = evaluate_nll(model, VAL, LmCollator(eval_last=16), eval_last_tokens_nll, batch_size=8)
    opts = options(tmp_path, max_steps=20, lr=1e-2, eval_every=10, save_every=5, keep_checkpoints=2)
    metrics = run_training(make_task(model), opts)

    assert metrics["loss"] < metrics["loss_first"] - 0.25, metrics
    assert metrics["val_loss"] < val_before["val_loss"] - 0.15, (val_before, metrics)
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert metrics["val_tokens"] == len(VAL) * 16
    for name, p in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(p, frozen_before[name]), name
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert metrics["trainable_params"] == n_trainable

    out = tmp_path / "run"
    assert json.loads((out / "metrics.json").read_text())["steps"] == 20
    rows = (out / "steps.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:3] == ["step", "loss", "lr"] and len(rows) == 21
    assert [r.split("\t")[0] for r in (out / "validation.tsv").read_text().splitlines()[1:]] == ["10", "20"]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-15", "step-20"]

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    for name, p in reloaded.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[name]), name


def test_only_trainable_parameters_reach_the_optimizer():
    from pipeline.train.loop import build_optimizer

    model = make_model()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = build_optimizer(named, LoopOptions(weight_decay=0.1))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for _, p in named}
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert all(decays[id(p)] == (0.1 if p.ndim >= 2 else 0.0) for _, p in named)


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    a, b = make_model(), make_model()
    run_training(make_task(a), options(tmp_path, "a", max_steps=4, batch_size=4, grad_accum=1))
    run_training(make_task(b), options(tmp_path, "b", max_steps=4, batch_size=2, grad_accum=2))
    for (name, pa_), pb in zip(trainable_state(a).items(), trainable_state(b).values()):
        torch.testing.assert_close(pa_, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_killed_then_resumed_equals_uninterrupted(tmp_path):
    reference = make_model()
    run_training(make_task(reference), options(tmp_path, "ref", save_every=3))

    calls = {"n": 0}

    def crashing_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # a hard crash during step 5, after the step-3 checkpoint
            raise RuntimeError("killed")
        return causal_lm_loss(model, batch)

    model = make_model()
    with pytest.raises(RuntimeError, match="killed"):
        run_training(make_task(model, crashing_loss), options(tmp_path, "run", save_every=3))
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-3"]

    fresh = make_model()  # a new process: weights from the checkpoint, not from memory
    metrics = run_training(make_task(fresh), options(tmp_path, "run", save_every=3), resume="auto")
    assert metrics["steps"] == 8
    for (name, p), q in zip(trainable_state(reference).items(), trainable_state(fresh).values()):
        assert torch.equal(p, q), name
    steps = [r.split("\t")[0] for r in (tmp_path / "run" / "steps.tsv").read_text().splitlines()[1:]]
    assert steps == [str(i) for i in range(1, 9)]  # step 4's orphan row was cut, none duplicated


def test_sigterm_writes_a_checkpoint_and_resume_finishes_the_same(tmp_path):
    reference = make_model()
    run_training(make_task(reference), options(tmp_path, "ref"))

    calls = {"n": 0}

    def signalling_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step; the step completes first
        return causal_lm_loss(model, batch)

    with pytest.raises(TrainingInterrupted) as info:
        run_training(make_task(make_model(), signalling_loss), options(tmp_path, "run"))
    assert info.value.step == 3 and info.value.signum == signal.SIGTERM
    assert info.value.checkpoint.name == "step-3" and (info.value.checkpoint / "state.json").is_file()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored

    fresh = make_model()
    run_training(make_task(fresh), options(tmp_path, "run"), resume=str(info.value.checkpoint))
    for (name, p), q in zip(trainable_state(reference).items(), trainable_state(fresh).values()):
        assert torch.equal(p, q), name


def test_resume_auto_ignores_checkpoints_of_other_settings(tmp_path):
    run_training(make_task(make_model()), options(tmp_path, "run", max_steps=3, save_every=3))
    metrics = run_training(make_task(make_model()), options(tmp_path, "run", max_steps=3, lr=1e-3),
                           resume="auto")
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-3" / "state.json").read_text()) \
        if list_checkpoints(tmp_path / "run" / "checkpoints") else None
    assert metrics["steps"] == 3 and metrics["samples_seen"] == 12  # trained from step 0
    assert state is None  # the stale checkpoint left checkpoints/ (save_every=0 writes none) ...
    aside = list((tmp_path / "run").glob("checkpoints.superseded-*/step-3/state.json"))
    assert len(aside) == 1  # ... moved aside, not deleted


def test_sampler_slices_one_global_order_across_processes():
    single = ResumableBatchSampler(10, 4, seed=1)
    ranks = [ResumableBatchSampler(10, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    it1, its = iter(single), [iter(r) for r in ranks]
    for _ in range(5):
        assert next(it1) == next(its[0]) + next(its[1])
    resumed = iter(ResumableBatchSampler(10, 4, seed=1, start_sample=8))
    it1 = iter(single)
    next(it1), next(it1)
    assert next(resumed) == next(it1)
    keys = next(iter(ResumableBatchSampler(10, 10, seed=1)))  # one epoch = a permutation
    assert sorted(i for _, i in keys) == list(range(10)) and {e for e, _ in keys} == {0}
    assert keys != [(0, i) for i in range(10)]


def test_validation_perplexity_matches_a_hand_computation():
    model = make_model().eval()
    res = evaluate_nll(model, VAL, LmCollator(eval_last=16), eval_last_tokens_nll, batch_size=3)
    nll, count = 0.0, 0
    with torch.no_grad():
        for ex in VAL:
            ids = torch.as_tensor(ex["input_ids"], dtype=torch.long)[None]
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)  # (T, V)
            for t in range(ids.shape[1] - 16, ids.shape[1]):
                nll -= float(logp[t - 1, ids[0, t]])
                count += 1
    assert res["val_tokens"] == count
    assert res["val_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def _cepe_data(n=16, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(3, 128, 16), "encoder_input_ids": rng.integers(3, 128, (2, 8))} for _ in range(n)]


def test_gradient_checkpointing_computes_the_same_steps(tmp_path):
    from conftest import tiny_cepe

    data = _cepe_data()
    states, calls = [], []
    for ckpt in (False, True):
        model = tiny_cepe(init_mode="normal")
        count, mlp = [0], model.decoder.model.layers[0].mlp
        forward = mlp.forward

        def counting(*args, _forward=forward, _count=count, **kwargs):
            _count[0] += 1  # (forward hooks do not fire on recomputation, a patched forward does)
            return _forward(*args, **kwargs)

        mlp.forward = counting
        task = TrainTask(model=model, train_data=data, collate=LmCollator(), compute_loss=causal_lm_loss)
        run_training(task, options(tmp_path, f"gc{ckpt}", max_steps=3, gradient_checkpointing=ckpt))
        states.append(trainable_state(model))
        calls.append(count[0])
    assert calls == [3, 6]  # recomputed in the backward pass: checkpointing is really on
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_frozen_decoder_with_bf16_autocast(tmp_path):
    """The GPU recipe (frozen weights stored in bf16, fp32 trainable weights, bf16 autocast), on CPU."""
    from conftest import tiny_cepe

    model = tiny_cepe()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    task = TrainTask(model=model, train_data=_cepe_data(), collate=LmCollator(), compute_loss=causal_lm_loss)
    metrics = run_training(task, options(tmp_path, "bf16", max_steps=3, frozen_dtype="bf16", mixed_precision="bf16"))
    assert metrics["mixed_precision"] == "bf16" and math.isfinite(metrics["loss"])
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, name
        else:
            assert p.dtype == torch.bfloat16 and torch.equal(p, frozen[name].to(torch.bfloat16)), name
