"""cepe: Context Expansion with Parallel Encoding for Llama-family decoders.

Importing `pipeline.model` registers the CEPE classes with `AutoConfig` and
`AutoModelForCausalLM`, so a saved CEPE model loads with `from_pretrained`.
"""

__version__ = "0.1.0"
