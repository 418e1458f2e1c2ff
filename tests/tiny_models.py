"""Tiny models built offline in the tests themselves (nothing is downloaded)."""

from __future__ import annotations

from typing import Any

import torch


def tiny_causal_lm(seed: int = 0, n_layer: int = 2, n_embd: int = 32, n_head: int = 2,
                   n_positions: int = 64) -> tuple[Any, Any]:
    """A randomly initialised GPT-2 and a byte-level tokenizer (258 tokens), built offline in < 1 s.

    For tests and smoke runs. Token ids 0..255 are bytes, 256 is ``<|endoftext|>`` (EOS), 257 is
    ``<pad>``. Returns ``(model, tokenizer)``; the tokenizer pads on the left.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    vocab["<|endoftext|>"] = 256
    vocab["<pad>"] = 257
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<pad>", padding_side="left")
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions, vocab_size=258,
                        bos_token_id=256, eos_token_id=256, pad_token_id=257)
    return GPT2LMHeadModel(config).eval(), tokenizer
