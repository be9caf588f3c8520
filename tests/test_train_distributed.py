"""Two CPU processes through `accelerate launch` (gloo DDP) train exactly like one process that
reads both processes' share of each batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def test_two_process_gloo_run_equals_one_process_with_the_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(HERE / "_train_ddp_worker.py"), str(two), "1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["samples_seen"] == 4 * 2
    # every process's RNG state, as safetensors + JSON (pipeline.train.state_files: no pickle)
    assert sorted(p.name for p in (two / "checkpoints" / "step-4").glob("rng-*")) == \
        ["rng-0.json", "rng-0.safetensors", "rng-1.json", "rng-1.safetensors"]

    from _train_ddp_worker import main

    one = tmp_path / "one"
    threads = torch.get_num_threads()
    try:
        main(str(one), 2)  # one process reading both processes' share of every batch
    finally:
        torch.set_num_threads(threads)
    a = torch.load(two / "trainable-final.pt")
    b = torch.load(one / "trainable-final.pt")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    ma = json.loads((one / "metrics.json").read_text())
    assert abs(ma["val_loss"] - metrics["val_loss"]) < 1e-5  # validation sums over both processes
