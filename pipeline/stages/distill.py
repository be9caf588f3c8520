"""`cepe distill`: CEPE-Distilled, extending an instruction-tuned decoder with unlabeled text alone.

docs/method.md §2.4. The student is a CEPE model whose frozen decoder is the teacher's own weights
(by default the warm-up of that decoder); the teacher reads context + decoder input inside its
own window, and the student learns to match it while reading the context through its encoder:

    loss = lm_weight * CE(student, tokens) + kl_weight * KL(teacher || student)

over the teacher's top-k per decoder position (`drop` mode by default, `smooth_<delta>` kept as
an option), averaged per token; defaults `lm_weight=1`, `kl_weight=2`, k = 50, temperature 1,
2048 context + 2048 decoder tokens, as the paper's run.

Teacher targets come from `cepe teacher-logits` shards (`teacher_mode: precomputed`), verified
against the data before training starts, or from the teacher held in memory
(`teacher_mode: online`) for users who cannot store terabytes of logits. When the student's
decoder *is* the teacher (same weights), the online teacher is that decoder run without encoder
input: no second copy of the weights.

After training, `compare_windows` held-out windows measure the student and the same decoder
reading only its own window against the teacher (perplexity and KL; `pipeline.train.ceped_eval`),
added to `metrics.json` with the KL at the first and last logged steps.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config import ConfigError, field
from pipeline.errors import CepeError
from pipeline.train.distill import parse_kl_mode
from pipeline.train.lm_stage import LAYOUTS, MainStageOptions
from pipeline.train.teacher_setup import check_teacher_geometry


@dataclass
class DistillConfig(MainStageOptions):
    """CEPED; defaults are the paper's run, params.yaml the CPU one."""

    output: str = field("runs/distill", help="Output directory: model/, checkpoints/, metrics.json, steps.tsv.")
    model: str = field("runs/warmup/model", help="The student to start from: a CEPE model whose decoder is the teacher (its output directory or model/).")
    teacher: str = field("models/decoder", help="Teacher: a model directory or a short name (llama-2-7b-chat, llama-2-13b-chat, ...).")
    teacher_mode: Literal["precomputed", "online"] = field(
        "precomputed", help="precomputed: read `cepe teacher-logits` shards; online: run the teacher in memory.")
    logits: list[str] = field(default_factory=lambda: ["data/teacher-logits"],
                              help="Teacher-logits directories, one per `data` directory (precomputed mode).")
    teacher_context_len: int = field(2048, help="Context tokens the teacher reads before the decoder input.")
    decoder_len: int = field(2048, help="Decoder tokens of each window the student reads (and the teacher scores).")
    k: int = field(50, help="Teacher top-k per position (online mode; precomputed shards record their own).")
    temperature: float = field(1.0, help="Softmax temperature of teacher and student (KL scaled by T^2).")
    lm_weight: float = field(1.0, help="Weight of the next-token cross-entropy.")
    kl_weight: float = field(2.0, help="Weight of KL(teacher || student).")
    kl_mode: str = field("drop", help="drop: tail bucket dropped on both sides; smooth_<delta>: kept, smoothed by delta.")
    teacher_dtype: str = field("auto", help="Online teacher weights dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16.")
    compare_windows: int = field(64, help="Held-out windows for the final student vs decoder-alone comparison (0: skip).")
    compare_batch_size: int = field(1, help="Windows per batch of that comparison.")

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            parse_kl_mode(self.kl_mode)
        except CepeError as exc:
            raise ConfigError(str(exc)) from None
        if self.lm_weight < 0 or self.kl_weight < 0:
            raise ConfigError(f"lm_weight, kl_weight: expected weights >= 0, got {self.lm_weight} and {self.kl_weight}")
        if self.lm_weight == 0 and self.kl_weight == 0:
            raise ConfigError("lm_weight, kl_weight: both are 0, nothing to train on")
        if self.kl_weight == 0:
            warnings.warn(
                f"kl_weight is 0 with teacher {self.teacher!r} configured: the teacher is ignored and this is plain "
                f"CE training (the official CEPED config shipped exactly this mistake); set kl_weight: 2 to distil",
                UserWarning, stacklevel=2)
        check_teacher_geometry(self)
        if self.teacher_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"teacher_dtype: expected auto, float32, bfloat16 or float16, got {self.teacher_dtype!r}")
        if self.teacher_mode == "precomputed" and len(self.logits) != len(self.data):
            raise ConfigError(f"logits: expected one teacher-logits directory per data directory "
                              f"({len(self.data)}), got {len(self.logits)}")
        if self.compare_windows < 0 or self.compare_batch_size < 1:
            raise ConfigError("compare_windows, compare_batch_size: expected >= 0 and >= 1")
        if not str(self.teacher).strip():
            raise ConfigError("teacher: expected a model directory or a short name")


# --------------------------------------------------------------------------------------------


def _same_path(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _kl_trace(output: Path) -> tuple[float | None, float | None]:
    """KL at the first and the last logged step of steps.tsv."""
    path = output / "steps.tsv"
    if not path.is_file():
        return None, None
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t") if r.get("kl") not in (None, "")]
    if not rows:
        return None, None
    return float(rows[0]["kl"]), float(rows[-1]["kl"])


def _parts(dataset: Any) -> list[Any]:
    """The `CepedExamples` of one data directory each (a `ConcatExamples` holds several)."""
    return list(dataset.datasets) if hasattr(dataset, "datasets") else [dataset]


def _shards_of(examples: Any) -> Any:
    """The shard reader under a `CepedExamples` (its manifest records the tokenizer)."""
    return examples.data


def _student_tokens(batch: dict[str, Any]) -> int:
    return sum(batch[k].numel() for k in ("input_ids", "encoder_input_ids") if k in batch)


def open_data(config: DistillConfig, student_fingerprint: str, log: Any = print,
              student_source: str | None = None) -> tuple[Any, Any, list[Any]]:
    """(train dataset, validation dataset, logits manifests) for the run, alignment checked.

    In precomputed mode each data directory is joined with its logits directory, after
    `check_alignment` (data build, tokenizer, geometry, temperature) and a per-shard spot check.
    """
    from pipeline.train.teacher_setup import check_geometry, data_identity
    from pipeline.train.ceped_data import CepedExamples, check_alignment, spot_check
    from pipeline.train.collate import ConcatExamples, open_shards
    from pipeline.train.teacher import resolve_teacher, same_teacher
    from pipeline.train.teacher_shards import TeacherLogits

    online = config.teacher_mode == "online"
    trains, vals, manifests = [], [], []
    for i, root in enumerate(config.data):
        manifest, sha = data_identity(root)
        check_geometry(manifest, config.teacher_context_len, config.decoder_len, key=f"data[{i}]")
        train = open_shards(root, "train", layouts=LAYOUTS, key=f"data[{i}]")
        val = open_shards(root, "validation", layouts=LAYOUTS, key=f"data[{i}]")
        logits = None
        if not online:
            logits = TeacherLogits(config.logits[i], "train")
            check_alignment(logits, manifest, sha, context_len=config.teacher_context_len,
                            decoder_len=config.decoder_len, temperature=config.temperature, data_root=root,
                            data_shards=train.entries)
            if len(logits) < len(train):
                log(f"{config.logits[i]}: the teacher covered the first {len(logits)} of {len(train)} windows "
                    f"of {root}/train (teacher_logits.max_windows); training on those")
            lm = logits.manifest
            if int(lm["k"]) != config.k:
                raise CepeError(f"{config.logits[i]}/manifest.json: holds the teacher's top-{lm['k']} but this run "
                                f"sets k={config.k}; set k: {lm['k']} or recompute the logits")
            recorded = lm.get("teacher", {})
            ref = resolve_teacher(config.teacher)
            if not same_teacher(ref, recorded, student_source=student_source, student_fingerprint=student_fingerprint):
                raise CepeError(
                    f"{config.logits[i]}/manifest.json: computed by teacher {recorded.get('name')!r} "
                    f"({recorded.get('resolved')}) but this run's teacher is {config.teacher!r} ({ref.resolved}); "
                    f"set teacher to the one that computed the logits, or recompute them "
                    f"(cepe teacher-logits --teacher {config.teacher})")
            if recorded.get("fingerprint") != student_fingerprint:
                log(f"warning: the student's frozen decoder is not the teacher that computed {config.logits[i]} "
                    f"(weights fingerprint {student_fingerprint} vs {recorded.get('fingerprint')})")
            manifests.append(lm)
        examples = CepedExamples(train, config.teacher_context_len, config.decoder_len, logits=logits,
                                 with_teacher_rows=online, where=f"{root}/train")
        spot_check(examples)
        trains.append(examples)
        vals.append(CepedExamples(val, config.teacher_context_len, config.decoder_len, where=f"{root}/validation"))
    train = trains[0] if len(trains) == 1 else ConcatExamples(trains)
    val = vals[0] if len(vals) == 1 else ConcatExamples(vals)
    return train, val, manifests


def build_teacher(config: DistillConfig, student: Any, student_fingerprint: str, log: Any = print) -> tuple[Any, Any]:
    """(OnlineTeacher, separate teacher model or None) for online mode.

    The student's own decoder serves as the teacher when it holds the teacher's weights (same
    directory, or same weights fingerprint once loaded); else the teacher is loaded apart.
    """
    from pipeline.devices import resolve_device
    from pipeline.train.teacher import OnlineTeacher, max_window, resolve_teacher, weights_fingerprint
    from pipeline.train.teacher_setup import load_teacher

    ref = resolve_teacher(config.teacher)
    source = getattr(student.config, "decoder_name_or_path", None)
    if (ref.is_local and _same_path(ref.resolved, source)) or (not ref.is_local and ref.resolved == source):
        return OnlineTeacher(None, config.teacher_context_len, config.decoder_len, config.k, config.temperature,
                             max_positions=max_window(student.decoder.config)), None
    # Loaded where it will run (bf16 on a GPU with teacher_dtype auto), compared, dropped if it is
    # the student's own decoder after all.
    _, model = load_teacher(config.teacher, config.teacher_dtype, config.attn_implementation, resolve_device())
    if weights_fingerprint(model) == student_fingerprint:
        del model
        return OnlineTeacher(None, config.teacher_context_len, config.decoder_len, config.k, config.temperature,
                             max_positions=max_window(student.decoder.config)), None
    log(f"warning: teacher {ref.resolved} is not the student's frozen decoder; holding both in memory")
    if int(model.config.vocab_size) != int(student.decoder.config.vocab_size):
        raise CepeError(f"teacher: {ref.resolved} has vocabulary {model.config.vocab_size}, the student's decoder "
                        f"{student.decoder.config.vocab_size}; distillation needs one tokenizer")
    return OnlineTeacher(model, config.teacher_context_len, config.decoder_len, config.k, config.temperature), model


def run(config: DistillConfig, resume: str | None = None) -> dict[str, Any]:
    """Distil; writes `<output>/model`, metrics.json (with the held-out comparison), steps.tsv (ce, kl)."""
    import torch

    from pipeline.io import atomic_write_json
    from pipeline.train.lm_stage import (check_data_tokenizer, lm_task, load_model, require_model_type,
                                         resolve_model_dir)
    from pipeline.train.ceped_eval import compare_with_teacher
    from pipeline.train.distill import DistillLoss
    from pipeline.train.loop import process_state, run_training
    from pipeline.train.teacher import check_window, max_window, weights_fingerprint

    model_dir = resolve_model_dir(config.model, "model")
    require_model_type(model_dir, "model", "cepe")
    process_state()  # before any model loads: launched CPU processes must join one gloo group
    student = load_model(config)
    check_window(config.teacher_context_len, config.decoder_len, max_window(student.decoder.config),
                 where="student decoder")
    fingerprint = weights_fingerprint(student.decoder)
    train, val, manifests = open_data(config, fingerprint,
                                      student_source=getattr(student.config, "decoder_name_or_path", None))
    check_data_tokenizer([_shards_of(d) for d in _parts(train) + _parts(val)], student, model_dir, "model",
                         student.decoder.config.vocab_size)

    teacher_fn, teacher_model = (None, None)
    if config.teacher_mode == "online":
        teacher_fn, teacher_model = build_teacher(config, student, fingerprint)

    from pipeline.train.collate import ContextMasking

    masking = (ContextMasking(config.context_mask_prob, config.context_mask_full_prob, config.seed)
               if config.context_masking else None)
    task = lm_task(student, train, val, config, context_masking=masking, stage="distill")
    task.compute_loss = DistillLoss(config.lm_weight, config.kl_weight, config.kl_mode, config.temperature, teacher_fn)
    task.tokens_in = _student_tokens  # the online teacher's rows are not tokens the student trained on
    task.extra_metrics.update(teacher=config.teacher, teacher_mode=config.teacher_mode, lm_weight=config.lm_weight,
                              kl_weight=config.kl_weight, kl_mode=config.kl_mode, k=config.k,
                              teacher_context_len=config.teacher_context_len)
    metrics = run_training(task, config, resume=resume)

    from accelerate import PartialState

    if not PartialState().is_main_process:
        return metrics
    out = Path(config.output)
    metrics["kl_first"], metrics["kl_last"] = _kl_trace(out)
    if config.compare_windows:
        comparison_teacher = teacher_model if teacher_model is not None else student.decoder
        if teacher_model is None and manifests and manifests[0].get("teacher", {}).get("fingerprint") != fingerprint:
            comparison_teacher = None  # precomputed by another model, which is not in memory
        if comparison_teacher is not None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            student.to(device)
            comparison_teacher.to(device)
            first_val = val.datasets[0] if hasattr(val, "datasets") else val
            data = first_val.data
            n = min(config.compare_windows, len(data))
            autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
            metrics.update(compare_with_teacher(
                student, comparison_teacher, [data[i] for i in range(n)], context_len=config.teacher_context_len,
                decoder_len=config.decoder_len, k=config.k, temperature=config.temperature,
                batch_size=config.compare_batch_size, autocast=autocast))
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
