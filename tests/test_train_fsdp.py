"""The main stage on two CPU processes (gloo) with DDP (the train bench's scaling mode through the
loop's Accelerator) and with FSDP2 full sharding of the frozen decoder and the trained parts:
the same losses and trainable weights as one process reading the whole global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def test_ddp_and_fsdp_steps_equal_one_process_with_the_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(HERE / "_train_fsdp_worker.py"), str(out), "1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    from _train_fsdp_worker import STEPS, scaling, sharded_steps

    one = tmp_path / "one"
    threads = torch.get_num_threads()
    try:
        scaling(str(one), 2)  # one process, micro-batch 2 = both processes' share of each step
        ref_losses, ref_weights = sharded_steps(2, shard=False)
    finally:
        torch.set_num_threads(threads)
    rows = json.loads((out / "scaling.json").read_text())["rows"]
    single = json.loads((one / "scaling.json").read_text())["rows"]["tiny-single-1"]
    ddp = rows["tiny-ddp-2"]
    assert ddp["processes"] == 2 and len(ddp["losses"]) == STEPS
    assert ddp["decoder_tokens_per_s"] > 0 and ddp["efficiency"] is None  # no 1-process row in this table
    for a, b in zip(ddp["losses"], single["losses"]):
        assert abs(a - b) < 1e-5, (ddp["losses"], single["losses"])
    fsdp = torch.load(out / "fsdp.pt", weights_only=True)
    assert len(fsdp["losses"]) == STEPS
    for a, b in zip(fsdp["losses"], ref_losses):
        assert abs(a - b) < 1e-5, (fsdp["losses"], ref_losses)
    assert abs(ref_losses[0] - single["losses"][0]) < 1e-5  # the same model and first batch as the scaling mode
    assert fsdp["weights"].keys() == ref_weights.keys()
    for name, weight in ref_weights.items():
        torch.testing.assert_close(fsdp["weights"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    # As on a GPU: frozen weights bf16 and trainable ones fp32 in the same shard unit, bf16 autocast.
    # The losses agree; the weights up to bf16 rounding in the gradients (AdamW's first steps move
    # each weight by about lr * sign(grad), so a near-zero gradient may move one the other way).
    fsdp16 = torch.load(out / "fsdp-bf16.pt", weights_only=True)
    ref16_losses, ref16_weights = sharded_steps(2, shard=False, bf16=True)
    for a, b in zip(fsdp16["losses"], ref16_losses):
        assert abs(a - b) < 1e-4, (fsdp16["losses"], ref16_losses)
    diffs = torch.cat([(fsdp16["weights"][n] - w).abs().flatten() for n, w in ref16_weights.items()])
    assert float((diffs > 1e-5).float().mean()) < 0.01 and float(diffs.max()) < 4 * 3e-4


def test_scaling_table_efficiency_against_one_gpu_of_the_same_decoder(tmp_path):
    from pipeline.bench.train_scaling import write_scaling

    base = dict(micro_batch=1, checkpointing="decoder", step_s=1.0, encoder_tokens_per_s=1.0, losses=[])
    for decoder, strategy, n, rate in (("llama-2-7b", "single", 1, 100.0), ("llama-2-7b", "ddp", 8, 720.0),
                                       ("llama-2-7b", "fsdp", 1, 80.0), ("llama-2-7b", "fsdp", 8, 600.0),
                                       ("llama-2-13b", "fsdp", 8, 300.0)):
        report = write_scaling(tmp_path, dict(base, decoder=decoder, strategy=strategy, processes=n, decoder_tokens_per_s=rate))
    rows = report["rows"]
    assert rows["llama-2-7b-ddp-8"]["efficiency"] == 0.9  # 720 / (8 x 100)
    assert rows["llama-2-7b-fsdp-8"]["efficiency"] == 0.9375  # against FSDP's own 1-GPU row: 600 / (8 x 80)
    assert rows["llama-2-13b-fsdp-8"]["efficiency"] is None  # no 13B run on one GPU
    assert rows["llama-2-7b-ddp-8"]["tokens_per_s_per_gpu"] == 90.0
    table = (tmp_path / "scaling.md").read_text()
    assert table.count("| llama-2-7b |") == 4 and "| llama-2-13b | fsdp | 8 |" in table
