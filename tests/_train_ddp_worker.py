"""Run by `accelerate launch --num_processes 2 --cpu` from test_train_distributed.py: a few loop
steps of a tiny Llama; writes the final trainable weights for the test to compare."""

from __future__ import annotations

import sys

import torch

from _train_helpers import pattern_corpus
from conftest import tiny_decoder
from pipeline.train.collate import LmCollator
from pipeline.train.loop import LoopOptions, TrainTask, run_training, save_config
from pipeline.train.losses import causal_lm_loss, eval_last_tokens_nll


def main(output: str, batch_size: int) -> None:
    torch.set_num_threads(1)
    model = tiny_decoder(seed=0)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("model.embed_tokens."))
    task = TrainTask(model=model, train_data=pattern_corpus(32, 17, seed=0), collate=LmCollator(),
                     compute_loss=causal_lm_loss, val_data=pattern_corpus(7, 17, seed=1),
                     val_collate=LmCollator(eval_last=8), eval_nll=eval_last_tokens_nll)
    options = LoopOptions(output=output, max_steps=4, batch_size=batch_size, lr=3e-3, warmup_ratio=0.25,
                          save_every=2, progress=False, seed=1)
    save_config(options)  # as the stages do: the process state is made before the loop's Accelerator
    run_training(task, options)
    torch.save({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, f"{output}/trainable-final.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
