"""The CEPE encoder: a small bidirectional Llama that reads the context in independent chunks.

The paper's encoder is a LLaMA-architecture transformer (RMSNorm, RoPE, SwiGLU) trained with
masked-language modelling: 24 layers, 1024 wide, 16 heads, FFN 4096, over the decoder's own
vocabulary plus one `[MASK]` token (docs/method.md §1.1). It is a plain `LlamaModel` with causal
masking switched off, so every `transformers` attention backend serves it unchanged.

Chunks are encoded independently: `(B, n, L)` is flattened to `(B*n, L)`, so RoPE positions
restart at 0 in every chunk and no chunk sees another; the outputs are concatenated back to
`(B, n*L, H_enc)`. Padding goes on the right of a chunk, so the real tokens keep positions
0..len-1 and their states do not depend on the padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from pipeline.decoders import decoder_body


class CepeEncoderConfig(LlamaConfig):
    """A `LlamaConfig` for a non-causal encoder; `mask_token_id` is the `[MASK]` id (= decoder vocab)."""

    model_type = "cepe_encoder"


# The paper's encoder (hyen/LLaMA-MLM-Large): about 435M parameters with the LLaMA-2 vocabulary.
PAPER_ENCODER = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)


@dataclass(frozen=True)
class EncoderSpec:
    """The shape of an encoder built fresh (not loaded, not taken from decoder layers): what every
    stage that builds one states, whatever its options are called. Defaults are the paper's."""

    layers: int = PAPER_ENCODER["num_hidden_layers"]
    hidden_size: int = PAPER_ENCODER["hidden_size"]
    intermediate_size: int = PAPER_ENCODER["intermediate_size"]
    heads: int = PAPER_ENCODER["num_attention_heads"]
    max_position_embeddings: int = PAPER_ENCODER["max_position_embeddings"]

    def problem(self, names: dict[str, str], divisible: bool = True) -> str | None:
        """What is wrong with this shape, naming the user's option (`names`: field -> option): a
        size below 1, or (`divisible`) heads that do not divide the width; None if nothing."""
        for key in ("layers", "hidden_size", "intermediate_size", "heads", "max_position_embeddings"):
            if key in names and getattr(self, key) < 1:
                return f"{names[key]}: expected an integer >= 1, got {getattr(self, key)}"
        if divisible and self.hidden_size % self.heads:
            return f"{names['heads']}: {self.heads} does not divide {names['hidden_size']} {self.hidden_size}"
        return None

    def config_values(self) -> dict[str, int]:
        """The `CepeEncoderConfig` fields this spec sets (multi-head attention: kv heads = heads)."""
        return dict(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                    num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.heads,
                    max_position_embeddings=self.max_position_embeddings)


def build_encoder_config(decoder_vocab_size: int, **overrides) -> CepeEncoderConfig:
    """Encoder config over the decoder's vocabulary plus `[MASK]` (id `decoder_vocab_size`).

    Defaults are the paper's shape; pass `hidden_size=...` etc. to shrink it.
    """
    values = dict(PAPER_ENCODER)
    values.update(overrides)
    vocab = values.pop("vocab_size", decoder_vocab_size + 1)
    if vocab <= decoder_vocab_size:
        raise ValueError(f"encoder vocab_size {vocab} must exceed the decoder's {decoder_vocab_size} ([MASK])")
    mask_token_id = values.pop("mask_token_id", decoder_vocab_size)
    config = CepeEncoderConfig(vocab_size=vocab, mask_token_id=mask_token_id, **values)
    config.is_causal = False
    return config


def _bidirectional_mask(padding_mask: torch.Tensor, dtype: torch.dtype, attn_impl: str) -> torch.Tensor | None:
    """(N, L) key-padding mask -> the 4-D mask `LlamaModel` passes through as-is, or None.

    Rows that are all padding (an empty chunk) attend to everything instead, so their (discarded)
    outputs stay finite; a fully masked softmax would give NaN, and NaN * 0 is still NaN in the
    backward pass.
    """
    if attn_impl == "sdpa" and bool(padding_mask.all()):
        return None  # no padding: sdpa runs its fused kernel, non-causal through `is_causal=False`
    keys = padding_mask.bool()
    keys = keys | ~keys.any(dim=-1, keepdim=True)  # empty rows: attend everywhere
    allowed = keys[:, None, None, :].expand(-1, 1, keys.shape[-1], -1)  # (N, 1, L, L)
    if attn_impl == "sdpa" or attn_impl.startswith("flex"):
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=padding_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


class CepeEncoder(LlamaModel):
    """Bidirectional Llama encoder; output = last layer's hidden states after the final norm."""

    config_class = CepeEncoderConfig
    base_model_prefix = "model"

    def __init__(self, config: CepeEncoderConfig):
        config.is_causal = False
        super().__init__(config)
        for layer in self.layers:
            layer.self_attn.is_causal = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """input_ids, attention_mask: (N, L) -> BaseModelOutputWithPast, last_hidden_state (N, L, H)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.dim() == 2:
            # An explicit 4-D mask is passed through unchanged by every transformers 5.x release,
            # whereas honouring `config.is_causal=False` is recent: build it here.
            attention_mask = _bidirectional_mask(
                attention_mask, self.embed_tokens.weight.dtype, self.config._attn_implementation or "sdpa"
            )
        kwargs.pop("use_cache", None)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, is_causal=False, **kwargs)

    def compile_layers(self, **compile_kwargs) -> None:
        """torch.compile each layer in place (inference speed: fuses the norms, rotary and SwiGLU
        that otherwise cost about as much as the matmuls at the encoder's width).

        Only the layers are compiled: the mask logic around them inspects the mask on the host.
        All layers share one code object, so the first call compiles once for all of them; a
        second chunk-batch size (the last, partial batch) recompiles once with a dynamic batch.
        """
        for layer in self.layers:
            layer.compile(**compile_kwargs)

    def encode_chunks(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        chunk_batch_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode every chunk independently and concatenate.

        Args:
            input_ids: (B, n, L) token ids, right-padded within a chunk.
            attention_mask: (B, n, L), 1 for real tokens; None means no padding.
            chunk_batch_size: encode at most this many chunks per forward (bounds activation
                memory at long contexts); None encodes all B*n chunks at once.
        Returns:
            states (B, n*L, H_enc) and the key-padding mask (B, n*L) (bool).
        """
        batch, n_chunks, chunk_len = input_ids.shape
        flat_ids = input_ids.reshape(batch * n_chunks, chunk_len)  # (B*n, L): chunks are independent rows
        if attention_mask is None:
            flat_mask = torch.ones_like(flat_ids, dtype=torch.bool)
        else:
            flat_mask = attention_mask.reshape(batch * n_chunks, chunk_len).bool()
        step = chunk_batch_size or flat_ids.shape[0]
        pieces = []
        for start in range(0, flat_ids.shape[0], step):
            ids = flat_ids[start : start + step]
            mask = flat_mask[start : start + step]
            pieces.append(self(ids, attention_mask=mask).last_hidden_state)
        states = torch.cat(pieces, dim=0)  # (B*n, L, H)
        states = states.reshape(batch, n_chunks * chunk_len, states.shape[-1])  # (B, n*L, H)
        return states, flat_mask.reshape(batch, n_chunks * chunk_len)


class MLMHead(nn.Module):
    """dense -> silu -> RMSNorm -> vocabulary projection with bias (tied to the embeddings)."""

    def __init__(self, config: CepeEncoderConfig):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = nn.SiLU()
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(hidden))))


class CepeEncoderForMaskedLM(PreTrainedModel):
    """The encoder with its MLM head, for `cepe pretrain-encoder`; the head is dropped afterwards.

    Saved weights are `model.*` (the encoder) and `mlm_head.*`, so `CepeEncoder.from_pretrained`
    on this directory loads the encoder alone.
    """

    config_class = CepeEncoderConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _tied_weights_keys = {"mlm_head.decoder.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CepeEncoderConfig):
        super().__init__(config)
        self.model = CepeEncoder(config)
        self.mlm_head = MLMHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.mlm_head.decoder

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif hasattr(module, "weight") and module.__class__.__name__.endswith("RMSNorm"):
            nn.init.ones_(module.weight)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        """input_ids, attention_mask, labels: (N, L); labels -100 except at masked positions."""
        hidden = self.model(input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.mlm_head(hidden)  # (N, L, V)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
            )
        return MaskedLMOutput(loss=loss, logits=logits)


def encoder_from_decoder_layers(decoder: PreTrainedModel, num_layers: int) -> CepeEncoder:
    """An encoder of the decoder's width, initialised from its embeddings and first layers.

    The decoder's lower layers run bidirectionally become the encoder: an alternative to MLM
    pretraining when no pretrained encoder shares the decoder's tokenizer. The `[MASK]` row is
    the mean of the embedding table.
    """
    dconf = decoder.config
    config = build_encoder_config(
        dconf.vocab_size,
        hidden_size=dconf.hidden_size,
        intermediate_size=dconf.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=dconf.num_attention_heads,
        num_key_value_heads=getattr(dconf, "num_key_value_heads", dconf.num_attention_heads),
        head_dim=getattr(dconf, "head_dim", dconf.hidden_size // dconf.num_attention_heads),
        max_position_embeddings=dconf.max_position_embeddings,
        rms_norm_eps=dconf.rms_norm_eps,
        rope_parameters=getattr(dconf, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(dconf, "rope_theta", 10000.0)},
        tie_word_embeddings=True,
    )
    # Qwen2-style decoders carry q/k/v biases; a Llama encoder then needs attention biases too
    # (its o-projection bias, which Qwen2 lacks, starts at zero).
    base = decoder_body(decoder)
    has_bias = getattr(base.layers[0].self_attn.q_proj, "bias", None) is not None
    config.attention_bias = has_bias
    if num_layers > dconf.num_hidden_layers:
        raise ValueError(f"encoder layers {num_layers} > decoder layers {dconf.num_hidden_layers}")
    config._attn_implementation = dconf._attn_implementation
    encoder = CepeEncoder(config)
    with torch.no_grad():
        emb = base.embed_tokens.weight
        encoder.embed_tokens.weight[: emb.shape[0]].copy_(emb)
        encoder.embed_tokens.weight[emb.shape[0] :].copy_(emb.float().mean(0).to(emb.dtype))
        for i in range(num_layers):
            src = base.layers[i].state_dict()
            # A CEPE decoder layer also holds cross-attention weights: copy the Llama ones only.
            src = {k: v for k, v in src.items() if not k.startswith("cross_attn.")}
            missing, unexpected = encoder.layers[i].load_state_dict(src, strict=False)
            if unexpected or set(missing) - {"self_attn.o_proj.bias"}:
                raise ValueError(f"decoder layer {i} does not fit a Llama encoder layer: missing {missing}, unexpected {unexpected}")
            if missing:
                encoder.layers[i].self_attn.o_proj.bias.zero_()
        encoder.norm.weight.copy_(base.layers[num_layers].input_layernorm.weight if num_layers < dconf.num_hidden_layers else base.norm.weight)
    encoder.to(base.embed_tokens.weight.dtype)
    return encoder
