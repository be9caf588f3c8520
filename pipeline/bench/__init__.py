"""`cepe bench`: memory and speed of CEPE against full attention, side by side in one run.

- `presets`: the model shapes (LLaMA-2-7B, the paper's encoder, tiny CPU ones) or a config path;
- `split`: how a total length divides between CEPE's encoder and decoder;
- `costs`: FLOPs and bytes from the shapes (memory model, decode byte floor);
- `device`: CUDA-event clock, allocator counters, OOM capture, measured device ceilings;
- `sides`: full attention and CEPE behind one interface (build, prefill, state, costs);
- `decode`: the plain and static-cache (CUDA-graph) greedy loops both sides share;
- `runner`: the measurement plan; `report`: bench.json / bench.md, ratios and targets.
"""
