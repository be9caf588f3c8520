"""The two things compared: CEPE and full attention over the same total number of tokens.

- full attention: the decoder alone reads all `total` tokens (RoPE scaled with YaRN, as a
  long-context model would run them) and keeps their KV cache;
- CEPE: the encoder reads the first `total - decoder_tokens` tokens in independent 256-token
  chunks, the decoder reads the last `decoder_tokens` with cross-attention to the encoder
  states, and keeps those states plus its own KV cache.

Both sides expose the same operations (build, prefill, what they keep, what they cost) so the
runner measures them with one piece of code. Weights are random: speed and memory depend on the
shapes only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.bench import costs
from pipeline.bench.decode import greedy, output_cache
from pipeline.bench.device import Clock, building_on
from pipeline.bench.split import Split


@dataclass
class Prefill:
    """What a prefill leaves for decoding, and the marks that time it."""

    first: torch.Tensor  # (B, 1) greedy token after the prompt
    cache: Any  # the decoder's self-attention cache
    start: int  # positions already in that cache
    step_kwargs: dict[str, Any]  # extra inputs of every decode step (CEPE: the encoder states)
    marks: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # part -> (start, end)


def _random_ids(shape: tuple[int, ...], vocab: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    # Token ids 3..vocab-1 (no BOS/EOS/pad), drawn on the CPU for reproducibility, then moved.
    return torch.randint(3, vocab, shape, generator=generator).to(device)


def _registered(impl: str) -> str:
    """`impl`, registered with transformers first if it is decode_ops' own."""
    from pipeline.fastdecode import decode_ops

    return decode_ops.register_attention() if impl == decode_ops.ATTENTION_NAME else impl


class FullAttention:
    name = "full"
    packed: dict[str, int] | None = None  # what pack_for_decoding packed, when the runner packs the decoder

    def __init__(self, decoder_config: Any, device: torch.device, dtype: torch.dtype, max_positions: int,
                 attn_implementation: str = "sdpa"):
        from transformers import AutoModelForCausalLM

        from pipeline.bench.presets import long_context_config

        config = long_context_config(decoder_config, max_positions)
        config._attn_implementation = attn_implementation
        with building_on(device, dtype):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        self.device, self.dtype = device, dtype
        self.cache_config = self.model.config
        self.shape = costs.Shape.of(self.model.config)
        self.dtype_bytes = torch.finfo(dtype).bits // 8
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

    def set_attn_implementation(self, impl: str) -> None:
        self.model.set_attn_implementation(_registered(impl))

    @property
    def attn_implementation(self) -> str:
        return self.model.config._attn_implementation

    def start(self, split: Split) -> int:
        return split.total

    @torch.inference_mode()
    def prefill(self, split: Split, batch: int, clock: Clock, generator: torch.Generator) -> Prefill:
        ids = _random_ids((batch, split.total), self.shape.vocab, self.device, generator)
        start = clock.mark()
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        end = clock.mark()
        return Prefill(greedy(out.logits), output_cache(out), split.total, {}, {"forward": (start, end)})

    def context_state_bytes(self, prefill: Prefill, split: Split) -> int:
        """Bytes of the KV cache that belong to the tokens CEPE puts in its encoder."""
        total = 0
        for layer in prefill.cache.layers:
            for t in (layer.keys, layer.values):
                total += t[:, :, : split.context_tokens].numel() * t.element_size()
        return total

    def state_bytes(self, prefill: Prefill) -> int:
        return sum(t.numel() * t.element_size() for layer in prefill.cache.layers for t in (layer.keys, layer.values))

    def flops(self, split: Split, batch: int = 1) -> dict[str, int]:
        return {"forward": costs.decoder_flops(self.shape, split.total, batch=batch)}

    def bytes_per_context_token(self) -> int:
        return costs.full_bytes_per_token(self.shape, self.dtype_bytes)

    def decode_state_bytes(self, split: Split, tokens_after: int) -> int:
        """Bytes one sequence keeps while decoding `tokens_after` tokens past the prompt."""
        return (split.total + tokens_after) * self.bytes_per_context_token()

    def decode_floor_bytes(self, split: Split, batch: int) -> int:
        return costs.full_decode_step_bytes(self.shape, split.total, batch, self.dtype_bytes)

    def synthetic_step_kwargs(self, split: Split, batch: int, generator: torch.Generator) -> dict[str, Any]:
        return {}


class Cepe:
    name = "cepe"
    packed: dict[str, int] | None = None  # what pack_for_decoding packed, when the runner packs the decoder

    def __init__(self, decoder_config: Any, encoder_config: Any, device: torch.device, dtype: torch.dtype,
                 cross_attn_form: str = "auto", encoder_chunk_batch: int | None = None,
                 compile_encoder: bool = False):
        from transformers import AutoModelForCausalLM

        from pipeline.model import CepeEncoder, CepeForCausalLM

        with building_on(device, dtype):
            decoder = AutoModelForCausalLM.from_config(decoder_config, dtype=dtype)
            encoder = CepeEncoder(encoder_config)
            # "copy" gives the cross-attention a non-zero output, so the decode-loop checks see
            # the context; the cost is the same whatever the weights.
            self.model = CepeForCausalLM.from_decoder(
                decoder, encoder=encoder, init_mode="copy", cross_attn_form=cross_attn_form
            ).eval()
        self.model.config.encoder_chunk_batch_size = encoder_chunk_batch
        if compile_encoder:
            self.model.encoder.compile_layers()
        self.device, self.dtype = device, dtype
        self.cache_config = self.model.decoder.config
        self.shape = costs.Shape.of(self.model.decoder.config)
        self.encoder_shape = costs.Shape.of(self.model.encoder.config)
        self.dtype_bytes = torch.finfo(dtype).bits // 8
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.cross_layers = len(self.model.cross_attention_layers())
        self._cross = self.model.cross_attention_layers()[0].cross_attn

    @property
    def attn_implementation(self) -> str:
        return self.model.decoder.config._attn_implementation

    def set_attn_implementation(self, impl: str) -> None:
        """The decoder's self-attention backend (cross-attention keeps the one it was built with)."""
        self.model.decoder.set_attn_implementation(_registered(impl))

    def form(self, queries: int, context: int) -> str:
        """The cross-attention form the model picks for this many queries over this context."""
        return self._cross.choose_form(queries, context)

    def fused_decode(self, context: int) -> bool:
        """Whether a decode step's absorbed cross-attention over `context` states runs the one-pass kernel."""
        from pipeline.fastdecode import absorbed_decode

        return absorbed_decode.usable(self.device, self._cross.num_heads, context)

    def start(self, split: Split) -> int:
        return split.decoder_tokens

    @torch.inference_mode()
    def prefill(self, split: Split, batch: int, clock: Clock, generator: torch.Generator) -> Prefill:
        enc_ids = _random_ids((batch, split.n_chunks, split.chunk_len), self.shape.vocab, self.device, generator)
        dec_ids = _random_ids((batch, split.decoder_tokens), self.shape.vocab, self.device, generator)
        start = clock.mark()
        # (B, n, L) chunks -> (B, n*L, H_enc). The context has no padding, so its all-True mask
        # is not passed on (with a mask, every cross-attention layer checks it on the host).
        states, _mask = self.model.encode(enc_ids)
        mid = clock.mark()
        out = self.model(input_ids=dec_ids, encoder_hidden_states=states, use_cache=True, logits_to_keep=1)
        end = clock.mark()
        return Prefill(
            greedy(out.logits),
            output_cache(out),
            split.decoder_tokens,
            {"encoder_hidden_states": states},
            {"forward": (start, end), "encoder": (start, mid), "decoder": (mid, end)},
        )

    def context_state_bytes(self, prefill: Prefill, split: Split | None = None) -> int:
        """Bytes of the encoder states: all CEPE keeps of the tokens outside the decoder window."""
        states = prefill.step_kwargs["encoder_hidden_states"]
        return states.numel() * states.element_size()

    def state_bytes(self, prefill: Prefill) -> int:
        kv = sum(t.numel() * t.element_size() for layer in prefill.cache.layers for t in (layer.keys, layer.values))
        return kv + self.context_state_bytes(prefill)

    def flops(self, split: Split, batch: int = 1) -> dict[str, int]:
        encoder = costs.encoder_flops(self.encoder_shape, split.n_chunks, split.chunk_len, batch=batch)
        form = self.form(split.decoder_tokens, split.context_tokens)
        decoder = costs.decoder_flops(self.shape, split.decoder_tokens, batch=batch) + costs.cross_attention_flops(
            self.shape, self.encoder_shape, split.decoder_tokens, split.context_tokens, form, self.cross_layers, batch
        )
        return {"forward": encoder + decoder, "encoder": encoder, "decoder": decoder}

    def bytes_per_context_token(self) -> int:
        return costs.cepe_bytes_per_context_token(self.encoder_shape, self.dtype_bytes)

    def decode_state_bytes(self, split: Split, tokens_after: int) -> int:
        kv = (split.decoder_tokens + tokens_after) * costs.full_bytes_per_token(self.shape, self.dtype_bytes)
        return kv + split.context_tokens * self.bytes_per_context_token()

    def decode_floor_bytes(self, split: Split, batch: int) -> int:
        form = self.form(1, split.context_tokens)
        if form == "absorbed" and not self.fused_decode(split.context_tokens):
            form = "absorbed_matmul"  # no fused kernel here: the states are read twice per layer
        return costs.cepe_decode_step_bytes(
            self.shape, self.encoder_shape, split.decoder_tokens, split.context_tokens, form, batch,
            self.dtype_bytes, self.cross_layers,
        )

    def synthetic_step_kwargs(self, split: Split, batch: int, generator: torch.Generator) -> dict[str, Any]:
        # Drawn on the device: at 128K and a large batch these are tens of GB.
        states = torch.empty(batch, split.context_tokens, self.encoder_shape.hidden, device=self.device, dtype=self.dtype)
        return {"encoder_hidden_states": states.normal_()}
