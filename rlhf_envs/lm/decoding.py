"""Cached decoding over the lean GPT-2 forward: a prompt key/value table for a frozen reference, and a KV-cached
decoder."""

from __future__ import annotations

import torch

from rlhf_envs.lm.gpt2 import GPT2View
from rlhf_envs.lm.segments import additive_mask

__all__ = ["GPT2Decoder", "PromptKVCache"]


class PromptKVCache:
    """The reference model's state after each prompt of a fixed, left-padded prompt table ``[n, P]``.

    Per prompt: every layer's keys and values ``[n_layer, 2, H, P, hd]`` (the layout
    :meth:`GPT2View.packed_hidden` takes as ``past``) and the last position's hidden
    state ``[D]``, computed the first time the prompt is asked for and reused while the tensors the
    view reads are unchanged (the same tensors and storage, no in-place update: checked with each
    tensor's version counter on every :meth:`get`; any change empties the cache). For a frozen reference model that
    scores responses to the same prompts over and over, this takes the prompt tokens out of every
    scoring forward.
    """

    def __init__(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask.bool()
        self.kv: torch.Tensor | None = None
        self.last_hidden: torch.Tensor | None = None
        self.ready = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
        self.fingerprint: tuple = ()

    @staticmethod
    def nbytes(view: GPT2View, prompt_ids: torch.Tensor) -> int:
        """Memory the full table takes: keys, values and one hidden state per prompt."""
        n, length = prompt_ids.shape
        per_prompt = (2 * len(view.layers) * length + 1) * view.d_model
        return n * per_prompt * view.wte.element_size()

    def get(self, view: GPT2View, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kv, last_hidden)``: the whole table ``[n, n_layer, 2, H, P, hd]`` with prompts ``index [N]`` filled, and
        ``[N, D]``."""
        fingerprint = tuple((id(t), t.data_ptr(), t._version) for t in view.tensors)
        if fingerprint != self.fingerprint or self.kv is None:
            n, length = self.prompt_ids.shape
            device = self.prompt_ids.device
            shape = (n, len(view.layers), 2, view.n_head, length, view.head_dim)
            self.kv = torch.zeros(shape, dtype=view.dtype, device=device)
            self.last_hidden = torch.zeros(n, view.d_model, dtype=view.dtype, device=device)
            self.ready.zero_()
            self.fingerprint = fingerprint
        missing = index[~self.ready[index]].unique()
        if missing.numel():
            # One packed forward over the prompts' real tokens (no padding) writes their keys and values
            # into the table; a left-padded row's last column is its last prompt token.
            mask = self.prompt_mask[missing]
            last = torch.zeros_like(mask)
            last[:, -1] = True
            positions = (mask.long().cumsum(-1) - 1).clamp_(min=0)
            self.last_hidden[missing] = view.packed_hidden(self.prompt_ids[missing], mask, positions, last,
                                                           kv_out=(self.kv, missing))
            self.ready[missing] = True
        return self.kv, self.last_hidden[index]


class GPT2Decoder:
    """Prefill then one-token steps for left-padded prompts, over a cache preallocated to ``P + max_new_tokens``.

    ``prefill()`` returns the last prompt position's logits ``[B, V]``; each ``step(tokens [B])``
    feeds one token per row and returns the next logits ``[B, V]``; ``keep_rows`` drops rows. Pad positions of the
    prompt
    attend only to themselves and are masked as keys; position ids come from the mask.
    """

    def __init__(self, view: GPT2View, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int):
        self.view = view
        self.prompt_ids = prompt_ids
        self.prompt_mask = prompt_mask.bool()
        batch, self.filled = prompt_ids.shape
        total = self.filled + max_new_tokens
        device = prompt_ids.device
        self.cache = view.new_cache(batch, total, device)
        self.key_mask = torch.full((batch, 1, 1, total), torch.finfo(view.dtype).min, dtype=view.dtype, device=device)
        self.key_mask[:, 0, 0, : self.filled].masked_fill_(self.prompt_mask, 0.0)
        self.next_position = self.prompt_mask.long().sum(-1, keepdim=True)

    def prefill(self) -> torch.Tensor:
        return self.view.logits(self.prefill_hidden())

    def prefill_hidden(self) -> torch.Tensor:
        """Run the prompts into the cache; the last position's hidden state ``[B, D]`` (before ``ln_f``)."""
        length = self.filled
        keep = self.prompt_mask
        causal = torch.ones(length, length, dtype=torch.bool, device=keep.device).tril_()
        eye = torch.eye(length, dtype=torch.bool, device=keep.device)
        attn_mask = additive_mask(((keep[:, None, :] & causal) | eye).unsqueeze(1), self.view.dtype)
        positions = (keep.long().cumsum(-1) - 1).clamp_(min=0)
        return self.view.forward(self.prompt_ids, positions, attn_mask, self.cache, 0)[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        start = self.filled
        self.key_mask[:, :, :, start] = 0.0
        self.filled += 1
        hidden = self.view.forward(tokens[:, None], self.next_position, self.key_mask[..., : self.filled],
                                   self.cache, start)
        self.next_position += 1
        return self.view.logits(hidden[:, 0])

    def keep_rows(self, index: torch.Tensor) -> None:
        """Keep only rows ``index [R']`` (e.g. those that have not emitted EOS); later steps take ``R'`` tokens."""
        self.cache = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cache]
        self.key_mask = self.key_mask.index_select(0, index)
        self.next_position = self.next_position.index_select(0, index)
