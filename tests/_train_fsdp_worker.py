"""Run by `accelerate launch --num_processes 2` from test_train_fsdp.py (and in-process for the
1-process reference) on CPUs (gloo):

1. DDP: the train bench's scaling mode (the loop's Accelerator, DDP), two main-stage steps of the
   tiny presets; process 0 writes the row, with every step's loss, into <output>/scaling.json;
2. FSDP: the same two steps on a fresh model fully sharded with FSDP2 (`fully_shard` on the units
   docs/accelerate/fsdp.yaml names, then the root; accelerate runs FSDP on GPUs only, so here it
   is applied directly), in the process group of step 1; process 0 writes the losses and the full
   trainable weights after the steps into <output>/fsdp.pt.
"""

from __future__ import annotations

import sys

import torch

STEPS = 2
TINY = dict(decoder="tiny", encoder="tiny", main_decoder_len=32, main_chunks=2, main_chunk_len=16, device="cpu")


def scaling(output: str, micro_batch: int) -> None:
    from pipeline.stages.bench import BenchTrainConfig, run_train

    run_train(BenchTrainConfig(**TINY, scaling=True, scaling_micro_batch=micro_batch, scaling_steps=STEPS - 1,
                               output_dir=output))


def sharded_steps(micro_batch: int, shard: bool, bf16: bool = False) -> tuple[list[float], dict[str, torch.Tensor]]:
    """STEPS main-stage steps (the bench's TrainStep: the loop's optimizer, clipping, schedule),
    process r reading slice r of each global micro-batch; returns the mean losses and the full
    trainable weights after the steps. `bf16`: as the stages train on a GPU (frozen weights bf16,
    trainable fp32, bf16 autocast), so one FSDP unit holds parameters of both dtypes."""
    import torch.distributed as dist

    from pipeline.bench import presets
    from pipeline.bench.train_scaling import fsdp_unit_classes, fsdp_units
    from pipeline.bench.train_step import StageTask, TrainStep, build_model, stage_inputs
    from pipeline.stages.bench import BenchTrainConfig
    from pipeline.train.loop import LoopOptions

    world = dist.get_world_size() if shard else 1
    rank = dist.get_rank() if shard else 0
    config = BenchTrainConfig(**TINY, stages=["main"])
    dec = presets.decoder_config("tiny")
    torch.manual_seed(config.seed)  # as the scaling mode: every process builds the same weights
    model = build_model(dec, presets.encoder_config("tiny", dec.vocab_size), torch.device("cpu"), bf16=bf16)
    if shard:
        from torch.distributed.fsdp import fully_shard

        units = fsdp_units(model, fsdp_unit_classes())
        assert units, "docs/accelerate/fsdp.yaml names no layer class of the model"
        for unit in units:
            fully_shard(unit)
        fully_shard(model)
    options = LoopOptions(max_steps=1000, batch_size=micro_batch, lr_schedule="constant", warmup_ratio=0.0,
                          mixed_precision="no")
    step = TrainStep(model, torch.device("cpu"), bf16=bf16, options=options)
    task = StageTask(stage_inputs(config)["main"], model, config.seed)
    losses = []
    for i in range(STEPS):
        out = step(task.batch((i * world + rank) * micro_batch, micro_batch, torch.device("cpu")), task.compute_loss)
        loss = out["loss"].clone()
        if shard:
            dist.all_reduce(loss)
            loss /= world
        losses.append(float(loss))
    weights = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            weights[name] = full.detach().clone()
    return losses, weights


def main(output: str, micro_batch: int) -> None:
    torch.set_num_threads(1)
    scaling(output, micro_batch)
    import torch.distributed as dist

    for bf16 in (False, True):
        losses, weights = sharded_steps(micro_batch, shard=True, bf16=bf16)
        if dist.get_rank() == 0:
            torch.save({"losses": losses, "weights": weights}, f"{output}/fsdp{'-bf16' if bf16 else ''}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
