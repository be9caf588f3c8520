"""One training step of a CEPE stage, as the loop runs it, on synthetic windows of the stage's shape.

The train bench times the step `pipeline/train/loop.py` takes, with the same pieces:
- the model as the loop holds it: frozen decoder weights in bf16 (`_cast_frozen`), trainable
  weights (encoder, cross-attention) as fp32 master weights, the forward under bf16 autocast
  (the loop's `mixed_precision: bf16`); on a CPU everything in fp32 without autocast;
- the stage's own batch: synthetic examples shaped as the stage's shards, collated by the
  stage's collate function (`LmCollator`, context masking for the main stage and CEPED;
  `CepedExamples` for CEPED, with teacher rows for the online teacher);
- the stage's own loss hook (`causal_lm_loss`; `DistillLoss` with an `OnlineTeacher` running the
  student's frozen decoder, or with precomputed top-k targets in the batch);
- backward, gradient clipping, AdamW (`build_optimizer`: fused on a GPU, trainable parameters
  only), the scheduler, `zero_grad(set_to_none=True)`.

Marks (CUDA events on a GPU) split the step into teacher (CEPED online: the teacher's forward,
which runs first), encoder forward (hooks on `model.encoder`), decoder forward + loss, backward
and optimizer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from pipeline.bench.device import Clock, building_on

STAGES = ("warmup", "main", "ceped_online", "ceped_precomputed")
CHECKPOINTING = ("none", "decoder", "all")
PARTS = ("teacher", "encoder_forward", "decoder_forward", "backward", "optimizer")


@dataclass(frozen=True)
class StageInputs:
    """The shape of one example of a stage: decoder tokens, encoder chunks, and for CEPED the
    teacher's context length and top-k."""

    name: str
    decoder_tokens: int
    n_chunks: int
    chunk_len: int
    context_masking: bool = False
    teacher_context: int = 0
    k: int = 0

    @property
    def ceped(self) -> bool:
        return self.name.startswith("ceped")

    @property
    def online(self) -> bool:
        return self.name == "ceped_online"

    @property
    def teacher_tokens(self) -> int:
        """Tokens the online teacher reads per example (its context + the decoder tokens)."""
        return self.teacher_context + self.decoder_tokens if self.online else 0


def stage_inputs(config: Any) -> dict[str, StageInputs]:
    """Each requested stage's example shape, from the `bench_train` config."""
    shapes = {
        "warmup": StageInputs("warmup", config.warmup_decoder_len, config.warmup_chunks, config.warmup_chunk_len),
        "main": StageInputs("main", config.main_decoder_len, config.main_chunks, config.main_chunk_len,
                            context_masking=config.context_masking),
    }
    for name in ("ceped_online", "ceped_precomputed"):
        shapes[name] = StageInputs(name, config.ceped_decoder_len, config.ceped_chunks, config.ceped_chunk_len,
                                   context_masking=config.context_masking, teacher_context=config.ceped_context_len,
                                   k=config.ceped_k)
    return {name: shapes[name] for name in config.stages}


# ---------------------------------------------------------------------------------------------
# The model as the loop holds it
# ---------------------------------------------------------------------------------------------
def build_model(decoder_config: Any, encoder_config: Any, device: torch.device, bf16: bool,
                attn_implementation: str = "sdpa") -> Any:
    """A CEPE model of the given shapes with random weights, trainable and frozen as the stages
    train it: frozen decoder in bf16 (fp32 on a CPU), encoder and cross-attention in fp32."""
    from transformers import AutoModelForCausalLM

    from pipeline.model import CepeEncoder, CepeForCausalLM

    dtype = torch.bfloat16 if bf16 else torch.float32
    decoder_config._attn_implementation = attn_implementation
    encoder_config._attn_implementation = attn_implementation
    with building_on(device, dtype):
        decoder = AutoModelForCausalLM.from_config(decoder_config, dtype=dtype)
        encoder = CepeEncoder(encoder_config)
        # "copy": a non-zero cross-attention output, so every gradient is a real one; the cost
        # does not depend on the values.
        model = CepeForCausalLM.from_decoder(decoder, encoder=encoder, init_mode="copy")
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # fp32 master weights, as the loop keeps trainable parameters
    return model.train()


def set_checkpointing(model: Any, mode: str) -> None:
    """none, decoder (each decoder layer recomputed in the backward pass) or all (the loop's
    `gradient_checkpointing: true`: decoder and encoder layers)."""
    from pipeline.train.loop import enable_gradient_checkpointing

    if mode not in CHECKPOINTING:
        raise ValueError(f"checkpointing: expected one of {CHECKPOINTING}, got {mode!r}")
    for module in (model, model.decoder, model.encoder):
        disable = getattr(module, "activation_checkpointing_disable", None) or getattr(module, "gradient_checkpointing_disable")
        disable()
    if mode == "decoder":
        enable_gradient_checkpointing(model.decoder)
    elif mode == "all":
        enable_gradient_checkpointing(model)


def compile_layers(model: Any) -> None:
    """torch.compile every decoder and encoder layer in place (one code object per layer class,
    so each compiles once): fuses the norms, rotary embeddings, SwiGLU and residual adds."""
    for layer in list(model.decoder.model.layers) + list(model.encoder.layers):
        layer.compile()


# ---------------------------------------------------------------------------------------------
# The stage's batches and loss
# ---------------------------------------------------------------------------------------------
class StageTask:
    """Synthetic examples of one stage, its collate function and its loss hook."""

    def __init__(self, stage: StageInputs, model: Any, seed: int = 0):
        from pipeline.train.collate import ContextMasking, LmCollator
        from pipeline.train.losses import causal_lm_loss

        self.stage, self.seed = stage, seed
        self.vocab = int(model.decoder.config.vocab_size)
        masking = ContextMasking(seed=seed) if stage.context_masking else None  # the stages' 0.3 / 0.03
        self.collate = LmCollator(context_masking=masking)
        self.compute_loss: Callable[[Any, dict[str, Any]], Any] = causal_lm_loss
        if stage.ceped:
            from pipeline.train.distill import DistillLoss
            from pipeline.train.teacher import OnlineTeacher, max_window

            teacher = None
            if stage.online:  # the student's own frozen decoder is the teacher (no second copy)
                teacher = OnlineTeacher(None, stage.teacher_context, stage.decoder_tokens, stage.k,
                                        max_positions=max_window(model.decoder.config))
            self.compute_loss = DistillLoss(teacher=teacher)  # the paper's CE + 2 KL (drop), T = 1

    def _example(self, index: int) -> dict[str, Any]:
        s = self.stage
        rng = np.random.default_rng([self.seed, index])
        ids = rng.integers(3, self.vocab, size=s.decoder_tokens).astype(np.int32)
        if s.name == "warmup":  # duplicate windows: the encoder reads the decoder's own tokens
            if s.n_chunks * s.chunk_len > s.decoder_tokens:
                raise ValueError("warm-up: the encoder chunks must fit in the decoder window (duplicate layout)")
            enc = ids[: s.n_chunks * s.chunk_len].reshape(s.n_chunks, s.chunk_len).copy()
        else:
            enc = rng.integers(3, self.vocab, size=(s.n_chunks, s.chunk_len)).astype(np.int32)
        example: dict[str, Any] = {"input_ids": ids, "encoder_input_ids": enc}
        if s.ceped and not s.online:  # precomputed top-k targets, as TeacherLogits serves them
            from pipeline.train.teacher import IDS, PROBS, TAIL

            probs = np.sort(rng.dirichlet(np.ones(s.k + 1), size=s.decoder_tokens)[:, : s.k], axis=-1)[:, ::-1]
            example[PROBS] = probs.astype(np.float16)
            example[IDS] = rng.integers(3, self.vocab, size=(s.decoder_tokens, s.k)).astype(np.int32)
            example[TAIL] = (1.0 - probs.sum(-1)).astype(np.float16)
        return example

    def examples(self, start: int, count: int) -> list[dict[str, Any]]:
        data = [self._example(i) for i in range(start, start + count)]
        if self.stage.ceped:
            from pipeline.train.ceped_data import CepedExamples

            data = CepedExamples(data, self.stage.teacher_context, self.stage.decoder_tokens,
                                 with_teacher_rows=self.stage.online)
            data = [data[i] for i in range(count)]
        for i, example in enumerate(data):
            example["_epoch"], example["_index"] = 0, start + i  # as the loop's KeyedDataset adds them
        return data

    def batch(self, start: int, count: int, device: torch.device) -> dict[str, Any]:
        from pipeline.train.loop import _to_device

        return _to_device(self.collate(self.examples(start, count)), device)


def batch_tokens(batch: dict[str, Any]) -> dict[str, int]:
    """Decoder, encoder and (online) teacher tokens of one collated batch."""
    from pipeline.train.teacher import TEACHER_INPUT_IDS

    out = {"decoder": int(batch["input_ids"].numel()), "encoder": int(batch["encoder_input_ids"].numel())}
    out["teacher"] = int(batch[TEACHER_INPUT_IDS].numel()) if TEACHER_INPUT_IDS in batch else 0
    return out


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------
class TrainStep:
    """The loop's optimiser step (grad_accum 1) on `model`, with marks between its parts."""

    def __init__(self, model: Any, device: torch.device, bf16: bool, max_grad_norm: float = 1.0, options: Any = None):
        """`options`: the `LoopOptions` of the optimiser and schedule (default the loop's AdamW at a
        constant learning rate, so that every step moves the weights)."""
        from pipeline.train.loop import LoopOptions, _cast_frozen, build_optimizer, build_scheduler

        self.model, self.device, self.bf16 = model, device, bf16
        self.clock = Clock(device)
        if bf16:
            _cast_frozen(model, torch.bfloat16)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.trainable = [p for _, p in named]
        options = options or LoopOptions(max_steps=1000, max_grad_norm=max_grad_norm, lr_schedule="constant", warmup_ratio=0.0)
        self.optimizer = build_optimizer(named, options)
        self.scheduler = build_scheduler(self.optimizer, options)
        self.max_grad_norm = options.max_grad_norm or float("inf")
        self._marks: dict[str, Any] = {}
        model.encoder.register_forward_pre_hook(lambda *_: self._mark("encoder_start"))
        model.encoder.register_forward_hook(lambda *_: self._mark("encoder_end"))

    def _mark(self, name: str) -> None:
        if name not in self._marks:  # the first encoder call of the step (not a recomputation)
            self._marks[name] = self.clock.mark()

    def autocast(self) -> Any:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, batch: dict[str, Any], compute_loss: Callable[[Any, dict[str, Any]], Any]) -> dict[str, Any]:
        """One step; returns the marks (call `times` after a sync) and the loss tensor."""
        self._marks = {}
        start = self.clock.mark()
        with self.autocast():
            loss, _metrics = compute_loss(self.model, batch)
        forward = self.clock.mark()
        loss.backward()
        backward = self.clock.mark()
        torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        end = self.clock.mark()
        marks = dict(self._marks, start=start, forward=forward, backward=backward, end=end)
        return {"marks": marks, "loss": loss.detach()}

    def times(self, marks: dict[str, Any]) -> dict[str, float]:
        """Seconds of each part of a step (after `clock.sync()`)."""
        sec = self.clock.seconds
        enc_start = marks.get("encoder_start", marks["start"])
        enc_end = marks.get("encoder_end", enc_start)
        return {
            "teacher": sec(marks["start"], enc_start),
            "encoder_forward": sec(enc_start, enc_end),
            "decoder_forward": sec(enc_end, marks["forward"]),
            "backward": sec(marks["forward"], marks["backward"]),
            "optimizer": sec(marks["backward"], marks["end"]),
            "step": sec(marks["start"], marks["end"]),
        }
