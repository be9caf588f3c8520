"""Resume on a GPU: a tiny Llama trained with bf16 autocast and fused AdamW, stopped by SIGTERM
mid-run and resumed, against an uninterrupted run (the CPU tests check the same bit for bit).

Checks the paths the CPU tests cannot reach: CUDA RNG states and fused-AdamW state written as
safetensors + JSON and restored, bf16 frozen weights. Prints one JSON object: the largest
difference between the two runs' losses and final trainable weights, and the checkpoint's files.

    PYTHONPATH=. python scripts/gpu_resume_check.py /tmp/resume-check     # about a minute
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.train.collate import LmCollator
from pipeline.train.loop import LoopOptions, TrainingInterrupted, TrainTask, run_training
from pipeline.train.losses import causal_lm_loss, eval_last_tokens_nll


def corpus(n: int, length: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": ((rng.integers(0, 125) + rng.integers(1, 12) * np.arange(length)) % 125 + 3).astype(np.int32)}
            for _ in range(n)]


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512))
    for name, p in m.named_parameters():
        p.requires_grad_(not name.startswith(("model.embed_tokens.", "model.layers.0.")))
    return m


def task(loss=causal_lm_loss) -> TrainTask:
    return TrainTask(model=model(), train_data=corpus(256, 129, 0), collate=LmCollator(), compute_loss=loss,
                     val_data=corpus(16, 129, 1), val_collate=LmCollator(eval_last=64), eval_nll=eval_last_tokens_nll)


def losses(out: Path) -> list[float]:
    with open(out / "steps.tsv", newline="") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh, delimiter="\t")]


class Trap:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def main(root: str) -> None:
    assert torch.cuda.is_available(), "this check is for a GPU"
    base = Path(root)
    opts = dict(max_steps=40, batch_size=8, lr=1e-3, warmup_ratio=0.1, save_every=10, eval_every=10, progress=False)
    ref = task()
    run_training(ref, LoopOptions(output=str(base / "ref"), **opts))
    calls = {"n": 0}

    def signalling(m, batch):
        calls["n"] += 1
        if calls["n"] == 25:
            os.kill(os.getpid(), signal.SIGTERM)
        return causal_lm_loss(m, batch)

    try:
        run_training(task(signalling), LoopOptions(output=str(base / "run"), **opts))
    except TrainingInterrupted as exc:
        checkpoint = exc.checkpoint
    files = sorted(p.name for p in checkpoint.iterdir())  # (pruned later by the resumed run)
    marker = base / "pwned"
    (checkpoint / "scheduler.pt").write_bytes(pickle.dumps(Trap(str(marker))))
    resumed = task()
    metrics = run_training(resumed, LoopOptions(output=str(base / "run"), **opts), resume="auto")
    a = {n: p for n, p in ref.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    la, lb = losses(base / "ref"), losses(base / "run")
    print(json.dumps({
        "device": torch.cuda.get_device_name(0),
        "resumed_at": checkpoint.name,
        "checkpoint_files": files,
        "steps": metrics["steps"],
        "loss_rows_equal_count": len(la) == len(lb),
        "max_loss_diff": max(abs(x - y) for x, y in zip(la, lb)),
        "max_weight_diff": max(float((a[n].detach().float() - b[n].detach().float()).abs().max()) for n in a),
        "weights_bit_identical": all(torch.equal(a[n], b[n]) for n in a),
        "crafted_pickle_ran": marker.exists(),
    }, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/resume-check")
