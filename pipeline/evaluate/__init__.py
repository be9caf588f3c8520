"""Evaluation: one module per task family, metrics next to their task.

- `models.py`: load a CEPE model or plain decoder (+ tokenizer); one-line errors.
- `adapters.py`: input policies (`vanilla` middle truncation, `cepe-concat-truncate-left`) and
  batched greedy generation with the encoder run once per example.
- `ppl.py`: CEPE's long-context perplexity protocol and its baselines.
- `longbench.py` + `longbench_metrics.py`: THUDM LongBench v1 / LongBench-E, official scoring.
- `zeroscrolls.py`: the six ZeroSCROLLS tasks CEPE used for CEPED, with their metrics.
- `ruler.py`: RULER's synthetic needle / variable-tracking tasks, generated per tokenizer.
- `runners.py`: one runner per task family; `report.py`: run record, metrics.json, TSV plots.

The entry point is `pipeline.stages.evaluate.run(EvaluateConfig)` (`cepe evaluate`).
"""
