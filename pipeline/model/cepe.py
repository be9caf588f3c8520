"""CEPE: a frozen, unmodified `transformers` decoder with cross-attention to a chunked encoder.

Wrap, don't fork. `CepeForCausalLM` holds
- `decoder`: the decoder exactly as `AutoModelForCausalLM` builds it (Llama, Mistral, Qwen2, ...).
  Only the class of each chosen decoder layer is swapped for a subclass (`Cepe<LayerClass>`)
  that owns one extra sublayer, `cross_attn`, run between the self-attention residual and the MLP
  (docs/method.md §1.3). All original state-dict keys (`decoder.model.layers.N.self_attn...`) are
  untouched, so the pretrained decoder loads as it is; the new keys are
  `decoder.model.layers.N.cross_attn.*`.
- `encoder`: a `CepeEncoder` (bidirectional Llama) over the decoder's vocabulary + `[MASK]`.

The encoder states reach the layers as keyword arguments: the decoder's `forward` passes unknown
kwargs unchanged down to every decoder layer. With no encoder input at all, every layer skips its
cross-attention and the model *is* the plain decoder.

Generation: `generate()` encodes the context once, then passes the states (B, S, H_enc) on every
step; the self-attention cache covers decoder tokens only. Cross-attention K/V are not cached: the
projected form recomputes them per step as the paper does, and the absorbed form (the default for
few queries over a long context, see cross_attention.py) never materialises them at all.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel

from pipeline.decoders import check_pre_norm_layers, decoder_layers, is_cepe_model  # noqa: F401 (is_cepe_model: part of pipeline.model's API)
from pipeline.model.cross_attention import FORMS, CepeCrossAttention, KeyMask, lean_norm
from pipeline.model.encoder import CepeEncoder, CepeEncoderConfig, build_encoder_config

INIT_MODES = ("zero", "copy", "normal", "none")

# transformers >= 5.2x names the cache `cache` (`past_key_values` kept as an alias until 5.40);
# 5.17 names it `past_key_values`. Everything here accepts both and passes on the installed name.
from transformers import LlamaForCausalLM as _Probe  # noqa: E402

CACHE_KW = "cache" if "cache" in inspect.signature(_Probe.forward).parameters else "past_key_values"
del _Probe


class CepeConfig(PretrainedConfig):
    """Config of a CEPE model: the decoder's and encoder's configs plus the CEPE knobs.

    Args:
        decoder_config: the wrapped decoder's config (a dict with its `model_type`, or a config).
        encoder_config: the encoder's `CepeEncoderConfig` (dict or config).
        num_cross_attn_layers: cross-attention in the last N decoder layers; None = all (paper).
        cross_attn_init: o-projection init when wrapping a plain decoder: zero (paper run), copy,
            normal; q/k/v/norm are always copied from self-attention (docs/method.md §1.4).
        cross_attn_form: auto | projected | absorbed (see cross_attention.py).
        absorbed_min_context: with `auto`, the absorbed form is used only from this many context
            tokens on. On an H200 (docs/results/bench.md) the absorbed form decoded faster from 2K
            context tokens on (9.7 vs 10.8 ms/token at 2K, 11 vs 35 at 28K, 15.5 vs 133 at 124K).
        decoder_name_or_path: where the decoder came from; required to reload a model saved with
            `save_decoder=False`.
        save_decoder: whether `save_pretrained` writes the decoder's weights too.
        train_encoder: whether the encoder's parameters are trainable (the decoder never is).
        encoder_chunk_batch_size: encode at most this many chunks per encoder forward.
        chunk_len: the encoder chunk length the model was trained with (None: not recorded).
            Generation refuses context chunked otherwise (`check_chunk_len`): a chunk's states
            depend on its length, and a model trained on 256-token chunks reads 512-token ones
            silently worse.
        decoder_len: the decoder window it was trained with (None: not recorded); what
            `cepe generate` / `cepe serve` give the decoder by default.
        tokenizer_record: the tokenizer its training windows were made with, as shard manifests
            record it (`name`, `sha256` of its serialization, `vocab_size`); the saved directory
            holds that tokenizer, and loaders compare its hash.
    """

    model_type = "cepe"
    sub_configs = {"decoder_config": AutoConfig, "encoder_config": AutoConfig}

    def __init__(
        self,
        decoder_config: dict | PretrainedConfig | None = None,
        encoder_config: dict | PretrainedConfig | None = None,
        num_cross_attn_layers: int | None = None,
        cross_attn_init: str = "zero",
        cross_attn_form: str = "auto",
        absorbed_min_context: int = 1024,
        decoder_name_or_path: str | None = None,
        save_decoder: bool = True,
        train_encoder: bool = True,
        encoder_chunk_batch_size: int | None = None,
        chunk_len: int | None = None,
        decoder_len: int | None = None,
        tokenizer_record: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        if isinstance(decoder_config, dict):
            decoder_config = AutoConfig.for_model(**decoder_config)
        if isinstance(encoder_config, dict):
            encoder_config = CepeEncoderConfig(**{k: v for k, v in encoder_config.items() if k != "model_type"})
        if encoder_config is not None:
            encoder_config.is_causal = False
        if cross_attn_init not in INIT_MODES:
            raise ValueError(f"cross_attn_init: expected one of {INIT_MODES}, got {cross_attn_init!r}")
        if cross_attn_form not in FORMS:
            raise ValueError(f"cross_attn_form: expected one of {FORMS}, got {cross_attn_form!r}")
        self.decoder_config = decoder_config
        self.encoder_config = encoder_config
        self.num_cross_attn_layers = num_cross_attn_layers
        self.cross_attn_init = cross_attn_init
        self.cross_attn_form = cross_attn_form
        self.absorbed_min_context = absorbed_min_context
        self.decoder_name_or_path = decoder_name_or_path
        self.save_decoder = save_decoder
        self.train_encoder = train_encoder
        self.encoder_chunk_batch_size = encoder_chunk_batch_size
        self.chunk_len = chunk_len
        self.decoder_len = decoder_len
        self.tokenizer_record = tokenizer_record
        if decoder_config is not None:
            kwargs.setdefault("tie_word_embeddings", getattr(decoder_config, "tie_word_embeddings", False))
            for name in ("bos_token_id", "eos_token_id", "pad_token_id", "vocab_size"):
                kwargs.setdefault(name, getattr(decoder_config, name, None))
        super().__init__(**kwargs)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PretrainedConfig:
        """The decoder's config: what caches and generation size themselves by."""
        if encoder and not decoder:
            return self.encoder_config
        return self.decoder_config

    def cross_attn_layer_ids(self) -> list[int]:
        total = self.decoder_config.num_hidden_layers
        n = total if self.num_cross_attn_layers is None else self.num_cross_attn_layers
        if not 0 < n <= total:
            raise ValueError(f"num_cross_attn_layers: expected 1..{total}, got {n}")
        return list(range(total - n, total))


# ---------------------------------------------------------------------------------------------
# The decoder layer with a cross-attention sublayer
# ---------------------------------------------------------------------------------------------
class CrossAttentionLayerMixin:
    """Forward of a pre-norm decoder layer with cross-attention between self-attention and MLP.

        h = h + SelfAttn(RMSNorm_in(h))                  # frozen, causal, RoPE
        h = h + CrossAttn(RMSNorm_x(h), Phi, enc_mask)   # new: trainable, no positions, no gate
        h = h + MLP(RMSNorm_post(h))                     # frozen

    It reuses the layer's own submodules (`input_layernorm`, `self_attn`,
    `post_attention_layernorm`, `mlp`), which Llama, Mistral and Qwen2 layers all have, and
    passes every other keyword (cache, positions, rotary embeddings) to self-attention untouched.
    While training, the two norms (and the cross-attention's own) are recomputed in the backward
    pass instead of keeping their fp32 intermediates (`cross_attention.lean_norm`).
    """

    cross_attn: CepeCrossAttention

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *args: Any,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_padding_mask: torch.Tensor | None = None,
        cross_attn_form: str | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = lean_norm(self.input_layernorm, hidden_states)  # recomputed in the backward pass
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids, *args, **kwargs
        )
        hidden_states = residual + hidden_states
        if encoder_hidden_states is not None:
            hidden_states = hidden_states + self.cross_attn(
                hidden_states, encoder_hidden_states, encoder_padding_mask, form=cross_attn_form
            )
        residual = hidden_states
        hidden_states = lean_norm(self.post_attention_layernorm, hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


_LAYER_CLASSES: dict[type, type] = {}


def cross_attention_layer_class(base: type) -> type:
    """`Cepe<Base>`: a subclass of the decoder's own layer class (so isinstance checks, hidden-state
    recording, `_no_split_modules` and gradient checkpointing keep working)."""
    if base in _LAYER_CLASSES or issubclass(base, CrossAttentionLayerMixin):
        return _LAYER_CLASSES.get(base, base)
    cls = type(f"Cepe{base.__name__}", (CrossAttentionLayerMixin, base), {"__module__": __name__})
    globals()[cls.__name__] = cls  # importable by name (pickling, repr)
    _LAYER_CLASSES[base] = cls
    return cls


def add_cross_attention(decoder: PreTrainedModel, config: CepeConfig) -> None:
    """Give each chosen decoder layer a `cross_attn` sublayer (in place, weights random); a decoder
    whose layers are not the pre-norm form is refused first (`check_pre_norm_layers`)."""
    check_pre_norm_layers(decoder)
    dconf = decoder.config
    econf = config.encoder_config
    head_dim = getattr(dconf, "head_dim", None) or dconf.hidden_size // dconf.num_attention_heads
    attn_impl = getattr(dconf, "_attn_implementation", None) or "sdpa"
    layers = decoder_layers(decoder)
    for idx in config.cross_attn_layer_ids():
        layer = layers[idx]
        if hasattr(layer, "cross_attn"):
            continue
        param = next(layer.parameters())
        cross = CepeCrossAttention(
            hidden_size=dconf.hidden_size,
            encoder_hidden_size=econf.hidden_size,
            num_heads=dconf.num_attention_heads,
            head_dim=head_dim,
            norm=layer.post_attention_layernorm,
            attn_implementation=attn_impl,
            form=config.cross_attn_form,
            absorbed_min_context=config.absorbed_min_context,
        ).to(device=param.device, dtype=param.dtype)
        layer.__class__ = cross_attention_layer_class(type(layer))
        layer.cross_attn = cross


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class CepeForCausalLM(PreTrainedModel, GenerationMixin):
    """A decoder LM that also reads a long context through a parallel chunk encoder.

    Build one around a pretrained decoder with `CepeForCausalLM.from_decoder(...)`; reload a saved
    one with `CepeForCausalLM.from_pretrained(path)` or, once `pipeline.model` is imported,
    `AutoModelForCausalLM.from_pretrained(path)`.
    """

    config_class = CepeConfig
    base_model_prefix = "cepe"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _no_split_modules: list[str] = []

    def __init__(self, config: CepeConfig, decoder: PreTrainedModel | None = None, encoder: CepeEncoder | None = None):
        super().__init__(config)
        attn_impl = getattr(config, "_attn_implementation", None)
        if decoder is None:
            if attn_impl:
                config.decoder_config._attn_implementation = attn_impl
            decoder = AutoModelForCausalLM.from_config(config.decoder_config)
        if encoder is None:
            if attn_impl:
                config.encoder_config._attn_implementation = attn_impl
            encoder = CepeEncoder(config.encoder_config)
        config.decoder_config = decoder.config
        config.encoder_config = encoder.config
        self.decoder = decoder
        self.encoder = encoder
        add_cross_attention(self.decoder, config)
        self._no_split_modules = list(
            {*getattr(decoder, "_no_split_modules", []), *getattr(encoder, "_no_split_modules", [])}
        )
        gen_config = getattr(decoder, "generation_config", None)
        self.post_init()
        if gen_config is not None:
            self.generation_config = gen_config
        self.apply_trainability()

    # -------------------------------------------------------------- construction
    @classmethod
    def from_decoder(
        cls,
        decoder: PreTrainedModel | str | os.PathLike[str],
        encoder: CepeEncoder | str | os.PathLike[str] | None = None,
        encoder_config: CepeEncoderConfig | dict | None = None,
        num_cross_attn_layers: int | None = None,
        init_mode: str = "zero",
        train_encoder: bool = True,
        cross_attn_form: str = "auto",
        absorbed_min_context: int = 1024,
        attn_implementation: str | None = None,
        dtype: torch.dtype | None = None,
        save_decoder: bool = True,
    ) -> "CepeForCausalLM":
        """Wrap a pretrained decoder (model or name/path) and initialise the new weights.

        `encoder` is a `CepeEncoder`, a directory saved by `pretrain-encoder` (MLM model or bare
        encoder), or None to build a fresh one from `encoder_config` (a dict of overrides of the
        paper's shape, e.g. `{"hidden_size": 256, "num_hidden_layers": 4}`).
        """
        name_or_path = None
        if not isinstance(decoder, PreTrainedModel):
            name_or_path = str(decoder)
            kwargs: dict[str, Any] = {}
            if dtype is not None:
                kwargs["dtype"] = dtype
            if attn_implementation:
                kwargs["attn_implementation"] = attn_implementation
            from pipeline.hub import require_local_or_hub

            require_local_or_hub(name_or_path, "decoder")
            decoder = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
        else:
            name_or_path = getattr(decoder.config, "_name_or_path", None) or None
            if attn_implementation:
                decoder.set_attn_implementation(attn_implementation)
        impl = decoder.config._attn_implementation or "sdpa"
        if encoder is None:
            overrides = dict(encoder_config or {}) if not isinstance(encoder_config, PretrainedConfig) else None
            econf = encoder_config if overrides is None else build_encoder_config(decoder.config.vocab_size, **overrides)
            econf._attn_implementation = impl
            encoder = CepeEncoder(econf)
        elif not isinstance(encoder, PreTrainedModel):
            encoder = load_encoder(encoder, attn_implementation=impl)
        param = next(decoder.parameters())
        encoder = encoder.to(device=param.device, dtype=dtype or param.dtype)
        config = CepeConfig(
            decoder_config=decoder.config,
            encoder_config=encoder.config,
            num_cross_attn_layers=num_cross_attn_layers,
            cross_attn_init=init_mode,
            cross_attn_form=cross_attn_form,
            absorbed_min_context=absorbed_min_context,
            decoder_name_or_path=name_or_path,
            save_decoder=save_decoder,
            train_encoder=train_encoder,
        )
        config._attn_implementation = impl
        model = cls(config, decoder=decoder, encoder=encoder)
        if init_mode != "none":
            model.init_cross_attention(init_mode)
        return model

    @torch.no_grad()
    def init_cross_attention(self, mode: str | None = None) -> None:
        """Re-apply the paper's initialisation to every cross-attention sublayer.

        Needed after `post_init`/`from_pretrained` paths that would otherwise leave the new
        weights at transformers' default random init.
        """
        mode = mode or self.config.cross_attn_init
        for layer in self.cross_attention_layers():
            layer.cross_attn.init_from_self_attention(layer, mode)

    def cross_attention_layers(self) -> list[nn.Module]:
        return [layer for layer in decoder_layers(self.decoder) if hasattr(layer, "cross_attn")]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # -------------------------------------------------------------- trainability
    def apply_trainability(self) -> None:
        """Freeze every original decoder parameter; cross-attention trains; encoder by config."""
        for name, param in self.decoder.named_parameters():
            param.requires_grad_(".cross_attn." in name)
        for param in self.encoder.parameters():
            param.requires_grad_(bool(self.config.train_encoder))

    def set_encoder_trainable(self, trainable: bool) -> None:
        self.config.train_encoder = bool(trainable)
        self.apply_trainability()

    def parameter_counts(self) -> dict[str, int]:
        """Trainable / frozen parameter counts by part (tied weights counted once)."""
        seen: set[int] = set()
        counts = {"decoder": 0, "cross_attention": 0, "encoder": 0, "trainable": 0, "frozen": 0}
        for name, param in self.named_parameters(remove_duplicate=True):
            if id(param) in seen:
                continue
            seen.add(id(param))
            part = "encoder" if name.startswith("encoder.") else "cross_attention" if ".cross_attn." in name else "decoder"
            counts[part] += param.numel()
            counts["trainable" if param.requires_grad else "frozen"] += param.numel()
        return counts

    # -------------------------------------------------------------- embeddings (HF API)
    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.decoder.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.decoder.get_output_embeddings()

    # -------------------------------------------------------------- forward
    def encode(
        self, encoder_input_ids: torch.Tensor, encoder_attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n, L) chunk ids (+ mask) -> encoder states (B, n*L, H_enc) and key mask (B, n*L)."""
        if encoder_input_ids.dim() == 2:  # (B, L): a single chunk per example
            encoder_input_ids = encoder_input_ids[:, None]
            if encoder_attention_mask is not None:
                encoder_attention_mask = encoder_attention_mask[:, None]
        return self.encoder.encode_chunks(
            encoder_input_ids, encoder_attention_mask, chunk_batch_size=self.config.encoder_chunk_batch_size
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        encoder_input_ids: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_padding_mask: torch.Tensor | None = None,
        cross_attn_form: str | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache_position: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """
        Args:
            input_ids: (B, T) decoder tokens; positions start at 0 whatever the context length.
            labels: (B, T), shifted inside (HF convention), -100 ignored.
            encoder_input_ids / encoder_attention_mask: (B, n, L) context chunks, right-padded.
            encoder_hidden_states / encoder_padding_mask: (B, S, H_enc) / (B, S): precomputed
                states (generation passes them back on every step); they take precedence.
        Returns:
            the decoder's `CausalLMOutputWithPast` with `loss` set and two extra entries,
            `encoder_hidden_states` and `encoder_padding_mask`.
        """
        if encoder_hidden_states is None and encoder_input_ids is not None:
            encoder_hidden_states, encoder_padding_mask = self.encode(encoder_input_ids, encoder_attention_mask)
        if encoder_hidden_states is not None and encoder_hidden_states.shape[1] == 0:
            encoder_hidden_states = encoder_padding_mask = None
        cache_obj = cache if cache is not None else past_key_values
        decoder_kwargs: dict[str, Any] = dict(kwargs)
        if cache_obj is not None:
            decoder_kwargs[CACHE_KW] = cache_obj
        if cache_position is not None:
            decoder_kwargs["cache_position"] = cache_position
        if encoder_hidden_states is not None:
            decoder_kwargs.update(
                encoder_hidden_states=encoder_hidden_states,
                # built once here, not in each of the layers (inspecting a mask syncs the host)
                encoder_padding_mask=KeyMask.build(encoder_padding_mask),
                cross_attn_form=cross_attn_form,
            )
        out = self.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **decoder_kwargs,
        )
        if labels is not None:
            logits = out.logits
            if logits.shape[1] != labels.shape[1]:  # logits_to_keep: score the kept tail only
                labels = labels[:, -logits.shape[1] :]
            out["loss"] = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        out["encoder_hidden_states"] = encoder_hidden_states
        out["encoder_padding_mask"] = encoder_padding_mask
        return out

    # -------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, **kwargs: Any):
        """`GenerationMixin.generate`, with the context encoded exactly once up front.

        Pass `encoder_input_ids` / `encoder_attention_mask` (B, n, L) like any model input; they
        are replaced by their encoder states, which every decoding step then reuses.
        """
        enc_ids = kwargs.pop("encoder_input_ids", None)
        enc_mask = kwargs.pop("encoder_attention_mask", None)
        if enc_ids is not None:
            self.check_chunk_len(int(enc_ids.shape[-1]))
        if enc_ids is not None and kwargs.get("encoder_hidden_states") is None:
            kwargs["encoder_hidden_states"], kwargs["encoder_padding_mask"] = self.encode(enc_ids, enc_mask)
        mask = kwargs.get("encoder_padding_mask")
        if mask is not None and bool(mask.all()):
            kwargs["encoder_padding_mask"] = None  # nothing to mask: no per-step mask handling
        return super().generate(inputs, **kwargs)

    # -------------------------------------------------------------- training geometry
    def record_training_geometry(self, chunk_len: int | None, decoder_len: int | None,
                                 tokenizer_record: dict[str, Any] | None) -> None:
        """Record what the model was trained with (saved in config.json by `save_pretrained`)."""
        self.config.chunk_len = int(chunk_len) if chunk_len else None
        self.config.decoder_len = int(decoder_len) if decoder_len else None
        if tokenizer_record:
            keep = ("name", "sha256", "vocab_size")
            self.config.tokenizer_record = {k: tokenizer_record.get(k) for k in keep}

    def check_chunk_len(self, chunk_len: int) -> None:
        """Refuse context chunks of another length than the model was trained with.

        Raises:
            CepeError: naming both lengths (only when the config records one).
        """
        trained = getattr(self.config, "chunk_len", None)
        if trained and int(chunk_len) != int(trained):
            from pipeline.errors import CepeError

            where = getattr(self.config, "_name_or_path", "") or "this model"
            raise CepeError(f"chunk_len: context chunks of {chunk_len} tokens, but {where} was trained with "
                            f"{trained}-token chunks (config.json chunk_len); chunk the context by {trained}")

    # -------------------------------------------------------------- save / load
    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any, tokenizer: Any = None,
                        **kwargs: Any) -> None:
        """`save_pretrained`, leaving out the decoder's own weights when `config.save_decoder` is
        False (the config then records `decoder_name_or_path` to reload them from).

        `tokenizer`, when given, is saved into the same directory, so that the directory stands
        alone (`AutoTokenizer.from_pretrained(save_directory)`); `record_training_geometry`
        records its identity.
        """
        if not self.config.save_decoder:
            if not self.config.decoder_name_or_path:
                raise ValueError("save_decoder=False needs config.decoder_name_or_path to reload the decoder from")
            state = kwargs.pop("state_dict", None) or self.state_dict()
            kwargs["state_dict"] = {
                k: v for k, v in state.items() if not k.startswith("decoder.") or ".cross_attn." in k
            }
        super().save_pretrained(save_directory, *args, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], *args: Any, **kwargs: Any):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if not model.config.save_decoder:
            model._load_decoder_weights(kwargs.get("dtype"))
        model.apply_trainability()
        return model

    @torch.no_grad()
    def _load_decoder_weights(self, dtype: Any = None) -> None:
        source = self.config.decoder_name_or_path
        param = next(self.decoder.parameters())
        from pipeline.hub import require_local_or_hub

        require_local_or_hub(source, "decoder")  # the saved model names its decoder, not stored with it
        plain = AutoModelForCausalLM.from_pretrained(source, dtype=param.dtype)
        missing, unexpected = self.decoder.load_state_dict(plain.state_dict(), strict=False)
        missing = [k for k in missing if ".cross_attn." not in k]
        if missing or unexpected:
            raise ValueError(
                f"decoder weights from {source} do not match the saved CEPE decoder "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        self.decoder.tie_weights()


def load_encoder(path: str | os.PathLike[str], attn_implementation: str | None = None) -> CepeEncoder:
    """A `CepeEncoder` from a directory saved as a bare encoder or as `CepeEncoderForMaskedLM`."""
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    encoder = CepeEncoder.from_pretrained(str(path), **kwargs)
    for layer in encoder.layers:
        layer.self_attn.is_causal = False
    return encoder


def register_auto_classes() -> None:
    """Make `AutoConfig` / `AutoModel*` resolve `cepe` and `cepe_encoder` directories."""
    from transformers import AutoModel, AutoModelForMaskedLM

    from pipeline.model.encoder import CepeEncoderForMaskedLM

    for model_type, conf in (("cepe", CepeConfig), ("cepe_encoder", CepeEncoderConfig)):
        try:
            AutoConfig.register(model_type, conf)
        except ValueError:
            pass  # already registered (re-import)
    for auto, conf, model in (
        (AutoModelForCausalLM, CepeConfig, CepeForCausalLM),
        (AutoModel, CepeEncoderConfig, CepeEncoder),
        (AutoModelForMaskedLM, CepeEncoderConfig, CepeEncoderForMaskedLM),
    ):
        try:
            auto.register(conf, model)
        except ValueError:
            pass


__all__ = [
    "CACHE_KW",
    "CepeConfig",
    "CepeForCausalLM",
    "add_cross_attention",
    "build_encoder_config",
    "is_cepe_model",
    "load_encoder",
    "register_auto_classes",
]
