"""Attention layouts for packed sequences: several sequences side by side in one attention row, and their masks.

Shared by the lean GPT-2 forward (:mod:`rlhf_envs.lm.gpt2`), the decoders (:mod:`rlhf_envs.lm.decoding`) and the
packed training batches (:mod:`rlhf_envs.lm.packing`).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["SegmentLayout", "additive_mask", "ranks", "within"]


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = may attend) -> additive float mask (0 or the dtype's minimum); CPU SDPA runs faster on it."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, torch.finfo(dtype).min)


def ranks(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the True cells of ``mask [B, L]`` in row-major order: their row, and their rank among their row's True
    cells."""
    row, col = mask.nonzero()
    return row, (np.cumsum(mask, axis=1) - 1)[row, col]


class SegmentLayout:
    """Where :meth:`GPT2View.packed_hidden` puts each sequence ("segment": ``past[b]`` cached keys
    then ``new[b]`` real tokens) in its attention grids.

    Segments are placed longest first; each grid row is topped up with the shortest remaining
    segments that still fit in ``width`` (the longest segment's length). ``row[b]``,
    ``k_offset[b]`` (column of its first key) and ``q_offset[b]`` (column of its first query; only
    new tokens are queries) say where segment ``b`` lies.
    """

    def __init__(self, past: np.ndarray, new: np.ndarray):
        self.past, self.new = past.astype(np.int64), new.astype(np.int64)
        length = (self.past + self.new).tolist()
        order = sorted(range(len(length)), key=length.__getitem__, reverse=True)
        self.width = length[order[0]] if order else 0
        row, k_offset, q_offset = [0] * len(length), [0] * len(length), [0] * len(length)
        new_list = self.new.tolist()
        q_width, n_rows, first, last = 0, 0, 0, len(order) - 1
        while first <= last:
            b = order[first]
            first += 1
            row[b], used, q_used = n_rows, length[b], new_list[b]
            while first <= last and used + length[order[last]] <= self.width:
                b = order[last]
                last -= 1
                row[b], k_offset[b], q_offset[b] = n_rows, used, q_used
                used += length[b]
                q_used += new_list[b]
            q_width = max(q_width, q_used)
            n_rows += 1
        self.rows, self.q_width = n_rows, max(q_width, 1)
        self.row, self.k_offset, self.q_offset = (np.asarray(v, dtype=np.int64) for v in (row, k_offset, q_offset))

    def allowed(self) -> np.ndarray:
        """``[R, 1, Wq, W]`` bool: True where a query may attend to a key (same segment, key not later).

        A query cell no token uses attends to its row's first key only: its output is never read, and
        one allowed key keeps its softmax finite where the additive mask's minimum turns into -inf
        (float32's minimum rounds to -inf in bfloat16, under autocast), which would make a row with
        nothing allowed NaN and spread NaN through the backward pass.
        """
        segments = np.arange(len(self.row))
        q_seg = np.full((self.rows, self.q_width), -1)
        q_pos = np.zeros((self.rows, self.q_width), dtype=np.int64)
        k_seg = np.full((self.rows, self.width), -2)
        k_pos = np.zeros((self.rows, self.width), dtype=np.int64)
        b, j = np.repeat(segments, self.new), within(self.new)
        q_seg[self.row[b], self.q_offset[b] + j] = b
        q_pos[self.row[b], self.q_offset[b] + j] = self.past[b] + j
        length = self.past + self.new
        b, j = np.repeat(segments, length), within(length)
        k_seg[self.row[b], self.k_offset[b] + j] = b
        k_pos[self.row[b], self.k_offset[b] + j] = j
        allowed = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_pos[:, None, :] <= q_pos[:, :, None])
        allowed[:, :, 0] |= q_seg < 0
        return allowed[:, None]


def within(counts: np.ndarray) -> np.ndarray:
    """``0 .. counts[i] - 1`` for each ``i``, concatenated."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
