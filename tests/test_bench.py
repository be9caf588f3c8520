"""`cepe bench`: presets, cost arithmetic, decode loops, OOM handling and the written report."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.bench import costs
from pipeline.bench.presets import decoder_config, encoder_config, long_context_config
from pipeline.bench.split import Split

GB = 1e9

# A CPU run small enough for the test suite: two lengths with the same decoder share (64 tokens),
# so the memory model can be checked against the growth between them.
TINY_RUN = dict(
    decoder="tiny", encoder="tiny", lengths=[192, 384], decoder_len=64, chunk_len=16, gen_tokens=3,
    plain_steps=2, form_steps=1, warmup=0, repeats=1, max_batch=2, batch_steps=2, dtype="float32", device="cpu",
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster than
    two contending ones (a decode step drops from ~50 to ~10 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(tmp_path, **overrides):
    from pipeline.stages.bench import BenchConfig

    values = {**TINY_RUN, "output_dir": str(tmp_path / "bench"), **overrides}
    return BenchConfig(**values)


# ---------------------------------------------------------------------------------------------
# Shapes and arithmetic (hand-computed numbers, docs/performance.md)
# ---------------------------------------------------------------------------------------------
def test_presets_are_the_papers_models():
    dec = costs.Shape.of(decoder_config("llama-2-7b"))
    enc = costs.Shape.of(encoder_config("cepe-435m", dec.vocab))
    assert (dec.layers, dec.hidden, dec.heads, dec.kv_heads, dec.head_dim, dec.ffn, dec.vocab) == (32, 4096, 32, 32, 128, 11008, 32000)
    assert dec.params == 6_738_415_616  # LLaMA-2-7B
    assert (enc.layers, enc.hidden, enc.heads, enc.ffn, enc.vocab) == (24, 1024, 16, 4096, 32001)
    assert enc.params == 435_472_384  # "435M"
    # 1.342B of cross-attention in 32 layers (docs/method.md §1.3)
    assert costs.cross_attention_params(dec, enc) == pytest.approx(1.342e9, rel=1e-3)


def test_shape_counts_match_built_models():
    from transformers import AutoModelForCausalLM

    from pipeline.model import CepeEncoder

    for spec in ("llama-2-7b", "smollm2-135m", "tiny"):
        config = decoder_config(spec)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
            encoder = CepeEncoder(encoder_config("cepe-435m" if spec == "llama-2-7b" else "tiny", config.vocab_size))
        assert sum(p.numel() for p in model.parameters()) == costs.Shape.of(config).params, spec
        assert sum(p.numel() for p in encoder.parameters()) == costs.Shape.of(encoder.config).params, spec


def test_memory_model_bytes_per_context_token():
    dec = costs.Shape.of(decoder_config("llama-2-7b"))
    enc = costs.Shape.of(encoder_config("cepe-435m", dec.vocab))
    assert costs.full_bytes_per_token(dec) == 2 * 32 * 32 * 128 * 2 == 524_288
    assert costs.cepe_bytes_per_context_token(enc) == 1024 * 2
    # performance.md: 124K context -> 0.26 GB of encoder states against 68.7 GB of KV cache
    assert 126_976 * costs.cepe_bytes_per_context_token(enc) / GB == pytest.approx(0.26, abs=0.005)
    assert 131_072 * costs.full_bytes_per_token(dec) / GB == pytest.approx(68.7, abs=0.05)
    tiny = costs.Shape.of(decoder_config("tiny"))  # GQA: 2 KV heads of 16
    assert costs.full_bytes_per_token(tiny, 4) == 2 * 2 * 2 * 16 * 4


def test_flop_counts_match_the_performance_document():
    dec = costs.Shape.of(decoder_config("llama-2-7b"))
    enc = costs.Shape.of(encoder_config("cepe-435m", dec.vocab))
    # full attention prefill at 128K: ~1.8 PFLOP linear, 4.5 causal attention
    assert costs.causal_attention_flops(dec, 131072) == pytest.approx(4.5e15, rel=0.01)
    linear = costs.decoder_flops(dec, 131072) - costs.causal_attention_flops(dec, 131072)
    assert linear == pytest.approx(1.7e15, rel=0.02)
    # CEPE at 128K: encoder 0.11, decoder 0.055, cross k/v 0.07, scores + values 0.27 PFLOP
    split = Split.of(131072, 4096, 256)
    assert costs.encoder_flops(enc, split.n_chunks, 256) == pytest.approx(0.105e15, rel=0.05)
    assert costs.decoder_flops(dec, 4096) == pytest.approx(0.057e15, rel=0.05)
    projected = costs.cross_attention_flops(dec, enc, 4096, split.context_tokens, "projected")
    q_o = 32 * 2 * 2 * 4096 * 4096 * 4096
    kv = 32 * 2 * 2 * split.context_tokens * 1024 * 4096
    assert kv == pytest.approx(0.068e15, rel=0.01)
    assert projected - q_o - kv == pytest.approx(0.27e15, rel=0.02)
    total_cepe = costs.encoder_flops(enc, split.n_chunks, 256) + costs.decoder_flops(dec, 4096) + projected
    assert costs.decoder_flops(dec, 131072) / total_cepe == pytest.approx(12, rel=0.1)  # "about 1/12"
    # one decode step: the absorbed form needs far fewer FLOPs than re-projecting 124K states
    absorbed = costs.cross_attention_flops(dec, enc, 1, split.context_tokens, "absorbed")
    assert absorbed < costs.cross_attention_flops(dec, enc, 1, split.context_tokens, "projected") / 5


def test_split_follows_the_papers_encoder_decoder_splits():
    assert Split.of(4096, 4096, 256) == Split(4096, 2048, 2048, 256)
    assert Split.of(8192, 4096, 256).context_tokens == 4096
    assert Split.of(32768, 4096, 256).n_chunks == 112
    assert Split.of(131072, 4096, 256).n_chunks == 496


def test_long_context_config_uses_yarn_to_the_longest_length():
    config = long_context_config(decoder_config("llama-2-7b"), 131072 + 300)
    rope = config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 33.0 and rope["original_max_position_embeddings"] == 4096
    assert long_context_config(decoder_config("llama-2-7b"), 4096).rope_parameters["rope_type"] == "default"


def test_config_rejects_lengths_that_do_not_split_into_chunks(tmp_path):
    from pipeline.config import ConfigError, load_config
    from pipeline.stages.bench import BenchConfig

    with pytest.raises(ConfigError, match=r"bench.lengths: 1000 leaves 500 encoder tokens"):
        load_config(BenchConfig, "bench", None, {"lengths": "1000"})
    with pytest.raises(ConfigError, match="bench.sides"):
        load_config(BenchConfig, "bench", None, {"sides": "full,moe"})
    config = load_config(BenchConfig, "bench", None, {"lengths": "131072,4096"})
    assert config.lengths == [4096, 131072]


def test_preset_or_path_errors_name_the_option(tmp_path):
    from pipeline.errors import CepeError

    with pytest.raises(CepeError, match="bench.decoder: 'llama-3' is neither a preset"):
        decoder_config("llama-3")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "vocab_size": 50}))
    assert costs.Shape.of(decoder_config(str(tmp_path))).hidden == 32


# ---------------------------------------------------------------------------------------------
# Decode loops: the static-cache loop generates exactly what the plain loop does
# ---------------------------------------------------------------------------------------------
def _tiny_side(name: str):
    """One side at the tiny presets, on the CPU in float32."""
    from pipeline.bench.sides import Cepe, FullAttention

    dec = decoder_config("tiny")
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    if name == "full":
        return FullAttention(dec, cpu, torch.float32, max_positions=512)
    return Cepe(dec, encoder_config("tiny", dec.vocab_size), cpu, torch.float32, encoder_chunk_batch=4)


@pytest.fixture(scope="module")
def tiny_sides():
    return {name: _tiny_side(name) for name in ("full", "cepe")}


@pytest.mark.parametrize("impl", ["sdpa", "eager", "cepe_decode"])
@pytest.mark.parametrize("name", ["full", "cepe"])
def test_static_loop_generates_the_plain_loops_tokens(tiny_sides, name, impl):
    side = tiny_sides[name]
    side.set_attn_implementation(impl)  # the 4-D mask is boolean for sdpa and cepe_decode, additive for eager
    try:
        _static_equals_plain(side, name)
    finally:
        side.set_attn_implementation("sdpa")


def _static_equals_plain(side, name, compile_step=False):
    from pipeline.bench import decode
    from pipeline.bench.device import Clock

    split = Split.of(384, 64, 16)
    clock = Clock(torch.device("cpu"))
    first = side.prefill(split, 2, clock, torch.Generator().manual_seed(1))
    plain = decode.plain_decode(side.model, first.cache, first.first, 5, clock, first.step_kwargs)
    again = side.prefill(split, 2, clock, torch.Generator().manual_seed(1))
    cache = decode.to_static(again.cache, side.cache_config, again.start + 8)
    assert all(layer.keys is None for layer in again.cache.layers)  # moved, not copied
    static = decode.static_decode(side.model, cache, again.first, again.start, 5, clock, again.step_kwargs, graph=False,
                                  compile_step=compile_step)
    assert static.loop == ("static+compile" if compile_step else "static")
    assert static.tokens.shape == (2, 5)
    assert torch.equal(plain.tokens, static.tokens)
    if name == "cepe":  # the encoder states matter: other states, other tokens
        other = side.prefill(split, 2, clock, torch.Generator().manual_seed(1))
        states = other.step_kwargs["encoder_hidden_states"]
        kwargs = {"encoder_hidden_states": states.flip(1) * 3}
        swapped = decode.plain_decode(side.model, other.cache, other.first, 5, clock, kwargs)
        assert not torch.equal(swapped.tokens, plain.tokens)


@pytest.mark.parametrize("name", ["full", "cepe"])
def test_packed_sides_decode_as_the_plain_loop(name):
    """`pack_decoder`: a side packed for decoding still generates its plain loop's tokens."""
    from pipeline.fastdecode.decode_packing import pack_for_decoding

    side = _tiny_side(name)
    assert pack_for_decoding(side.model)["attention"] == costs.Shape.of(decoder_config("tiny")).layers
    _static_equals_plain(side, name)


@pytest.mark.parametrize("name", ["full", "cepe"])
def test_compiled_static_loop_generates_the_plain_loops_tokens(tiny_sides, name):
    """`compile_decode`: the torch.compile'd step (inductor) continues exactly as the eager one."""
    _static_equals_plain(tiny_sides[name], name, compile_step=True)


def test_synthetic_caches_have_the_planned_shapes(tiny_sides):
    from pipeline.bench import decode
    from pipeline.bench.device import Clock

    side = tiny_sides["full"]
    cpu = torch.device("cpu")
    static = decode.synthetic_static(side.cache_config, 3, 40, 50, cpu, torch.float32)
    assert static.layers[0].keys.shape == (3, 2, 50, 16) and int(static.layers[0].cumulative_length) == 40
    dynamic = decode.synthetic_dynamic(side.cache_config, 3, 40, cpu, torch.float32)
    assert dynamic.get_seq_length() == 40 and dynamic.layers[1].values.shape == (3, 2, 40, 16)
    first = torch.full((3, 1), 5)
    result = decode.static_decode(side.model, static, first, 40, 4, Clock(cpu), graph=False)
    assert result.tokens.shape == (3, 4) and int(static.layers[0].cumulative_length) == 44


# ---------------------------------------------------------------------------------------------
# Whole runs on the CPU presets
# ---------------------------------------------------------------------------------------------
def test_cli_run_writes_a_well_formed_report(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cepe_cli.main import cli

    monkeypatch.chdir(tmp_path)  # no params.yaml here: defaults + options only
    out = tmp_path / "results"
    args = ["bench", "--decoder", "tiny", "--encoder", "tiny", "--lengths", "192,384", "--decoder-len", "64",
            "--chunk-len", "16", "--gen-tokens", "3", "--plain-steps", "2", "--form-steps", "1", "--warmup", "0",
            "--repeats", "1", "--max-batch", "2", "--batch-steps", "2", "--dtype", "float32", "--device", "cpu", "--output-dir", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    assert report["complete"] is True
    assert set(report["lengths"]) == {"192", "384"}
    for total, entry in report["lengths"].items():
        assert entry["decoder_tokens"] == 64 and entry["context_tokens"] == int(total) - 64
        for side in ("cepe", "full"):
            head = entry[side]
            assert head["oom"] is False
            assert head["forward_s"] > 0 and head["decode_ms_per_token"] > 0
            assert head["decode_loop"] in ("plain", "static")
            assert "peak_gb" in head and head["context_state_gb"] > 0
            assert set(head["batch_1"]["decode"]) == {"plain", "static"}
            assert head["batch_max"]["batch"] == 2
            assert head["generation_batch_1"]["static"]["generation_tokens_per_s"] > 0
        assert entry["cepe"]["encoder_s"] > 0 and entry["cepe"]["decoder_s"] > 0
        assert set(entry["cepe"]["batch_1"]["decode_by_form"]) == {"projected", "absorbed"}
        # tiny: 32-wide encoder states (fp32) vs 2 layers x 2 x 2 KV heads x 16 (fp32) per token
        assert entry["ratios"]["context_state_ratio"] == pytest.approx(128 / 512)
        assert entry["cepe"]["context_state_gb"] == pytest.approx((int(total) - 64) * 128 / GB, rel=1e-3)
    # the memory model matches the measured growth of what each side keeps (within 10%)
    mm = report["memory_model"]
    assert mm["cepe"]["predicted_bytes_per_context_token"] == 128
    assert mm["full"]["predicted_bytes_per_context_token"] == 512
    for side in ("cepe", "full"):
        assert mm[side]["lengths_used"] == 2
        assert mm[side]["within_tensors"] is True
        assert mm[side]["error_tensors"] <= 0.10
    markdown = (out / "bench.md").read_text()
    assert "- Command: `" in markdown and "## Ratios, CEPE / full attention" in markdown
    assert markdown.count("| CEPE |") >= 2 and "| full attention |" in markdown


def test_out_of_memory_and_errors_are_reported_not_raised(tmp_path, monkeypatch):
    from pipeline.bench import sides
    from pipeline.stages.bench import run

    real_full, real_cepe = sides.FullAttention.prefill, sides.Cepe.prefill

    def full_prefill(self, split, batch, clock, generator):
        if split.total == 384:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 68.00 GiB")
        return real_full(self, split, batch, clock, generator)

    def cepe_prefill(self, split, batch, clock, generator):
        if split.total == 96:
            raise RuntimeError("boom")
        return real_cepe(self, split, batch, clock, generator)

    monkeypatch.setattr(sides.FullAttention, "prefill", full_prefill)
    monkeypatch.setattr(sides.Cepe, "prefill", cepe_prefill)
    report = run(_config(tmp_path, lengths=[96, 192, 384], max_batch=0, form_steps=0, gen_tokens=2, profile_lengths=[192]))
    assert report["complete"] is True
    full = report["lengths"]["384"]["full"]
    assert full["oom"] is True and "68.00 GiB" in full["error"]
    assert report["lengths"]["384"]["cepe"]["oom"] is False
    assert report["lengths"]["384"]["ratios"] == {"available": False, "why": "full attention OOM"}
    assert report["lengths"]["192"]["ratios"]["available"] is True
    assert report["lengths"]["96"]["cepe"]["error"].startswith("RuntimeError: boom")
    assert report["lengths"]["96"]["ratios"] == {"available": False, "why": "CEPE not measured"}
    saved = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert saved["lengths"]["384"]["full"]["oom"] is True
    markdown = (tmp_path / "bench" / "bench.md").read_text()
    assert "| OOM |" in markdown and "RuntimeError: boom" in markdown
    for side in ("cepe", "full"):  # the profile tables were written beside the report
        assert report["lengths"]["192"][side]["profile"] == {"file": f"profile_{side}_192.txt"}
        assert "one prefill" in (tmp_path / "bench" / f"profile_{side}_192.txt").read_text()


def test_a_7b_model_is_refused_on_the_cpu(tmp_path):
    from pipeline.bench.runner import Runner
    from pipeline.errors import CepeError

    with pytest.raises(CepeError, match="bench.decoder: llama-2-7b has 6.7B parameters"):
        Runner(_config(tmp_path, decoder="llama-2-7b", encoder="cepe-435m", lengths=[4096], decoder_len=4096, chunk_len=256))


def test_targets_and_ratios_from_measurements():
    from pipeline.bench.report import finalize

    def single(forward, peak, context, plain, static, loop="static+graph"):
        return {"forward_s": forward, "peak_gb": peak, "context_state_bytes": context, "context_state_gb": context / GB,
                "decode": {"plain": {"loop": "plain", "ms_per_token": plain}, "static": {"loop": loop, "ms_per_token": static}}}

    report = {
        "config": {"gen_tokens": 256},
        "models": {"cepe": {"bytes_per_context_token": 2048}, "full": {"bytes_per_context_token": 524288}},
        "lengths": {
            "131072": {
                "total": 131072, "decoder_tokens": 4096, "context_tokens": 126976, "chunks": 496,
                "cepe": {"batch_1": single(0.9, 20.0, 126976 * 2048, 120.0, 8.0)},
                "full": {"batch_1": single(12.0, 95.0, 126976 * 524288, 85.0, 20.0)},
            }
        },
    }
    finalize(report)
    entry = report["lengths"]["131072"]
    assert entry["ratios"]["forward_speedup"] == pytest.approx(12.0 / 0.9, rel=1e-4)
    assert entry["ratios"]["context_state_ratio"] == pytest.approx(1 / 256)
    assert entry["ratios"]["decode_loop"] == "static"  # the fastest loop both sides have
    assert entry["cepe"]["decode_ms_per_token"] == 8.0 and entry["cepe"]["decode_loop"] == "static+graph"
    assert entry["ratios"]["decode_ratio_by_loop"]["plain"] == pytest.approx(120 / 85)
    met = {row["metric"]: row["met"] for row in report["targets"]["checks"]}
    # peak 20 / 95 = 1/4.75 meets 1/4.5; decode 8 / 20 meets 1/2
    assert met == {"forward_speedup": True, "context_state_ratio": True, "peak_ratio": True, "decode_ratio": True}
    # G = 256 tokens after a 0.9 s prefill at 8 ms each
    assert entry["cepe"]["generation_batch_1"]["static+graph"]["generation_tokens_per_s"] == pytest.approx(256 / (0.9 + 256 * 0.008), rel=1e-3)


def test_largest_batch_plan_and_halving_on_oom(tmp_path, monkeypatch):
    from pipeline.bench.runner import Runner, plan_batch

    # H200, 7B full attention at 4K: 127 GB free beside the weights, 2.36 GB per sequence
    batch, why = plan_batch(int(127e9), int(4e9), int(0.5e9), 2.36e9, 256)
    assert batch == 51 and "2.360 GB per sequence" in why
    assert plan_batch(int(127e9), int(4e9), int(13e9), 70e9, 256)[0] == 1  # 128K: one sequence
    batch, why = plan_batch(int(127e9), int(4e9), 0, 1e6, 256)
    assert batch == 256 and why.endswith("capped at max_batch 256")

    runner = Runner(_config(tmp_path, max_batch=8))
    tried = []

    def batch_decode(side, split, batch):
        tried.append(batch)
        if batch > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"decode": {}, "peak_gb": None}

    monkeypatch.setattr(runner, "_batch_decode", batch_decode)
    result = runner._batch_cell(type("Side", (), {"name": "full"})(), Split.of(192, 64, 16))
    assert tried == [8, 4, 2]
    assert result["batch"] == 2 and result["oom_at"] == [8, 4] and result["planned_batch"] == 8


# ---------------------------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", ["full", "cepe"])
def test_cuda_graph_loop_generates_the_plain_loops_tokens(name):
    from pipeline.bench import decode
    from pipeline.bench.device import Clock
    from pipeline.bench.sides import Cepe, FullAttention

    gpu = torch.device("cuda")
    dec = decoder_config("tiny")
    torch.manual_seed(0)
    side = (FullAttention(dec, gpu, torch.float32, 512) if name == "full"
            else Cepe(dec, encoder_config("tiny", dec.vocab_size), gpu, torch.float32))
    split = Split.of(384, 64, 16)
    clock = Clock(gpu)
    a = side.prefill(split, 2, clock, torch.Generator().manual_seed(1))
    plain = decode.plain_decode(side.model, a.cache, a.first, 6, clock, a.step_kwargs)
    b = side.prefill(split, 2, clock, torch.Generator().manual_seed(1))
    cache = decode.to_static(b.cache, side.cache_config, b.start + 10)
    graph = decode.static_decode(side.model, cache, b.first, b.start, 4, clock, b.step_kwargs, graph=True, warmup=2)
    assert graph.loop == "static+graph"
    assert torch.equal(plain.tokens, graph.tokens)


@pytest.mark.gpu
@cuda
def test_memory_model_matches_allocator_growth_on_cuda(tmp_path):
    from pipeline.stages.bench import run

    report = run(_config(tmp_path, device="cuda", lengths=[1024, 2048, 4096], decoder_len=256, max_batch=0, form_steps=0))
    for side in ("cepe", "full"):
        check = report["memory_model"][side]
        assert check["within_allocator"] is True, check
