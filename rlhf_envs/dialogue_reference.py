"""The reference model's side of TextDialogue: log-probs of a turn after its context, incrementally or in full."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import numpy as np
import torch

from rlhf_envs.lm.sampling import positions_from_mask, processed_logprobs
from rlhf_envs.text_common import PROMPT_CACHE_BYTES, TextTask, response_hidden

__all__ = ["ReferenceKV", "ref_turn_logprobs"]


class ReferenceKV:
    """The reference's keys and values of every row's context so far ``[N, n_layer, 2, H, C, hd]``, so a step runs
    only the tokens it has not seen: the last turn's final token, the env's reply, the new turn.

    Column ``j`` holds context position ``j`` (contexts are left-aligned in the env's buffer);
    ``cached[i]`` columns of row ``i`` are filled. The reference is frozen, so entries stay valid for the episode.
    Only for a GPT-2 reference (the lean packed forward) whose table fits in ``PROMPT_CACHE_BYTES``.
    """

    def __init__(self, view: Any, num_envs: int, width: int):
        self.kv = torch.zeros(num_envs, len(view.layers), 2, view.n_head, width, view.head_dim, dtype=view.dtype,
                              device=view.wte.device)
        self.cached = np.zeros(num_envs, dtype=np.int64)
        self._pending: np.ndarray | None = None

    @classmethod
    def make(cls, task: TextTask, num_envs: int, width: int) -> ReferenceKV | None:
        view = None if task.adapters_off else task.reference_view()
        if view is None or num_envs * 2 * len(view.layers) * width * view.d_model * view.wte.element_size() > \
                PROMPT_CACHE_BYTES:
            return None
        return cls(view, num_envs, width)

    @torch.no_grad()
    def logprobs(self, task: TextTask, buf: np.ndarray, length: np.ndarray, ids: torch.Tensor, mask: torch.Tensor,
                 full: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:func:`ref_turn_logprobs` for turns ``ids [N, T]`` written in ``buf`` after the contexts
        ``buf[:, :length]``; the new tokens' keys and values go into the cache (counted once :meth:`commit` runs)."""
        view = task.reference_view()
        n, width = buf.shape
        k = mask.sum(-1).cpu().numpy()
        cols = np.arange(width)[None, :]
        end = length + k - 1  # a turn's last token predicts nothing: it is fed next step
        # cached <= length - 1: the last context token is always new, and its hidden state predicts the turn
        feed = (cols >= self.cached[:, None]) & (cols < end[:, None])
        wanted = (cols >= (length - 1)[:, None]) & (cols < end[:, None])
        device = self.kv.device
        rows = torch.arange(n, device=device)
        as_t = functools.partial(torch.as_tensor, device=device)
        hidden = view.packed_hidden(as_t(buf), as_t(feed), as_t(np.broadcast_to(cols, (n, width)).copy()),
                                    as_t(wanted), past=(self.kv, rows, as_t(cols < self.cached[:, None])),
                                    kv_out=(self.kv, rows))
        self._pending = end
        picked = processed_logprobs(view.logits(hidden).float(), task.ref_sampling, overwrite=True)
        ref = torch.zeros(mask.shape, device=ids.device)
        ref[mask] = picked.gather(-1, ids[mask].unsqueeze(-1)).squeeze(-1)
        if not full:
            return ref, None
        ref_full = torch.zeros(mask.shape + picked.shape[-1:], device=ids.device)
        ref_full[mask] = picked
        return ref, ref_full

    def commit(self) -> None:
        """The step succeeded: the columns written by the last :meth:`logprobs` are now the rows' cache."""
        if self._pending is not None:
            self.cached, self._pending = self._pending, None


@torch.no_grad()
def ref_turn_logprobs(task: TextTask, context: torch.Tensor, context_mask: torch.Tensor, ids: torch.Tensor,
                       mask: torch.Tensor, full: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference log-probs ``[N, T]`` (and ``[N, T, V]`` with ``full``) of turns ``ids`` after left-padded contexts.

    :meth:`rlhf_envs.text_common.TextTask.ref_logprobs` with a context per row in place of a prompt index
    (no prompt cache: contexts change every turn). Entries outside ``mask`` are 0.
    """
    width = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
    ids, keep = ids[:, :width], mask[:, :width]
    ref = torch.zeros(mask.shape, device=ids.device)
    with task.ref_model.disable_adapter() if task.adapters_off else contextlib.nullcontext():
        view = task.reference_view()
        if view is None:
            both = torch.cat([context_mask, keep], dim=1)
            logits = task.ref_model(input_ids=torch.cat([context, ids], dim=1), attention_mask=both.long(),
                                    position_ids=positions_from_mask(both), use_cache=False,
                                    logits_to_keep=width + 1).logits[:, :-1]
            ref_full = processed_logprobs(logits, task.ref_sampling).masked_fill_(~keep[..., None], 0.0)
        else:
            picked = processed_logprobs(view.logits(response_hidden(view, context, context_mask, ids, keep)).float(),
                                        task.ref_sampling, overwrite=True)
            ref_full = picked.new_zeros(keep.shape + picked.shape[-1:])
            ref_full[keep] = picked
    ref[:, :width] = ref_full.gather(-1, ids.unsqueeze(-1)).squeeze(-1).masked_fill(~keep, 0.0)
    if not full:
        return ref, None
    padded = torch.zeros(mask.shape + (ref_full.shape[-1],), device=ids.device)
    padded[:, :width] = ref_full
    return ref, padded
