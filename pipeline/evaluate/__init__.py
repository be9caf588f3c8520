"""Evaluation: one module per task family, metrics next to their task.

- `models.py`: load a CEPE model or plain decoder (+ tokenizer); one-line errors.
- `adapters.py`: input policies (`vanilla` middle truncation, `cepe-concat-truncate-left`) and
  batched greedy generation with the encoder run once per example.
- `ppl.py`: CEPE's long-context perplexity protocol and its baselines.
- `longbench.py` + `longbench_metrics.py`: THUDM LongBench v1 / LongBench-E, official scoring.
- `zeroscrolls.py`: the six ZeroSCROLLS tasks CEPE used for CEPED, with their metrics.
- `ruler.py`: RULER's synthetic needle / variable-tracking tasks, generated per tokenizer.
- `qa.py`: open-domain QA over retrieved passages (CEPE / FlashRAG layouts), REPLUG, EM/F1.
- `icl.py`: the eleven PCW classification sets, balanced demonstrations, calibrated NLL scoring.
- `ralm.py` + `retrieval.py`: retrieval-augmented LM over a passage index (BM25 / dense).
- `runners.py`: one runner per benchmark family, `downstream.py`: the qa, icl and ralm runners;
  `report.py`: run record, metrics.json, TSV plots, data errors.

The entry point is `pipeline.stages.evaluate.run(EvaluateConfig)` (`cepe evaluate`).
"""
