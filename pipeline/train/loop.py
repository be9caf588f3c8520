"""The one training loop of `pretrain-encoder`, `warmup`, `train` (and `distill`), on accelerate.

The stages differ only in what they hand this loop; everything else (devices, distribution,
precision, optimiser, schedule, accumulation, clipping, checkpoints, resume, signals, logging,
validation, the final save) lives here once.

API
---
    metrics = run_training(task, options, resume=None)

`options` is a `LoopOptions` (every stage config subclasses it, so its fields are params.yaml
keys of each training stage). `task` is a `TrainTask`:

- `model`: an `nn.Module` whose trainable parameters have `requires_grad=True` and nothing else
  (CEPE freezes its decoder itself). Only those parameters reach the optimiser, are saved in
  checkpoints and are restored on resume; frozen ones are cast to bf16 on GPU (`frozen_dtype`).
- `train_data` / `val_data`: map-style datasets of example dicts (a shard reader, `ZipDataset`
  of index-aligned readers, ...). The loop decides the order itself (a seeded permutation per
  epoch; `ResumableBatchSampler`), so the data position is one number, the samples consumed.
- `collate(examples) -> batch`: examples arrive with two extra keys, `_epoch` and `_index`, to
  seed any per-example randomness (see `pipeline.train.collate`). Batches are dicts of tensors;
  the loop moves every tensor to the device.
- `compute_loss(model, batch) -> (loss, metrics)`: the loss hook. `loss` is the scalar to
  minimise for this micro-batch (a mean, as the loop averages micro-batches for gradient
  accumulation); `metrics` is a dict of extra scalars (floats or 0-d tensors, e.g. `ce`, `kl`)
  averaged over micro-batches and processes and logged as extra `steps.tsv` columns. Extra
  per-batch data (a teacher's top-k columns) simply arrives in `batch`, put there by the
  dataset and collate function.
- `eval_nll(model, batch) -> (nll_sum, n_tokens)`: validation hook, summed so that perplexity
  is exact over windows and processes (default: none, no validation).
- `save_model(model, directory, state_dict)`: the final export (default `save_pretrained`).
- `tokens_in(batch) -> int`: tokens a batch processes, for tokens/s (default: every
  `*input_ids` tensor's size, decoder and encoder tokens alike).
- `token_roles`: which batch input holds whose tokens (default `input_ids` the decoder's,
  `encoder_input_ids` the encoder's; the MLM stage's `input_ids` are the encoder's), for
  `decoder_tokens_per_s` / `encoder_tokens_per_s` in `metrics.json`.
- `flops_per_example`: analytic forward + backward FLOPs of one example
  (`pipeline.train.flops`), or None; with it `metrics.json` reports FLOPs per step, achieved
  FLOP/s and MFU against the device's bf16 peak (None on CPU).

Wall-clock budget: `max_time_s` > 0 stops training at the first step boundary after that many
seconds of the loop (steps and in-loop validation, summed over resumes), with a checkpoint, as
if `max_steps` had been reached there; `metrics.json` records `steps`, `stopped_by` and the
learning rate reached. The learning-rate schedule stays defined over `max_steps`, never over
an estimate of the steps the budget allows: a step's learning rate then depends on the step
alone, so a resumed run (or one on a faster machine) follows the same schedule. A profile that
means "train for N minutes" sets `max_steps` to about what N minutes reach on its device, so
the decay mostly completes, and the budget is the guarantee that the stage ends in time.

Outputs under `options.output`: `config.yaml` (the resolved options, written once the run has
really started: data, model and checkpoint loaded and checked; a run that fails before leaves
the previous one), `checkpoints/step-N/` (`pipeline.train.checkpoints`: trainable weights,
optimiser, RNG of every process, step, data position and bookkeeping, as safetensors + JSON;
written atomically, the last `keep_checkpoints` kept), `steps.tsv`, `validation.tsv`,
`metrics.json` (strict JSON: NaN as null), `model/` (`save_pretrained`), optionally
`tensorboard/`.

Resume: `resume="auto"` takes the newest checkpoint under `output/checkpoints` if its settings
allow (`pipeline.train.checkpoints` says which may change: max_steps and the free keys), else
starts afresh with the earlier checkpoints moved aside; `resume=PATH` that checkpoint, under the
same settings check (a mismatch is an error). A run killed at step k and resumed ends with the
same weights, `steps.tsv`, `validation.tsv` and `metrics.json` (timings aside) as an
uninterrupted one: validation at step s runs before the checkpoint of step s, and a checkpoint
written before its step's validation (a signal) has it run on resume.
SIGTERM and SIGINT finish the current optimiser step, write a checkpoint and raise
`TrainingInterrupted` (the CLI exits with 128 + the signal number, no traceback); a second
SIGINT interrupts at once. A step whose loss or gradient norm is not finite is not applied: the
run stops with `TrainingDiverged` (one line), the checkpoints written so far kept. A full disk
is one line too (`CepeError`), naming the file.

Distribution: one CPU, one GPU, or several processes started by `accelerate launch` (DDP;
FSDP through an accelerate config). Each process reads its own slice of every global batch,
so N processes with micro-batch b see exactly the batches one process with micro-batch N*b sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import random
import resource
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch

from pipeline.config import ConfigError, field
from pipeline.errors import CepeError
from pipeline.io import atomic_write_json, remove_stale_temps
from pipeline.train import checkpoints as ckpt
from pipeline.train.checkpoints import CHECKPOINT_PREFIX, list_checkpoints
from pipeline.train.logging import MetricsLogger, require_tensorboard
from pipeline.train.state_files import load_state, load_tensors, save_state, save_tensors


@dataclass
class LoopOptions:
    """Options of the training loop shared by every training stage (params.yaml keys)."""

    output: str = field("runs/train", help="Output directory: model/, checkpoints/, metrics.json, steps.tsv.")
    max_steps: int = field(10, help="Optimiser steps to train for.")
    max_time_s: float = field(0.0, help="Wall-clock budget of the loop in seconds: stop (with a checkpoint) at the first "
                              "step boundary past it; 0: none. The LR schedule stays over max_steps.")
    batch_size: int = field(1, help="Sequences per process per micro-batch.")
    grad_accum: int = field(1, help="Micro-batches accumulated per optimiser step.")
    lr: float = field(3e-4, help="Peak learning rate (AdamW).")
    lr_schedule: Literal["cosine", "linear", "constant"] = field("cosine", help="Decay after warm-up.")
    warmup_ratio: float = field(0.04, help="Fraction of max_steps spent warming the learning rate up linearly.")
    min_lr_ratio: float = field(0.0, help="Cosine floor as a fraction of lr.")
    weight_decay: float = field(0.0, help="AdamW weight decay (not applied to norms and biases).")
    adam_beta1: float = field(0.9, help="AdamW beta1.")
    adam_beta2: float = field(0.999, help="AdamW beta2.")
    adam_eps: float = field(1e-8, help="AdamW epsilon.")
    max_grad_norm: float = field(1.0, help="Clip the gradient norm to this (0: no clipping).")
    mixed_precision: Literal["auto", "no", "bf16"] = field(
        "auto", help="Autocast precision: auto = bf16 on GPU, fp32 (no) on CPU.")
    frozen_dtype: Literal["auto", "bf16", "fp32"] = field(
        "auto", help="dtype of frozen weights (the decoder): auto = bf16 on GPU with bf16 autocast, else fp32.")
    gradient_checkpointing: bool = field(False, help="Recompute activations in the backward pass to save memory.")
    seed: int = field(0, help="Seed of the data order, masking and any random initialisation.")
    save_every: int = field(0, help="Write a checkpoint every N steps (0: only when interrupted).")
    keep_checkpoints: int = field(2, help="Keep only the newest K checkpoints.")
    eval_every: int = field(0, help="Validate every N steps (0: only at the end).")
    eval_windows: int = field(64, help="Held-out windows per validation (0: the whole validation split).")
    eval_batch_size: int = field(0, help="Validation batch size (0: batch_size).")
    log_every: int = field(1, help="Write a steps.tsv row every N steps.")
    tensorboard: bool = field(False, help="Also log to <output>/tensorboard (needs the tensorboard package).")
    num_workers: int = field(0, help="DataLoader worker processes.")
    progress: bool = field(True, help="Show a progress bar (main process only).")

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "grad_accum", "log_every")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected an integer >= 1, got {getattr(self, key)}")
        non_negative = ("save_every", "eval_every", "eval_windows", "eval_batch_size", "num_workers",
                        "weight_decay", "max_grad_norm", "max_time_s")
        for key in non_negative:
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: expected a value >= 0, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ConfigError(f"lr: expected a positive number, got {self.lr}")
        for key in ("lr", "weight_decay", "adam_eps", "warmup_ratio", "min_lr_ratio"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"{key}: expected a finite number, got {getattr(self, key)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: expected a fraction in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio: expected a fraction in [0, 1], got {self.min_lr_ratio}")
        if self.min_lr_ratio > 0 and self.lr_schedule != "cosine":
            raise ConfigError(f"min_lr_ratio: only applies to lr_schedule cosine, not {self.lr_schedule!r}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"{key}: expected a value in [0, 1), got {getattr(self, key)}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints: expected an integer >= 1, got {self.keep_checkpoints}")
        if not str(self.output).strip():
            raise ConfigError("output: expected a directory path")
        if self.tensorboard:
            try:
                require_tensorboard()
            except CepeError as exc:
                raise ConfigError(str(exc)) from None


class TrainingDiverged(CepeError):
    """The loss or gradient norm of a step was not finite; the step was not applied."""


class TrainingInterrupted(CepeError):
    """A signal stopped training after a checkpoint was written; `signum` says which."""

    def __init__(self, signum: int, checkpoint: Path, step: int):
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped after step {step}, checkpoint {checkpoint}; "
                         f"continue with --resume auto")
        self.signum, self.checkpoint, self.step = signum, checkpoint, step


def _count_input_tokens(batch: dict[str, Any]) -> int:
    return sum(v.numel() for k, v in batch.items() if k.endswith("input_ids") and torch.is_tensor(v))


ROLES = ("decoder", "encoder")
DEFAULT_TOKEN_ROLES = {"input_ids": "decoder", "encoder_input_ids": "encoder"}


def _tokens_by_role(batch: dict[str, Any], roles: dict[str, str]) -> dict[str, int]:
    """{role: tokens} of a batch, each input counted for the role `roles` gives it."""
    out = dict.fromkeys(ROLES, 0)
    for key, role in roles.items():
        ids = batch.get(key)
        if torch.is_tensor(ids):
            out[role] += ids.numel()
    return out


def time_budget_spent(options: "LoopOptions", elapsed_s: float) -> bool:
    """Whether `max_time_s` (0: none) is used up after `elapsed_s` seconds of the loop."""
    return options.max_time_s > 0 and elapsed_s >= options.max_time_s


def throughput_metrics(state: dict[str, Any], flops_per_example: float | None, world: int,
                       device: torch.device) -> dict[str, Any]:
    """tokens/s (all, decoder, encoder), FLOPs per step, achieved FLOP/s and MFU of a run.

    MFU = flops_per_example x samples / loop seconds / (peak x processes); the peak is the
    device's dense bf16 figure (`pipeline.train.flops.device_peak_flops`), None on CPU.
    """
    from pipeline.train.flops import device_peak_flops

    secs, steps = state["elapsed_s"], state["step"]
    rate = (lambda n: n / secs if secs else None)
    role_tokens = state.get("role_tokens") or {}
    out: dict[str, Any] = {f"{r}_tokens_per_s": rate(role_tokens.get(r, 0)) for r in ROLES}
    peak = device_peak_flops(device)
    flops = flops_per_example * state["samples"] if flops_per_example else None
    achieved = flops / secs if flops and secs else None
    out.update({
        "flops_per_example": flops_per_example,
        "flops_per_step": flops / steps if flops and steps else None,
        "model_flops_per_s": achieved,
        "device_name": peak["device_name"],
        "peak_flops_per_s": peak["peak_flops_per_s"],
        "peak_source": peak["peak_source"],
        "mfu": achieved / (peak["peak_flops_per_s"] * world) if achieved and peak["peak_flops_per_s"] else None,
    })
    return out


def _save_pretrained(model: Any, directory: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
    model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)


@dataclass
class TrainTask:
    """What a stage trains; see the module docstring for each hook's contract."""

    model: torch.nn.Module
    train_data: Any
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    compute_loss: Callable[[Any, dict[str, Any]], tuple[torch.Tensor, dict[str, Any]]]
    val_data: Any = None
    val_collate: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None
    eval_nll: Callable[[Any, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]] | None = None
    save_model: Callable[[Any, Path, dict[str, torch.Tensor] | None], None] = _save_pretrained
    tokens_in: Callable[[dict[str, Any]], int] = _count_input_tokens
    flops_per_example: float | None = None
    token_roles: dict[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_TOKEN_ROLES))
    extra_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# data order


class ResumableBatchSampler(torch.utils.data.Sampler):
    """An endless stream of micro-batches of `(epoch, index)` keys, resumable by sample count.

    Sample number s (counted over all processes) is example `perm_e[s mod n]` of epoch
    e = s // n, where `perm_e` is a permutation seeded by (seed, e). Each global micro-batch
    holds `batch_size * world_size` consecutive sample numbers; process r takes slice r.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, start_sample: int = 0):
        if n < 1:
            raise CepeError("training data: the split holds no examples")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world_size, self.start_sample = rank, world_size, start_sample
        self._perm: tuple[int, np.ndarray] | None = None

    def key(self, sample: int) -> tuple[int, int]:
        epoch, pos = divmod(sample, self.n)
        if not self.shuffle:
            return epoch, pos
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return epoch, int(self._perm[1][pos])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        s = self.start_sample + self.rank * self.batch_size
        while True:
            yield [self.key(s + j) for j in range(self.batch_size)]
            s += self.batch_size * self.world_size


class KeyedDataset(torch.utils.data.Dataset):
    """`dataset[(epoch, index)]` -> `dataset[index]` plus `_epoch` / `_index` keys."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        example = dict(self.dataset[index])
        example["_epoch"], example["_index"] = epoch, index
        return example


# ---------------------------------------------------------------------------------------------
# checkpoints


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])  # (version, tuple of 625 ints, gauss): state_files keeps tuples
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# the loop


def _make_accelerator(options: LoopOptions):
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    if options.mixed_precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    else:
        precision = options.mixed_precision
    # Several runs in one process (tests, the GPU experiment script) may ask for different
    # precisions; the process-wide distributed state (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True on a machine without CUDA: under `accelerate launch`/torchrun the processes then
    # join one gloo group (MULTI_CPU) instead of each training alone.
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])


def _peak_memory_gb() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_max_rss"


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def build_optimizer(named: list[tuple[str, torch.nn.Parameter]], options: LoopOptions) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on 1-D tensors (norms, biases)."""
    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": options.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(named) and named[0][1].device.type == "cuda"
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=options.lr,
                             betas=(options.adam_beta1, options.adam_beta2), eps=options.adam_eps,
                             fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, options: LoopOptions):
    from transformers import get_scheduler

    warmup = math.ceil(options.warmup_ratio * options.max_steps)
    if options.lr_schedule == "cosine" and options.min_lr_ratio > 0:
        return get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=warmup,
                             num_training_steps=options.max_steps,
                             scheduler_specific_kwargs={"min_lr_rate": options.min_lr_ratio})
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[options.lr_schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=options.max_steps)


def _restore_schedule(scheduler: Any, step: int) -> None:
    """Put a freshly built schedule at `step` (each optimiser step advances it once).

    The schedule is rebuilt from the options on resume rather than loaded, so a run extended
    to more `max_steps` follows the schedule over the new length from the resumed step (as the
    HF Trainer does); with unchanged options the learning rates are the very ones the
    interrupted run had (LambdaLR computes base_lr * lambda(step) either way).
    """
    scheduler.last_epoch = step
    scheduler._step_count = step + 1
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant checkpoints)."""
    # transformers >= 5.2x renamed it activation_checkpointing_enable (old name deprecated)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ConfigError("gradient_checkpointing: this model does not support it")


def _cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast frozen floating-point parameters only; trainable ones stay fp32 master weights."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


@torch.no_grad()
def evaluate_nll(model: Any, dataset: Any, collate: Callable, eval_nll: Callable, *, batch_size: int,
                 max_windows: int = 0, device: torch.device | None = None, accelerator: Any = None,
                 autocast: Any = None) -> dict[str, float]:
    """Validation loss/perplexity: exp(total NLL / total scored tokens) over held-out windows.

    Windows 0..max_windows-1 of `dataset` (all when 0) are split across processes (process r
    takes r, r+W, ...); sums are reduced over processes. Returns val_loss, val_ppl, val_tokens.
    """
    n = len(dataset) if not max_windows else min(max_windows, len(dataset))
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = device or (accelerator.device if accelerator else torch.device("cpu"))
    mine = list(range(rank, n, world))
    keyed = KeyedDataset(dataset)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, len(mine), batch_size):
        batch = collate([keyed[(0, i)] for i in mine[start:start + batch_size]])
        with autocast() if autocast else contextlib.nullcontext():
            nll, count = eval_nll(model, _to_device(batch, device))
        total += torch.stack([nll.double(), count.double()])
    if accelerator is not None and world > 1:
        total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    nll_sum, tokens = float(total[0]), float(total[1])
    loss = nll_sum / tokens if tokens else float("nan")
    return {"val_loss": loss, "val_ppl": math.exp(loss) if tokens else float("nan"), "val_tokens": int(tokens)}


class _SignalFlag:
    """Records SIGTERM/SIGINT so the loop can checkpoint at a step boundary; a second SIGINT
    raises KeyboardInterrupt at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "_SignalFlag":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Trainer:
    """One run of the loop; `run_training` is the public entry point."""

    def __init__(self, task: TrainTask, options: LoopOptions, resume: str | None):
        self.task, self.options = task, options
        self.out = Path(options.output)
        self.ckpt_root = self.out / "checkpoints"
        self.acc = _make_accelerator(options)
        self.main = self.acc.is_main_process
        self.resume = resume

    def log(self, message: str) -> None:
        if self.main:
            from tqdm.auto import tqdm

            tqdm.write(message)

    # -- checkpoints -------------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        from accelerate.utils import DistributedType

        names = self.trainable_names
        if self.acc.distributed_type == DistributedType.FSDP:
            full = self.acc.get_state_dict(self.model)
            return {k: v for k, v in full.items() if k in names}
        unwrapped = self.acc.unwrap_model(self.model)
        return {n: p.detach().to("cpu", copy=True) for n, p in unwrapped.named_parameters() if n in names}

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/step-N/` atomically (built as `.step-N.tmp`, renamed when complete).

        On any failure (a full disk included) the temporary directory is removed again; the
        checkpoints written before stay as they were.
        """
        from accelerate.utils import DistributedType

        step = self.state["step"]
        final = self.ckpt_root / f"{CHECKPOINT_PREFIX}{step}"
        tmp = self.ckpt_root / f".{CHECKPOINT_PREFIX}{step}.tmp"
        fsdp = self.acc.distributed_type == DistributedType.FSDP
        weights = self._trainable_state()  # collective under FSDP: every process calls it
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        try:
            self._write_checkpoint_files(tmp, weights, fsdp)
            self.acc.wait_for_everyone()
            if self.main:
                files = {f.name: f.stat().st_size for f in tmp.iterdir()}
                atomic_write_json(tmp / ckpt.STATE, {**self.state, "format": ckpt.FORMAT_VERSION,
                                                     "world_size": self.acc.num_processes,
                                                     "config": ckpt.options_record(self.options), "files": files})
                for f in tmp.iterdir():  # make the files durable before the rename publishes them
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                ckpt.prune(self.ckpt_root, self.options.keep_checkpoints)
        except BaseException:
            if self.main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.acc.wait_for_everyone()
        return final

    def _write_checkpoint_files(self, tmp: Path, weights: dict[str, torch.Tensor], fsdp: bool) -> None:
        """This process's files of a checkpoint: RNG (every process), optimiser (every process
        under FSDP, else the main one) and the trainable weights (main)."""
        rank = self.acc.process_index
        save_state(_rng_state(), tmp, f"rng-{rank}")
        if fsdp:
            save_state(self.optimizer.state_dict(), tmp, f"optimizer-{rank}")
        if self.main:
            save_tensors(weights, tmp / "trainable.safetensors")
            if not fsdp:
                save_state(self.optimizer.state_dict(), tmp, "optimizer")

    def _load_weights(self, path: Path) -> None:
        weights = load_tensors(path / "trainable.safetensors")
        missing = self.trainable_names - set(weights)
        unexpected = set(weights) - self.trainable_names
        if missing or unexpected:
            raise CepeError(f"--resume {path}: checkpoint does not fit this model "
                            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
        params = dict(self.task.model.named_parameters())
        for name, value in weights.items():
            if value.shape != params[name].shape:
                raise CepeError(f"{path / 'trainable.safetensors'}: {name} has shape {tuple(value.shape)}, "
                                f"this model {tuple(params[name].shape)}; the checkpoint is of another model")
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)

    def _load_rest(self, path: Path) -> None:
        from accelerate.utils import DistributedType

        rank = self.acc.process_index
        stem = f"optimizer-{rank}" if self.acc.distributed_type == DistributedType.FSDP else "optimizer"
        try:
            self.optimizer.load_state_dict(load_state(path, stem))
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise CepeError(f"{path / (stem + '.json')}: optimiser state does not fit this run "
                            f"({str(exc).splitlines()[0]}); resume from another checkpoint") from None
        saved = ckpt.read_state(path) or {}
        self.state.update({k: saved[k] for k in self.state if k in saved})
        _restore_schedule(self.scheduler, self.state["step"])
        if saved.get("world_size") == self.acc.num_processes and (path / f"rng-{rank}.json").is_file():
            _set_rng_state(load_state(path, f"rng-{rank}"))
        else:
            self.log(f"resume: checkpoint written by {saved.get('world_size')} processes, now "
                     f"{self.acc.num_processes}; RNG states not restored (data order and masks are)")

    # -- the run -----------------------------------------------------------------------------
    def _prepare_output(self) -> Path | None:
        """Clean what an interrupted run of this stage left, then pick the checkpoint to resume
        (main process decides; the others follow)."""
        found, error = None, None
        if self.main:
            for name in ("model", "metrics.json", "steps.tsv", "validation.tsv", "config.yaml"):
                remove_stale_temps(self.out / name, self.log)
            ckpt.clean_leftovers(self.ckpt_root, self.log)
            try:
                path = ckpt.resolve_resume(self.resume, self.ckpt_root, self.options, self.log)
                found = str(path) if path else None
            except CepeError as exc:
                error = str(exc)
        if self.acc.num_processes > 1:  # every process stops on the main one's error, none waits
            from accelerate.utils import broadcast_object_list

            box = [found, error]
            broadcast_object_list(box, from_process=0)
            found, error = box
        if error:
            raise CepeError(error)
        return Path(found) if found else None

    def run(self) -> dict[str, Any]:
        o, task, acc = self.options, self.task, self.acc
        from accelerate.utils import set_seed

        set_seed(o.seed)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # peak memory of this run, not of the process
        resume_from = self._prepare_output()
        acc.wait_for_everyone()

        model = task.model
        self.trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
        if not self.trainable_names:
            raise CepeError("model has no trainable parameters")
        frozen = o.frozen_dtype
        if frozen == "auto":
            frozen = "bf16" if acc.device.type == "cuda" and acc.mixed_precision == "bf16" else "fp32"
        if frozen == "bf16":
            _cast_frozen(model, torch.bfloat16)
        if resume_from is not None:
            self._load_weights(resume_from)
        if o.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        model.to(acc.device)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        optimizer = build_optimizer(named, o)
        self.scheduler = build_scheduler(optimizer, o)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        # Everything a resumed run needs to continue steps.tsv / validation.tsv / metrics.json
        # exactly as an uninterrupted one (saved in every checkpoint's state.json).
        self.state: dict[str, Any] = {"step": 0, "samples": 0, "tokens": 0, "role_tokens": dict.fromkeys(ROLES, 0),
                                      "elapsed_s": 0.0, "loss_first": None, "loss_last": None, "loss_window": [],
                                      "last_val_step": None, "val": None, "stopped_by": None}
        if resume_from is not None:
            self._load_rest(resume_from)
            self.log(f"resumed from {resume_from} at step {self.state['step']}")
        self._write_config()

        logger = MetricsLogger(self.out, enabled=self.main, tensorboard=o.tensorboard)
        logger.start(self.state["step"])
        world = acc.num_processes
        sampler = ResumableBatchSampler(len(task.train_data), o.batch_size, seed=o.seed, rank=acc.process_index,
                                        world_size=world, start_sample=self.state["samples"])
        loader = torch.utils.data.DataLoader(KeyedDataset(task.train_data), batch_sampler=sampler,
                                             collate_fn=task.collate, num_workers=o.num_workers,
                                             pin_memory=acc.device.type == "cuda")
        batches = iter(loader)
        try:
            self._validate_if_pending(logger)
            self._train(batches, logger)
        finally:
            logger.close()
            del batches, loader
        return self._finish(logger)

    def _write_config(self) -> None:
        """config.yaml: the options of the run that is now really starting (main process)."""
        if self.main:
            from pipeline.config import save_resolved

            self.out.mkdir(parents=True, exist_ok=True)
            save_resolved(self.options, self.out / "config.yaml")

    def _is_validation_step(self, step: int) -> bool:
        o = self.options
        return step == o.max_steps or bool(o.eval_every and step % o.eval_every == 0)

    def _validate_if_pending(self, logger: MetricsLogger) -> None:
        """A checkpoint written before its step's validation (a signal stopped the run there):
        validate now, so validation.tsv has the row an uninterrupted run has."""
        step = self.state["step"]
        if 0 < step < self.options.max_steps and self._is_validation_step(step) \
                and self.state["last_val_step"] != step:
            self._validate(logger)

    def _validate(self, logger: MetricsLogger) -> dict[str, float] | None:
        t = self.task
        self.state["last_val_step"] = self.state["step"]
        if t.val_data is None or t.eval_nll is None or len(t.val_data) == 0:
            return None
        from accelerate.utils import DistributedType

        bs = self.options.eval_batch_size or self.options.batch_size
        # DDP: the bare model, so that processes with one window more or less do not wait on each
        # other inside the wrapper's forward (it syncs buffers); sums are reduced afterwards.
        # FSDP: every forward is collective, so every process evaluates every window itself.
        fsdp = self.acc.distributed_type == DistributedType.FSDP
        res = evaluate_nll(self.model if fsdp else self.acc.unwrap_model(self.model), t.val_data,
                           t.val_collate or t.collate, t.eval_nll, batch_size=bs,
                           max_windows=self.options.eval_windows, accelerator=None if fsdp else self.acc,
                           device=self.acc.device, autocast=self.acc.autocast)
        logger.log_validation({"step": self.state["step"], **res})
        self.log(f"step {self.state['step']}: val_loss {res['val_loss']:.4f} val_ppl {res['val_ppl']:.3f}")
        self.state["val"] = res
        return res

    def _check_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Stop before applying a step whose loss or gradient norm is NaN/inf (all processes agree)."""
        bad = (~torch.isfinite(loss) | ~torch.isfinite(torch.as_tensor(grad_norm, device=loss.device))).float()
        if self.acc.num_processes > 1:
            bad = self.acc.reduce(bad, reduction="max")
        if not bool(bad):
            return
        self.optimizer.zero_grad(set_to_none=True)
        kept = list_checkpoints(self.ckpt_root)
        where = f"the last checkpoint, {kept[-1]}, is kept" if kept else "no checkpoint was written before it"
        raise TrainingDiverged(
            f"step {self.state['step'] + 1}: loss {float(loss):.4g}, gradient norm {float(grad_norm):.4g}: training "
            f"diverged; the step was not applied and {where}; lower lr (or raise warmup_ratio) and start again")

    def _record_loss(self, loss_value: float) -> None:
        """First, last and the mean of the last 10 logged losses (`loss` in metrics.json)."""
        st = self.state
        if st["loss_first"] is None:
            st["loss_first"] = loss_value
        st["loss_window"] = (st["loss_window"] + [loss_value])[-10:]
        st["loss_last"] = loss_value

    def _train(self, batches: Iterator[dict[str, Any]], logger: MetricsLogger) -> None:
        from tqdm.auto import tqdm

        o, acc, task = self.options, self.acc, self.task
        st = self.state
        world = acc.num_processes
        bar = tqdm(total=o.max_steps, initial=st["step"], disable=not (self.main and o.progress),
                   desc=Path(o.output).name, dynamic_ncols=True, unit="step")
        t0, tokens0 = time.perf_counter(), st["tokens"]
        elapsed0 = st["elapsed_s"]
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        st["stopped_by"] = None
        with _SignalFlag() as flag:
            # a resumed run whose budget was already spent trains no further step
            while st["step"] < o.max_steps and not time_budget_spent(o, st["elapsed_s"]):
                loss_sum = torch.zeros((), device=acc.device)
                extra: dict[str, torch.Tensor] = {}
                step_tokens = 0
                for micro in range(o.grad_accum):
                    batch = _to_device(next(batches), acc.device)
                    step_tokens += task.tokens_in(batch) * world
                    for role, n in _tokens_by_role(batch, task.token_roles).items():
                        st["role_tokens"][role] = st["role_tokens"].get(role, 0) + n * world
                    sync = micro == o.grad_accum - 1
                    with contextlib.nullcontext() if sync or world == 1 else acc.no_sync(self.model):
                        with acc.autocast():
                            loss, metrics = task.compute_loss(self.model, batch)
                        acc.backward(loss / o.grad_accum)
                    loss_sum += loss.detach().float()
                    for k, v in metrics.items():
                        extra[k] = extra.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float32, device=acc.device).detach()
                grad_norm = acc.clip_grad_norm_(trainable, o.max_grad_norm if o.max_grad_norm > 0 else float("inf"))
                self._check_finite(loss_sum, grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                st["step"] += 1
                st["samples"] += o.batch_size * o.grad_accum * world
                st["tokens"] += step_tokens
                st["elapsed_s"] = elapsed0 + time.perf_counter() - t0
                out_of_time = time_budget_spent(o, st["elapsed_s"])
                if world > 1:  # every process stops at the same step: the first one out of time decides
                    out_of_time = bool(acc.reduce(torch.tensor(float(out_of_time), device=acc.device), reduction="max"))

                step = st["step"]
                last = step == o.max_steps or out_of_time
                if step % o.log_every == 0 or last or step == 1:
                    stats = torch.stack([loss_sum / o.grad_accum] + [v / o.grad_accum for v in extra.values()])
                    if world > 1:
                        stats = acc.reduce(stats, reduction="mean")
                    values = stats.tolist()
                    loss_value = values[0]
                    self._record_loss(loss_value)
                    seg = time.perf_counter() - t0
                    tps = (st["tokens"] - tokens0) / seg if seg > 0 else 0.0
                    lr = self.scheduler.get_last_lr()[0]
                    row = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                           "tokens": st["tokens"], "tokens_per_s": tps, "elapsed_s": st["elapsed_s"]}
                    row.update(dict(zip(extra, values[1:])))
                    logger.log_step(row)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
                bar.update(1)

                stop = flag.signum
                if world > 1:  # every process must agree to stop at the same step
                    stop = int(acc.reduce(torch.tensor(float(stop), device=acc.device), reduction="max"))
                if stop:  # checkpoint first (a prompt stop); its validation runs on resume
                    bar.close()
                    path = self.save_checkpoint()
                    raise TrainingInterrupted(stop, path, step)
                # Validation before the checkpoint of the same step: a checkpoint then always
                # records whether its step's validation row was written.
                if self._is_validation_step(step):
                    self._validate(logger)
                if out_of_time:
                    self.save_checkpoint()
                    self.log(f"max_time_s {o.max_time_s:g} s spent: stopped after step {step} of {o.max_steps}")
                    break
                if o.save_every and (step % o.save_every == 0 or step == o.max_steps):
                    self.save_checkpoint()
        st["stopped_by"] = "max_steps" if st["step"] >= o.max_steps else "max_time_s"
        bar.close()

    def _finish(self, logger: MetricsLogger) -> dict[str, Any]:
        o, st, acc = self.options, self.state, self.acc
        if st["last_val_step"] != st["step"]:
            self._validate(logger)
        val = st["val"] or {}
        from accelerate.utils import DistributedType

        state_dict = acc.get_state_dict(self.model) if acc.distributed_type == DistributedType.FSDP else None
        if self.main:
            from pipeline.io import atomic_directory

            unwrapped = acc.unwrap_model(self.model)
            with atomic_directory(self.out / "model") as tmp:
                self.task.save_model(unwrapped, tmp, state_dict)
        acc.wait_for_everyone()
        peak, peak_kind = _peak_memory_gb()
        if acc.num_processes > 1:
            peak = float(acc.reduce(torch.tensor(peak, device=acc.device), reduction="max"))
        window = st["loss_window"]
        metrics = {
            "loss": sum(window) / len(window) if window else None,
            "loss_first": st.get("loss_first"),
            "loss_last": st.get("loss_last"),
            "val_loss": val.get("val_loss"),
            "val_ppl": val.get("val_ppl"),
            "val_tokens": val.get("val_tokens"),
            "steps": st["step"],
            "max_steps": o.max_steps,
            "max_time_s": o.max_time_s,
            "stopped_by": st.get("stopped_by"),
            "lr_last": self.scheduler.get_last_lr()[0],
            "tokens_seen": st["tokens"],
            "samples_seen": st["samples"],
            "wall_time_s": st["elapsed_s"],
            "tokens_per_s": st["tokens"] / st["elapsed_s"] if st["elapsed_s"] else None,
            **throughput_metrics(st, self.task.flops_per_example, acc.num_processes, acc.device),
            "peak_memory_gb": peak,
            "peak_memory_kind": peak_kind,
            "num_processes": acc.num_processes,
            "mixed_precision": acc.mixed_precision,
            "device": acc.device.type,
            "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            **self.task.extra_metrics,
        }
        logger.write_summary(metrics)
        return metrics


def process_state() -> Any:
    """accelerate's process-wide state, created as the loop creates it.

    The first `PartialState` of a process decides whether processes started by `accelerate
    launch` join one group: without CUDA it must be created with `cpu=True` (gloo), or every
    process would train alone. Code that needs the rank before the loop runs calls this.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def save_config(config: Any) -> None:
    """Write the resolved stage config to `<output>/config.yaml` now (main process only).

    The loop writes config.yaml itself once a run has really started; this is for callers that
    want it written before (a worker script that also needs the process state made first)."""
    from pipeline.config import save_resolved

    if process_state().is_main_process:
        Path(config.output).mkdir(parents=True, exist_ok=True)
        save_resolved(config, Path(config.output) / "config.yaml")


def run_training(task: TrainTask, options: LoopOptions, resume: str | None = None) -> dict[str, Any]:
    """Train `task` as `options` say; returns (and writes) the final metrics. See module docstring.

    Raises:
        TrainingInterrupted: after SIGTERM/SIGINT, once a checkpoint is written.
        TrainingDiverged: a step's loss or gradient norm was not finite (not applied).
        CepeError: a bad resume path, a checkpoint that does not fit the model or is corrupt,
            a full disk (naming the file).
    """
    try:
        return _Trainer(task, options, resume).run()
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        kept = list_checkpoints(Path(options.output) / "checkpoints")
        where = f"the last complete checkpoint, {kept[-1]}, is kept" if kept else "no checkpoint was complete"
        raise CepeError(f"{exc.filename or options.output}: no space left on device ({os.strerror(exc.errno)}); "
                        f"{where}; free space and continue with --resume auto") from None
