"""`cepe bench --train`: the training step's FLOP count (by hand and against what autograd runs),
the step itself (the loop's, frozen weights without gradients, checkpointing changes nothing), the
micro-batch search and the written report, on the CPU presets."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import tiny_cepe, tiny_decoder
from pipeline.bench.costs import Shape
from pipeline.bench.train_flops import StepShape, train_step_flops

# Stages short enough for the tiny presets (max_position_embeddings 128) and a 2-core machine.
TINY_STAGES = dict(decoder="tiny", encoder="tiny", warmup_decoder_len=32, warmup_chunks=2, warmup_chunk_len=16,
                   main_decoder_len=64, main_chunks=4, main_chunk_len=16, ceped_decoder_len=32, ceped_context_len=32,
                   ceped_chunks=4, ceped_chunk_len=16, ceped_k=8, device="cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
def test_flop_count_matches_a_hand_count():
    # decoder: 2 layers, 8 wide, 2 heads of 4 (1 KV head), FFN 16, vocab 10; encoder: 1 layer, 4 wide,
    # 1 head of 4, FFN 8. One sequence of 3 decoder tokens, 2 chunks of 2 encoder tokens (S = 4).
    dec = Shape(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, ffn=16, vocab=10)
    enc = Shape(layers=1, hidden=4, heads=1, kv_heads=1, head_dim=4, ffn=8, vocab=11)
    flops = train_step_flops(dec, enc, StepShape(1, 3, 2, 2), cross_layers=2)
    # decoder layer weights: q,o 2*8*8 = 128, k,v 2*8*4 = 64, MLP 3*8*16 = 384 -> 576
    dec_linear = 2 * 2 * 576 * 3  # 2 FLOPs x 2 layers x weights x 3 tokens = 6912
    head = 2 * 8 * 10 * 3  # logits at every position = 480
    causal = 4 * 2 * 2 * 4 * (1 + 2 + 3)  # 4 x layers x heads x d x keys seen = 384
    assert flops["decoder_forward"] == dec_linear + head + causal == 7776
    # encoder layer weights: q,o 2*4*4, k,v 2*4*4, MLP 3*4*8 -> 160; attention within 2-token chunks
    enc_fwd = 2 * 1 * 160 * 4 + 4 * 1 * 1 * 4 * (2 * 2) * 2  # 1280 + 128
    assert flops["encoder_forward"] == enc_fwd == 1408
    # cross-attention per layer: q,o 2*2*3*8*8 = 768, k,v 2*2*4*4*8 = 512, scores+values 4*3*4*8 = 384
    assert flops["cross_forward"] == 2 * (768 + 512 + 384) == 3328
    # frozen backward: layer 1 whole (576 weights, attention core 2x: 2 * 4*1*2*4*6), layer 0 its MLP
    # only (its self-attention is below the first cross-attention), the head once
    assert flops["decoder_backward"] == 2 * 3 * (576 + 384) + 2 * (4 * 2 * 4 * 6) + head == 6624
    assert flops["cross_backward"] == 2 * 3328 and flops["encoder_backward"] == 2 * 1408
    assert flops["teacher_forward"] == 0 and flops["recompute"] == 0
    assert flops["total"] == 1408 + 2816 + 7776 + 3328 + 6624 + 6656 == 28608
    # an online teacher reading 5 tokens and keeping 3 logits: forward only
    teacher = train_step_flops(dec, enc, StepShape(1, 3, 2, 2, teacher_tokens=5, teacher_logits=3), 2)["teacher_forward"]
    assert teacher == 2 * 2 * 576 * 5 + 2 * 8 * 10 * 3 + 4 * 2 * 2 * 4 * (5 * 6 // 2) == 12960
    # checkpointing the decoder recomputes each layer with cross-attention (all of them here) once
    ckpt = train_step_flops(dec, enc, StepShape(1, 3, 2, 2), 2, checkpointing="decoder")
    assert ckpt["recompute"] == dec_linear + causal + 3328 and ckpt["total"] == flops["total"]


@pytest.mark.parametrize("cross_layers, train_encoder", [(None, True), (1, True), (None, False), (1, False)])
def test_flop_count_equals_what_autograd_computes(cross_layers, train_encoder):
    """FlopCounterMode counts every matmul the forward and backward pass run: the count must be
    exact (eager attention computes the masked square: dense_causal), which also proves that no
    weight gradient of a frozen weight and no backward below the lowest cross-attention is run."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.train.losses import causal_lm_loss

    model = tiny_cepe(tiny_decoder(attn_implementation="eager"), init_mode="copy", num_cross_attn_layers=cross_layers,
                      train_encoder=train_encoder, attn_implementation="eager").train()
    ids = torch.randint(3, 128, (2, 8))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids,
                 encoder_input_ids=torch.randint(3, 128, (2, 3, 4)))
    with FlopCounterMode(display=False) as counter:
        loss, _ = causal_lm_loss(model, batch)
        loss.backward()
    want = train_step_flops(Shape.of(model.decoder.config), Shape.of(model.encoder.config), StepShape(2, 8, 3, 4),
                            len(model.cross_attention_layers()), train_encoder=train_encoder, dense_causal=True)
    assert counter.get_total_flops() == want["total"]
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_flop_count_of_ceped_with_the_online_teacher():
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.bench.train_step import StageInputs, StageTask

    model = tiny_cepe(tiny_decoder(attn_implementation="eager"), init_mode="copy", attn_implementation="eager").train()
    stage = StageInputs("ceped_online", 8, 3, 4, context_masking=False, teacher_context=6, k=5)
    task = StageTask(stage, model)
    batch = task.batch(0, 2, torch.device("cpu"))
    assert batch["teacher_input_ids"].shape == (2, 14)
    with FlopCounterMode(display=False) as counter:
        loss, metrics = task.compute_loss(model, batch)
        loss.backward()
    want = train_step_flops(Shape.of(model.decoder.config), Shape.of(model.encoder.config),
                            StepShape(2, 8, 3, 4, teacher_tokens=14, teacher_logits=8), 2, dense_causal=True)
    assert counter.get_total_flops() == want["total"] and want["teacher_forward"] > 0
    assert metrics["kl"] >= 0


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------
def _stage(name: str):
    from pipeline.bench.train_step import stage_inputs
    from pipeline.stages.bench import BenchTrainConfig

    return stage_inputs(BenchTrainConfig(**TINY_STAGES, stages=[name]))[name]


@pytest.mark.parametrize("stage_name", ["warmup", "main", "ceped_online", "ceped_precomputed"])
def test_checkpointing_keeps_the_loss_and_the_gradients(stage_name):
    """Every checkpointing mode the bench compares computes the same loss and the same gradients
    of the trainable parameters (and none of the frozen ones)."""
    from pipeline.bench.train_step import StageTask, set_checkpointing

    model = tiny_cepe(init_mode="copy").train()
    task = StageTask(_stage(stage_name), model)
    batch = task.batch(0, 2, torch.device("cpu"))
    if stage_name == "main":  # the stages' context masking reaches the encoder as padding
        assert (batch["encoder_attention_mask"] == 0).any() or task.stage.context_masking
    results = {}
    for mode in ("none", "decoder", "all"):
        set_checkpointing(model, mode)
        model.zero_grad(set_to_none=True)
        loss, _ = task.compute_loss(model, batch)
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    base_loss, base_grads = results["none"]
    for mode in ("decoder", "all"):
        loss, grads = results[mode]
        torch.testing.assert_close(loss, base_loss, rtol=0, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, base_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_lean_norms_keep_loss_and_gradients_and_keep_fewer_tensors():
    """The norms recomputed in the backward pass (cross_attention.lean_norm): bitwise the same loss
    and gradients under bf16 autocast with bf16 frozen weights (as the stages train), fewer bytes
    kept for the backward pass."""
    from pipeline.model import cross_attention
    from pipeline.train.loop import _cast_frozen
    from pipeline.train.losses import causal_lm_loss

    ids = torch.randint(3, 128, (2, 32))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, encoder_input_ids=torch.randint(3, 128, (2, 4, 8)))
    results = {}
    try:
        for lean in (False, True):
            cross_attention.LEAN_NORMS = lean
            model = tiny_cepe(init_mode="copy").train()
            _cast_frozen(model, torch.bfloat16)
            kept = [0]

            def pack(t):
                kept[0] += t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss, _ = causal_lm_loss(model, batch)
            loss.backward()
            results[lean] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, kept[0])
    finally:
        cross_attention.LEAN_NORMS = True
    (loss_a, grads_a, kept_a), (loss_b, grads_b, kept_b) = results[False], results[True]
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    assert kept_b < kept_a


def test_train_step_updates_trainable_weights_as_the_loop_does(tmp_path):
    """One bench step = one loop step (grad_accum 1) on the same batch: same loss, same weights after."""
    from pipeline.bench.train_step import StageTask, TrainStep
    from pipeline.train.loop import LoopOptions, TrainTask, run_training

    stage = _stage("main")
    a, b = tiny_cepe(init_mode="copy", seed=3), tiny_cepe(init_mode="copy", seed=3)
    task = StageTask(stage, a)
    examples = task.examples(0, 2)
    options = dict(max_steps=1, batch_size=2, progress=False, warmup_ratio=0.0, lr_schedule="constant", mixed_precision="no")
    step = TrainStep(a.train(), torch.device("cpu"), bf16=False, options=LoopOptions(**options))
    out = step(task.collate(examples), task.compute_loss)

    # The loop serves the same two examples (its KeyedDataset adds the same _epoch/_index keys, so
    # the context masking is the same; the order within the batch does not change a mean loss).
    data = [{k: v for k, v in e.items() if not k.startswith("_")} for e in examples]
    fixed = StageTask(stage, b)
    loop = run_training(TrainTask(model=b, train_data=data, collate=fixed.collate, compute_loss=fixed.compute_loss),
                        LoopOptions(output=str(tmp_path / "loop"), **options))
    assert loop["loss_first"] == pytest.approx(float(out["loss"]), abs=1e-6)
    wb = dict(b.named_parameters())
    for name, p in a.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, wb[name], rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------
# The run and its report
# ---------------------------------------------------------------------------------------------
def _cli_args(out, **extra):
    args = ["bench", "--train"]
    for key, value in {**TINY_STAGES, "max_micro_batch": 2, "timed_steps": 1, "output_dir": str(out), **extra}.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


def test_cli_train_mode_writes_a_well_formed_report(tmp_path, monkeypatch):
    from cepe_cli.main import cli

    monkeypatch.chdir(tmp_path)  # no params.yaml here: defaults + options only
    out = tmp_path / "results"
    result = CliRunner().invoke(cli, _cli_args(out, checkpointing="all"))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench_train.json").read_text())
    assert report["complete"] is True
    assert set(report["stages"]) == {"warmup", "main", "ceped_online", "ceped_precomputed"}
    assert report["stages"]["ceped_online"]["teacher_tokens"] == 64
    cells = report["cells"]
    assert [(c["stage"], c["checkpointing"], c["lean_norms"]) for c in cells] == [
        (s, "all", True) for s in ("warmup", "main", "ceped_online", "ceped_precomputed")] + [("main", "all", False)]
    assert set(report["speed_fixes"]) == {"checkpointing", "on", "off"}  # the baseline cell, compared
    cells = cells[:-1]
    for cell in cells:
        assert cell["micro_batch"] == 2 and set(cell["tried"]) == {"1", "2"}
        times = cell["times_s"]
        assert times["step"] > 0 and times["encoder_forward"] > 0 and times["backward"] > 0 and times["optimizer"] > 0
        assert times["step"] == pytest.approx(sum(times[p] for p in ("teacher", "encoder_forward", "decoder_forward",
                                                                     "backward", "optimizer")), rel=1e-3)
        stage = report["stages"][cell["stage"]]
        assert cell["tokens"]["decoder"] == 2 * stage["decoder_tokens"]
        assert cell["tokens"]["encoder"] == 2 * stage["n_chunks"] * stage["chunk_len"]
        assert cell["decoder_tokens_per_s"] == pytest.approx(cell["tokens"]["decoder"] / cell["micro_step_s"], rel=1e-3)
        assert 0 < cell["mfu"] < 1 and cell["flops"]["total"] > 0 and cell["flops"]["recompute"] > 0
        assert cell["hfu"] > cell["mfu"]
        assert (cell["flops"]["teacher_forward"] > 0) == (cell["stage"] == "ceped_online")
        assert cell["accumulation"] == 64  # recipe batch 128 / micro-batch 2
    # the recipe's cost follows from the best cell's rate
    for stage, r in report["recipe"].items():
        best = report["best"][stage]
        cell = next(c for c in cells if c["stage"] == stage and c["checkpointing"] == best["checkpointing"])
        hours = r["steps"] * 128 / cell["sequences_per_s"] / 3600
        assert r["gpu_hours"] == pytest.approx(hours, abs=0.06) and r["hours"]["8"] == pytest.approx(hours / 8, abs=0.01)
    assert report["recipe"]["main"]["steps"] == 20000 and "paper" in report["recipe"]["main"]
    assert {t["target"].split(" MFU")[0] for t in report["targets"]} == {"main stage", "warm-up", "CEPED, online teacher"}
    markdown = (out / "bench_train.md").read_text()
    for section in ("## Step at the largest micro-batch that fits", "## Micro-batch search", "## The paper's recipe",
                    "## Targets"):
        assert section in markdown
    assert markdown.count("| CEPED, online teacher |") >= 2


def test_search_stops_at_the_first_out_of_memory_and_bisects(tmp_path, monkeypatch):
    from pipeline.bench import train_step
    from pipeline.bench.train_runner import TrainBench
    from pipeline.stages.bench import BenchTrainConfig

    real = train_step.TrainStep.__call__

    def limited(self, batch, compute_loss):
        if batch["input_ids"].shape[0] > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, batch, compute_loss)

    monkeypatch.setattr(train_step.TrainStep, "__call__", limited)
    config = BenchTrainConfig(**TINY_STAGES, stages=["warmup"], checkpointing=["none"], max_micro_batch=16, timed_steps=1,
                              output_dir=str(tmp_path / "out"))
    report = TrainBench(config, log=lambda _: None).run()
    cell = report["cells"][0]
    assert cell["micro_batch"] == 5  # 1, 2, 4 fit, 8 does not; bisection: 6 does not, 5 does
    assert cell["tried"]["8"] == "oom" and cell["tried"]["6"] == "oom" and cell["tried"]["5"] != "oom"
    assert set(cell["tried"]) == {"1", "2", "4", "8", "6", "5"}


def test_bad_options_are_one_line_errors(tmp_path, monkeypatch):
    from cepe_cli.main import cli

    monkeypatch.chdir(tmp_path)
    for extra, message in ((dict(stages="main,pretrain"), "bench_train.stages: expected distinct values"),
                           (dict(warmup_chunks=4, warmup_chunk_len=16), "bench_train.warmup_chunks, warmup_chunk_len"),
                           (dict(main_decoder_len=4096), "needs 4096 decoder positions")):
        result = CliRunner().invoke(cli, _cli_args(tmp_path / "x", **extra))
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["bench", "--train", "--decoder", "llama-2-7b", "--device", "cpu"])
    assert result.exit_code == 2 and "far too many to train on a CPU" in result.output


@pytest.mark.parametrize("profile", ["cpu", "tiny", "gpu", "paper"])
def test_every_profile_has_the_train_bench_section(profile):
    from pathlib import Path

    from pipeline.config import load_config
    from pipeline.stages.bench import BenchTrainConfig

    root = Path(__file__).resolve().parent.parent
    config = load_config(BenchTrainConfig, "bench_train", root / "params" / f"{profile}.yaml")
    assert (config.main_decoder_len, config.main_chunks, config.main_chunk_len) == (4096, 16, 256)


def test_the_13b_preset_is_llama_2_13b():
    from pipeline.bench.presets import decoder_config

    assert Shape.of(decoder_config("llama-2-13b")).params == 13_015_864_320
