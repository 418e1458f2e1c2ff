"""Which packed forward a model takes: one dispatch for every trainer, the envs and the sampler.

:func:`packed_view` returns the model's :class:`PackedForward`:

- a GPT-2 (``GPT2LMHeadModel``, ``GPT2ForSequenceClassification``): the lean hand-written forward,
  :class:`rlhf_envs.lm.gpt2.GPT2View`;
- a Llama-family model (Llama, Qwen2, Qwen3, Mistral): transformers' own forward fed the packed
  tokens, :class:`rlhf_envs.lm.hf_packed.HFPackedView`;
- anything else: ``None``, and the caller takes Hugging Face's padded forward (still exact, slower).

The first time a model class takes a path, one log line (logger ``rlhf_envs.lm``) says which; the
padded fallback is a warning, the others are info.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

__all__ = ["PackedForward", "announce", "forward_path", "packed_view", "response_hidden"]

logger = logging.getLogger("rlhf_envs.lm")
_announced: set[tuple[str, str]] = set()


class PackedForward(Protocol):
    """What the packed training batches (:class:`rlhf_envs.lm.packing.PackedBatch`) and their callers use.

    ``packed_forward`` takes ``N`` packed tokens and their attention layout and returns hidden states
    ``[N, D]`` (``[K, D]`` at ``keep``) in the view's own convention: :meth:`final_norm` turns them into the
    model's last hidden state (what Hugging Face returns, e.g. for a value head) and :meth:`logits` into
    logits ``[..., V]``.
    """

    path: str
    n_head: int
    lm_head: torch.Tensor | None
    score: torch.Tensor | None

    @property
    def dtype(self) -> torch.dtype: ...

    def packed_forward(self, tokens: torch.Tensor, positions: torch.Tensor, gather: torch.Tensor, owner: torch.Tensor,
                       rows: int, keep: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                       ) -> torch.Tensor: ...

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


def packed_view(model: torch.nn.Module, announce: bool = True) -> PackedForward | None:
    """``model``'s packed forward (see the module docstring), or ``None`` for the padded path."""
    from rlhf_envs.lm.gpt2 import gpt2_view
    from rlhf_envs.lm.hf_packed import hf_packed_view

    view = gpt2_view(model)
    if view is None:
        view = hf_packed_view(model)
    if announce:
        _announce(model, forward_path(view), fallback=view is None)
    return view


def forward_path(view: PackedForward | None) -> str:
    """``"gpt2"`` (the lean GPT-2 forward), ``"hf-packed"`` (transformers' forward, packed) or ``"padded"``."""
    if view is None:
        return "padded"
    return getattr(view, "path", "gpt2")


def announce(model: torch.nn.Module, path: str, fallback: bool) -> None:
    """Log once per model class and ``path`` which path it takes (a warning when it is the slow ``fallback``)."""
    _announce(model, path, fallback)


def _announce(model: torch.nn.Module, path: str, fallback: bool) -> None:
    name = type(model).__name__
    if (name, path) in _announced:
        return
    _announced.add((name, path))
    if fallback and path != "padded":
        logger.warning("%s: %s (no lean path for this model)", name, path)
    elif path == "padded":
        logger.warning("%s takes Hugging Face's padded forward (no packed path for this architecture, or dropout or "
                       "hooks active): exact, but slower than the packed paths of GPT-2 and Llama-family models", name)
    else:
        logger.info("%s takes the packed forward %r", name, path)


def response_hidden(view: PackedForward, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                    response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Hidden states ``[M, D]`` (the view's convention) predicting the ``M`` tokens ``response_ids[response_mask]``
    (row-major; each mask a prefix of its row), from one packed forward over the left-padded prompts ``[B, P]``
    and the responses ``[B, T]``: rows that share a prompt run it once (:mod:`rlhf_envs.lm.packing`)."""
    from rlhf_envs.lm.packing import pack_sequences

    prompt_keep, keep = prompt_mask.bool().cpu(), response_mask.bool().cpu()
    seqs = [torch.cat([p[pk], r[k]]) for p, pk, r, k in zip(prompt_ids.cpu(), prompt_keep, response_ids.cpu(), keep)]
    batch = pack_sequences(seqs, drop_last=True)  # the last token predicts nothing
    predictor = batch.targets(prompt_keep.sum(-1).tolist())[0]
    device = prompt_ids.device
    return batch.to(device).hidden(view, predictor.to(device))
