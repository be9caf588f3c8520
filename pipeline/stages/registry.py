"""Every pipeline stage, declared once: what the CLI, the params checks and the DVC checks read.

A `Stage` names its CLI command, its module (`pipeline/stages/<module>.py`: a config dataclass and
`run(config)`), the click module that wraps it, the params sections it reads (one per DVC stage
that runs it, plus sections only run by hand), the DVC stages that run it, and the library code
its DVC stages depend on. From these:

- `cepe_cli/main.py`'s `COMMANDS` (with the tools in `TOOLS`, commands that are no stage);
- the params checks (tests/test_dvc_pipeline.py): every section in params/base.yaml, holding every
  key of its config dataclass but those its task never reads (`unread_keys`);
- the DVC checks: each DVC stage's code deps in dvc.yaml are exactly `code_deps`, and the stage
  module imports nothing outside them (tests/test_dvc_pipeline.py walks its imports).

Adding a stage: its module, one entry here, its dvc.yaml entry, its params keys in base.yaml.
Only names are stored here, so `cepe --help` imports neither torch nor any stage.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

# Code every stage runs: the config machinery and the errors and atomic writers it uses.
COMMON_DEPS = ("pipeline/config.py", "pipeline/errors.py", "pipeline/io.py", "pipeline/hub.py")
_MODEL = ("pipeline/model", "pipeline/fastdecode", "pipeline/decoders.py")


@dataclass(frozen=True)
class Stage:
    command: str                   # `cepe <command>`
    module: str                    # pipeline.stages.<module>: `config` and `run`
    config: str                    # its config dataclass's name
    cli: str                       # the cepe_cli module holding `command_<command with _>`
    help: str                      # one line for `cepe --help`
    sections: tuple[str, ...]      # params sections its DVC stages read (their names in dvc.yaml)
    dvc_stages: tuple[str, ...]    # how DVC addresses the stages that run it (`evaluate@ppl` for foreach)
    libraries: tuple[str, ...]     # library code (files, folders, resources) its DVC stages depend on
    hand_sections: tuple[str, ...] = ()  # params sections read only by hand (`cepe X --section S`)
    cli_deps: tuple[str, ...] = ()  # other cepe_cli modules its CLI module runs (a shared launcher)
    # hand-run sections that fill another config class of the same module (`cepe bench --train`
    # reads `bench_train` into BenchTrainConfig): section -> class name
    section_configs: tuple[tuple[str, str], ...] = ()

    def config_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.config)

    def section_config(self, section: str) -> type:
        """The config class a params section of this stage fills."""
        name = dict(self.section_configs).get(section, self.config)
        return getattr(importlib.import_module(self.module), name)

    def run_function(self) -> Callable[..., dict[str, Any]]:
        return importlib.import_module(self.module).run

    def module_path(self) -> str:
        return self.module.replace(".", "/") + ".py"

    def code_deps(self) -> tuple[str, ...]:
        """What dvc.yaml lists as the code its stages run (besides the data they read)."""
        return (self.module_path(), self.cli.replace(".", "/") + ".py") + self.cli_deps + COMMON_DEPS + self.libraries

    def unread_keys(self, section: str, values: dict[str, Any]) -> frozenset[str]:
        """Keys of the config that `section` (with these values) may leave out: its task never
        reads them (the config class's `unread_keys(values)`, where it has one). Sections run by
        hand keep every key, whatever task they are switched to."""
        if section in self.hand_sections:
            return frozenset()
        hook = getattr(self.section_config(section), "unread_keys", None)
        return frozenset(hook(values)) if hook is not None else frozenset()


STAGES: tuple[Stage, ...] = (
    Stage("convert-decoder", "pipeline.stages.convert_decoder", "ConvertConfig", "cepe_cli.convert",
          "Convert a decoder (e.g. the packaged SmolLM2 GGUF) to safetensors.",
          ("convert",), ("convert",), ("pipeline/data/tokenize.py", "pipeline/resources/tokenizer")),
    Stage("prepare-data", "pipeline.stages.prepare_data", "PrepareConfig", "cepe_cli.prepare_data",
          "Filter, tokenize and chunk raw text into Arrow shards.",
          ("prepare_mlm", "prepare_warmup", "prepare"), ("prepare_mlm", "prepare_warmup", "prepare"),
          ("pipeline/data", "pipeline/resources/corpus", "pipeline/resources/tokenizer")),
    Stage("pretrain-encoder", "pipeline.stages.pretrain_encoder", "PretrainEncoderConfig", "cepe_cli.training",
          "Masked-LM pretraining of the CEPE encoder.",
          ("pretrain_encoder",), ("pretrain_encoder",), ("pipeline/train", *_MODEL, "pipeline/data")),
    Stage("warmup", "pipeline.stages.warmup", "WarmupConfig", "cepe_cli.training",
          "Warm-up: teach cross-attention to copy (duplicate inputs).",
          ("warmup",), ("warmup",), ("pipeline/train", *_MODEL, "pipeline/data")),
    Stage("train", "pipeline.stages.train", "TrainConfig", "cepe_cli.training",
          "Main CEPE training on prevdoc/concat windows.",
          ("train",), ("train",), ("pipeline/train", *_MODEL, "pipeline/data")),
    Stage("teacher-logits", "pipeline.stages.teacher_logits", "TeacherLogitsConfig", "cepe_cli.distill",
          "Precompute the teacher's top-k probabilities (CEPED).",
          ("teacher_logits",), ("teacher_logits",), ("pipeline/train", "pipeline/devices.py", "pipeline/data"),
          cli_deps=("cepe_cli/training.py",)),
    Stage("distill", "pipeline.stages.distill", "DistillConfig", "cepe_cli.distill",
          "CEPED: CE + KL(teacher || student) distillation.",
          ("distill",), ("distill",), ("pipeline/train", *_MODEL, "pipeline/devices.py", "pipeline/data"),
          cli_deps=("cepe_cli/training.py",)),
    Stage("evaluate", "pipeline.stages.evaluate", "EvaluateConfig", "cepe_cli.evaluate",
          "Evaluate a model: ppl, longbench, zeroscrolls, ruler, qa, icl, ralm.",
          ("evaluate_ppl", "evaluate_ppl_long", "evaluate_ruler", "evaluate_longbench", "evaluate_qa", "evaluate_icl",
           "evaluate_ralm"),
          ("evaluate@ppl", "evaluate@ppl_long", "evaluate@ruler"),
          ("pipeline/evaluate", *_MODEL, "pipeline/devices.py", "pipeline/data", "pipeline/resources"),
          hand_sections=("evaluate",)),
    Stage("index", "pipeline.stages.index", "IndexConfig", "cepe_cli.index",
          "Index a corpus's passages (BM25 or dense) for retrieval-augmented evaluation.",
          ("index",), (), ("pipeline/evaluate", "pipeline/data", *_MODEL, "pipeline/devices.py")),
    Stage("plots", "pipeline.stages.plots", "PlotsConfig", "cepe_cli.plots",
          "PNG/SVG figures of training and evaluation runs (offline).",
          ("plots",), ("plots",), ("pipeline/plots",)),
    # run by hand, not DVC stages: the results documents, using a trained model, the benchmarks
    Stage("results", "pipeline.stages.results", "ResultsConfig", "cepe_cli.results",
          "docs/results/*.md + *.json from one dvc repro run's outputs.",
          (), (), ("pipeline/evaluate",), hand_sections=("results",)),
    Stage("generate", "pipeline.stages.generate", "GenerateConfig", "cepe_cli.generate",
          "Generate from a trained CEPE model with long context, streamed.",
          (), (), ("pipeline/serve", "pipeline/evaluate", *_MODEL, "pipeline/devices.py", "pipeline/data", "pipeline/train"), hand_sections=("generate",)),
    Stage("serve", "pipeline.stages.serve", "ServeConfig", "cepe_cli.serve",
          "OpenAI-compatible HTTP server with documents encoded once.",
          (), (), ("pipeline/serve", "pipeline/evaluate", *_MODEL, "pipeline/devices.py", "pipeline/data", "pipeline/train"), hand_sections=("serve",)),
    Stage("bench", "pipeline.stages.bench", "BenchConfig", "cepe_cli.bench",
          "Memory and speed of CEPE against full attention; --train: the training stages' step.",
          (), (), ("pipeline/bench", *_MODEL, "pipeline/devices.py", "pipeline/train", "pipeline/data"),
          hand_sections=("bench", "bench_train"), section_configs=(("bench_train", "BenchTrainConfig"),)),
    Stage("bench-serve", "pipeline.stages.bench_serve", "BenchServeConfig", "cepe_cli.bench",
          "Serving benchmark: cached documents, time to first token, throughput.",
          (), (), ("pipeline/bench", "pipeline/serve", "pipeline/evaluate", *_MODEL, "pipeline/devices.py", "pipeline/data", "pipeline/train"), hand_sections=("bench_serve",)),
)

# Commands that are no pipeline stage: name -> (module, one-line help).
TOOLS: dict[str, tuple[str, str]] = {
    "use-profile": ("cepe_cli.profiles", "Write params.yaml from params/base.yaml + a profile: cpu, tiny, gpu, paper."),
}


def by_command(command: str) -> Stage:
    for stage in STAGES:
        if stage.command == command:
            return stage
    raise KeyError(command)


def by_dvc_stage(name: str) -> Stage:
    """The stage a dvc.yaml stage runs (`evaluate` for every `evaluate@<task>`)."""
    for stage in STAGES:
        if name in stage.dvc_stages or name in {s.split("@")[0] for s in stage.dvc_stages}:
            return stage
    raise KeyError(name)
