"""A tiny CEPE model directory as a training stage writes it (weights, tokenizer, geometry)."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import TINY_ENCODER, tiny_decoder

CHUNK_LEN = 16
DECODER_LEN = 96


def save_tiny_cepe(path: Path, chunk_len: int = CHUNK_LEN, decoder_len: int = DECODER_LEN) -> Path:
    """A random tiny CEPE model over the embedded tokenizer, saved with it.

    The cross-attention's o-projection is copied from self-attention ("copy"), not zero, so the
    context changes the output and a test comparing outputs with and without it can fail.
    """
    from pipeline.data.tokenize import load_tokenizer, tokenizer_info
    from pipeline.model import CepeForCausalLM

    tok = load_tokenizer("embedded")
    decoder = tiny_decoder(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, max_position_embeddings=256)
    torch.manual_seed(1)
    model = CepeForCausalLM.from_decoder(decoder, encoder_config=dict(TINY_ENCODER), init_mode="copy").eval()
    with torch.no_grad():  # confident logits: greedy ties between near-equal tokens would be luck
        model.decoder.lm_head.weight.mul_(20)
    model.record_training_geometry(chunk_len, decoder_len, tokenizer_info(tok, "embedded"))
    model.save_pretrained(path, tokenizer=tok)
    return path


TEXT = ("Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, seemed to "
        "unite some of the best blessings of existence; and had lived nearly twenty-one years in the world with "
        "very little to distress or vex her. She was the youngest of the two daughters of a most affectionate, "
        "indulgent father; and had, in consequence of her sister's marriage, been mistress of his house from a "
        "very early period. ")
