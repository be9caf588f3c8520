"""`cepe evaluate`: one config for every evaluation task, and `run(config)`.

Tasks (evaluation.md): `ppl` (CEPE's long-context perplexity with its baselines), `longbench`
and `longbench-e` (THUDM LongBench v1; `predictions` scores existing files without a model),
`zeroscrolls` (the six CEPED tasks, validation split), `ruler` (synthetic needle tasks made
with the model's tokenizer), and the paper's applications: `qa` (open-domain QA over retrieved
passages), `icl` (the eleven PCW classification sets with many demonstrations) and `ralm`
(retrieval-augmented LM over an index that `cepe index` builds). Each run writes into `output` (default `reports/evaluate/<task>`):
per-example JSONL, `metrics.json` (for `dvc metrics`), `run.json` (model, task, data checksums,
lengths, seed, wall time, resolved config) and, for ppl/ruler, a TSV per length for `dvc plots`.
The output directory is replaced only when the run completes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config import ConfigError, field, to_dict
from pipeline.errors import CepeError

TASKS = ("ppl", "longbench", "longbench-e", "zeroscrolls", "ruler", "qa", "icl", "ralm")
QA_BASELINES = ("decoder", "decoder-fit", "replug")
# Keys that only one task family reads; the others ignore them, so a params section for another
# task leaves them out (params/base.yaml; the registry's section check allows it).
TASK_ONLY_KEYS = {
    "ppl": ("lengths", "decoder_len", "preset", "stride", "eval_window", "max_windows", "max_windows_per_doc",
            "min_doc_tokens", "shard_split", "baselines", "max_windows_per_source", "bootstrap_samples"),
    "ruler": ("ruler_lengths", "num_samples", "ruler_haystack"),
}


def keys_unread_by(task: str) -> frozenset[str]:
    """The keys `task` never reads (those only another task family reads)."""
    return frozenset(k for family, keys in TASK_ONLY_KEYS.items() if family != task for k in keys)


@dataclass
class EvaluateConfig:
    # what to evaluate
    task: str = field("ppl", help="ppl | longbench | longbench-e | zeroscrolls | ruler | qa | icl | ralm")
    model: str = field("", help="model directory (CEPE model or plain decoder) loadable by from_pretrained")
    tokenizer: str = field("", help="tokenizer name/path (default: the model's directory)")
    data: str = field("", help="ppl/ralm: jsonl(.gz) documents, a folder of them, 'embedded', or (ppl) a prepare-data shard directory; longbench: folder with data/*.jsonl or 'hub'; zeroscrolls: folder or 'hub'; qa: a json/jsonl file or folder (CEPE or FlashRAG layout); icl: folder with <set>/train.jsonl and <set>/test.jsonl")
    predictions: str = field("", help="longbench/longbench-e: score this folder of <task>.jsonl predictions, no model")
    output: str = field("", help="output folder (default reports/evaluate/<task>)")
    subtasks: list[str] = field(default_factory=list, help="benchmark tasks to run (default: all), e.g. qasper,trec")
    limit: int | None = field(None, help="evaluate only the first N examples per task (ppl: N windows per length; icl: default 250 test examples per set)")
    seed: int = field(42, help="seed for window sampling, RULER generation and sampling")
    # how to run the model
    batch_size: int = field(1, help="examples (or ppl windows) per forward/generate call")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field("auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    device: str = field("auto", help="auto | cpu | cuda | cuda:N")
    attn_implementation: str = field("sdpa", help="sdpa | eager | flash_attention_2")
    progress: bool = field(True, help="show progress bars")
    # generation input policy (evaluation.md 2.6)
    policy: Literal["auto", "vanilla", "cepe", "replug"] = field("auto", help="auto: cepe for CEPE models, vanilla (middle truncation) otherwise; qa also: replug (per-passage ensembling)")
    max_length: int | None = field(None, help="vanilla: prompt cap in tokens incl. BOS (LongBench max_length); default max positions - 596")
    decoder_max_len: int | None = field(None, help="cepe policy: decoder window incl. generation (default min(2048, max positions))")
    chunk_len: int = field(256, help="encoder chunk length in tokens")
    max_encoder_chunks: int = field(24, help="cepe policy: keep at most this many chunks (left-truncated)")
    chat_wrapper: Literal["none", "llama2", "template"] = field("none", help="chat wrapper for tasks that use one: none | llama2 ([INST]...[/INST]) | template (tokenizer's)")
    max_new_tokens: int | None = field(None, help="override the per-task generation length")
    sampling: bool = field(False, help="sample (top-p) instead of greedy decoding")
    top_p: float = field(0.95, help="top-p when sampling")
    temperature: float = field(1.0, help="temperature when sampling")
    # ppl
    lengths: list[str] = field(default_factory=lambda: ["1024", "2560"], help="ppl: total lengths, TOTAL or TOTAL:DECODER")
    decoder_len: int = field(512, help="ppl: decoder tokens when a length gives none")
    preset: Literal["none", "paper"] = field("none", help="ppl: 'paper' = 4K/8K/32K/128K with decoders 2K/4K/4K/4K")
    stride: int = field(256, help="ppl: window stride in tokens")
    eval_window: int = field(256, help="ppl: score the last N tokens of each window")
    max_windows: int | None = field(50, help="ppl: at most N windows per length (seeded random choice); null = all")
    max_windows_per_doc: int | None = field(None, help="ppl: at most N windows per document (paper 128K: 1)")
    max_windows_per_source: int | None = field(None, help="ppl: at most N windows per source (seeded random choice), before max_windows")
    min_doc_tokens: int | None = field(None, help="ppl: keep documents with at least N tokens (default: the longest total)")
    shard_split: str = field("test", help="ppl: split read when data is a prepare-data shard directory")
    baselines: list[str] = field(default_factory=lambda: ["decoder-only", "full-context"],
                                 help="ppl: decoder-only, full-context, other-document, other-source (CEPE reading another "
                                 "held-out window's context: same source and another document / another source)")
    bootstrap_samples: int = field(1000, help="ppl: bootstrap resamples of the windows for the 95% intervals")
    # ruler
    ruler_lengths: list[int] = field(default_factory=lambda: [1024, 2048], help="ruler: target lengths in tokens (prompt + generation)")
    num_samples: int = field(10, help="ruler: examples per task and length")
    ruler_haystack: str = field("embedded", help="ruler: essay haystack text: 'embedded' or a jsonl(.gz)/txt path")
    # qa (evaluation.md 1.3)
    passages_decoder: int = field(10, help="qa: top passages in the decoder window (cepe and decoder settings)")
    passages_encoder: list[int] = field(default_factory=lambda: [5, 10, 20, 50], help="qa: the next N passages in the encoder, one per chunk (one setting per N)")
    replug_passages: list[int] = field(default_factory=lambda: [5, 10, 20, 30], help="qa replug: passages ensembled (one setting per k)")
    replug_temperature: float = field(1.0, help="qa replug: passage weights softmax(retrieval score / temperature)")
    qa_baselines: list[str] = field(default_factory=lambda: ["decoder-fit", "replug"], help="qa: also run decoder (top passages_decoder), decoder-fit (as many passages as fit the window), replug")
    demos: int = field(2, help="qa: demonstrations (one passage each; in one encoder chunk for cepe); icl: demonstrations in the decoder for cepe")
    demo_data: str = field("", help="qa: demonstrations file in the data's layout (default: the data itself, the test question left out)")
    # icl (evaluation.md 1.4)
    icl_encoder_demos: list[int] = field(default_factory=lambda: [18, 38], help="icl cepe: more demonstrations in the encoder, one per chunk (one setting per N)")
    icl_decoder_demos: list[int] = field(default_factory=lambda: [2, 40], help="icl: demonstrations in the decoder alone (one setting per N)")
    icl_seeds: list[int] = field(default_factory=lambda: [42, 43, 44], help="icl: demonstration-sampling seeds (scores are averaged)")
    # ralm (evaluation.md 1.2)
    index: str = field("data/index", help="ralm: passage index directory built by `cepe index`")
    ralm_passages: list[int] = field(default_factory=lambda: [0, 4, 8, 16, 32], help="ralm: retrieved passages per window (one setting per k)")

    def __post_init__(self) -> None:
        # `--subtasks a,b` arrives as one item of a repeatable option: split commas here too
        for name in ("subtasks", "lengths", "baselines", "qa_baselines"):
            setattr(self, name, [part.strip() for item in getattr(self, name) for part in str(item).split(",") if part.strip()])
        if self.task not in TASKS:
            raise ConfigError(f"task: unknown task {self.task!r} (known: {', '.join(TASKS)})")
        if self.predictions and self.task not in ("longbench", "longbench-e"):
            raise ConfigError("predictions: only the longbench and longbench-e tasks score prediction files")
        for name in ("batch_size", "chunk_len", "stride", "eval_window", "num_samples", "decoder_len", "bootstrap_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        for name in ("limit", "max_length", "decoder_max_len", "max_new_tokens", "max_windows", "max_windows_per_doc",
                     "max_windows_per_source"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: expected a positive integer or null, got {value}")
        if self.max_encoder_chunks < 0:
            raise ConfigError(f"max_encoder_chunks: expected >= 0, got {self.max_encoder_chunks}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: expected 0 < top_p <= 1, got {self.top_p}")
        if self.policy == "replug" and self.task != "qa":
            raise ConfigError("policy: 'replug' is a qa policy (per-passage ensembling)")
        for name in ("passages_encoder", "replug_passages", "icl_encoder_demos", "icl_decoder_demos", "ralm_passages"):
            if any(n < 0 for n in getattr(self, name)):
                raise ConfigError(f"{name}: expected numbers >= 0, got {getattr(self, name)}")
        if self.passages_decoder < 0 or self.demos < 0:
            raise ConfigError(f"passages_decoder / demos: expected >= 0, got {self.passages_decoder} / {self.demos}")
        if self.replug_temperature <= 0:
            raise ConfigError(f"replug_temperature: expected > 0, got {self.replug_temperature}")
        unknown = [b for b in self.qa_baselines if b not in QA_BASELINES]
        if unknown:
            raise ConfigError(f"qa_baselines: unknown baseline {unknown[0]!r} (known: {', '.join(QA_BASELINES)})")
        if any(n < 64 for n in self.ruler_lengths):
            raise ConfigError(f"ruler_lengths: expected lengths of at least 64 tokens, got {self.ruler_lengths}")

    @classmethod
    def unread_keys(cls, values: dict[str, Any]) -> frozenset[str]:
        """Keys a params section for `values["task"]` leaves out (pipeline/stages/registry.py)."""
        return keys_unread_by(values.get("task", "ppl"))

    @property
    def output_dir(self) -> Path:
        return Path(self.output or f"reports/evaluate/{self.task}")


def run(config: EvaluateConfig) -> dict[str, Any]:
    """Run the configured evaluation; returns the metrics it wrote."""
    from pipeline.evaluate import runners
    from pipeline.evaluate.report import RunRecord
    from pipeline.io import atomic_directory, disk_full_as_error

    record = RunRecord(config.task, to_dict(config))
    out = config.output_dir
    if config.predictions and Path(config.predictions).resolve() == out.resolve():
        raise CepeError("output: must differ from the predictions folder (the output folder is replaced)")
    with disk_full_as_error(out), atomic_directory(out) as tmp:
        if config.task == "ppl":
            metrics = runners.run_ppl(config, tmp, record)
        elif config.task in ("longbench", "longbench-e"):
            metrics = runners.run_longbench(config, tmp, record)
        elif config.task == "zeroscrolls":
            metrics = runners.run_zeroscrolls(config, tmp, record)
        elif config.task == "ruler":
            metrics = runners.run_ruler(config, tmp, record)
        else:
            from pipeline.evaluate import downstream

            metrics = downstream.RUNNERS[config.task](config, tmp, record)
    return metrics
