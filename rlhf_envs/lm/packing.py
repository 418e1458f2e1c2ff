"""Packed batches for the LM trainers: no padding in the per-token work, shared prefixes computed once.

A batch's token sequences (DPO's chosen and rejected responses, the K ranked responses of a prompt
for the reward model, SFT examples, PPO rollouts) are laid out as a **prefix tree**: every distinct
prefix in the batch is one packed token, so a prompt that several sequences start with, any first
response tokens they agree on, and a beginning that different prompts share are all computed once.
Each packed token keeps the position id it has in its sequences. For a causal LM this is exact:
a token's hidden state depends only on the tokens before it, which are the same in every sequence
that shares it.

Attention runs on a grid with one row per sequence, right-padded to the longest: a row gathers the
keys and values of its sequence's packed tokens (shared ones included), so plain causal attention
is exact and the padding is never attended to. On CPU, short sequences instead share grid rows
(:class:`Segments`: a block-diagonal causal mask keeps them apart, and attention runs as two
matmuls), which cuts the padding and the per-row overhead. The per-token work (layer norms,
projections, MLP) runs on the ``N`` packed tokens only, and the LM head on each distinct token that
predicts a target, through the model's packed forward (:mod:`rlhf_envs.lm.views`): the lean GPT-2
forward (:meth:`rlhf_envs.lm.gpt2.GPT2View.packed_forward`) or, for Llama-family models, transformers'
own forward on the packed tokens (:class:`rlhf_envs.lm.hf_packed.HFPackedView`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from rlhf_envs.lm.segments import SegmentLayout, additive_mask, within
from rlhf_envs.lm.views import PackedForward

__all__ = ["PackedBatch", "pack_sequences"]

SEGMENT_ATTENTION_BYTES = 16 << 20
"""Largest ``[rows, H, W, W]`` float32 attention-probability tensor (per layer) for which
:meth:`PackedBatch.hidden` takes the segment layout on CPU; above it, causal rows through SDPA."""
SEGMENT_INFERENCE_WIDTH = 64
"""Without gradients (a reference pass), rows wider than this skip the segment layout for SDPA's
causal kernel, which skips the masked half: at 96-128 keys, 2.3-3x faster than two masked matmuls
whose ``[rows, H, W, W]`` scores outgrow the cache, on one thread or two; at 64 or fewer the matmuls
win. With gradients the segment layout stays faster at these widths, backward included."""
_MAX_SEGMENT_CELLS = 1 << 22
"""pack_sequences builds the segment layout's ``[rows, 1, W, W]`` mask only up to this many cells."""


@dataclass
class Segments:
    """The batch's sequences laid side by side in fewer attention rows (:class:`rlhf_envs.lm.gpt2.SegmentLayout`).

    A grid row holds several sequences (each its shared prefix then its own tokens), and a
    block-diagonal causal mask keeps them apart: fewer, fuller rows than one row per sequence,
    and for rows of tens of tokens two batched matmuls under that mask beat SDPA on causal rows
    (forward and backward, gathers included).
    """

    gather: torch.Tensor
    """``[R * W]`` the packed token at each cell (cells no sequence uses name token 0; nothing attends to them)."""
    owner: torch.Tensor
    """``[N]`` the cell whose output each packed token takes."""
    allowed: torch.Tensor
    """``[R, 1, W, W]`` bool: True where a query cell may attend to a key cell (same sequence, key not later)."""

    @property
    def rows(self) -> int:
        return self.allowed.shape[0]


@dataclass
class PackedBatch:
    """Tokens of a batch of sequences, packed as a prefix tree (see the module docstring).

    Sequences are numbered in the order given (``s = 0 .. S-1``).
    """

    tokens: torch.Tensor
    """``[N]`` token ids: one per distinct prefix of the batch's sequences (its last token)."""
    positions: torch.Tensor
    """``[N]`` position ids (each sequence's own: 0 at its first token)."""
    gather: torch.Tensor
    """``[S * W]`` the packed token at each cell of the ``[S, W]`` grid (row ``s`` = sequence ``s``;
    padding cells repeat a real token, which causal attention never reaches from a real one)."""
    owner: torch.Tensor
    """``[N]`` the grid cell whose output each packed token takes (in the row of the sequence that added
    it to the tree: the first in lexicographic order that has it)."""
    sequences: list[torch.Tensor]
    """the sequences as given (CPU)."""
    grid: np.ndarray = field(repr=False)
    """``[S, W]`` (CPU) ``gather`` as a grid: the packed index of sequence ``s``'s token at position ``p``."""
    token_grid: np.ndarray = field(repr=False)
    """``[S, W']`` (CPU) the token at each position of each sequence as given (padding cells repeat its last token)."""
    lengths: np.ndarray = field(repr=False)
    """``[S]`` (CPU) each sequence's packed length: its length, less its last token with ``dropped``."""
    segments: Segments | None = field(default=None, repr=False)
    """The same sequences in the segment layout (None when its mask would exceed ``_MAX_SEGMENT_CELLS``)."""
    dropped: np.ndarray | None = field(default=None, repr=False)
    """``[S]`` (CPU) 1 where the sequence's last token was left out of the packed tokens
    (``pack_sequences(..., drop_last=True)``), else 0; None when nothing was left out."""

    @property
    def index(self) -> list[torch.Tensor]:
        """Per sequence, the packed index (into ``tokens``) of each of its packed tokens, in order."""
        return [torch.from_numpy(row[:n]) for row, n in zip(self.grid, self.lengths)]

    def targets(self, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Next-token targets from position ``starts[s]`` (>= 1) to the end of each sequence ``s``.

        Returns ``predictor [M]`` (packed index of the token whose hidden state predicts the
        target), ``target_ids [M]`` and ``sequence [M]`` (which sequence each target is in). A last
        token left out of the packed tokens (``drop_last``) is still a target: its predictor is packed.
        """
        first = np.maximum(np.asarray(starts, dtype=np.int64), 1)
        ends = self.lengths if self.dropped is None else self.lengths + self.dropped
        counts = np.maximum(ends - first, 0)
        sequence = np.repeat(np.arange(len(counts)), counts)
        position = np.repeat(first - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
        return (torch.from_numpy(self.grid[sequence, position - 1]),
                torch.from_numpy(self.token_grid[sequence, position]),
                torch.from_numpy(sequence))

    def last_index(self, pad_token_id: int | None) -> torch.Tensor:
        """``[S]`` packed index of each sequence's last token that is not ``pad_token_id``.

        This is where Hugging Face's ``GPT2ForSequenceClassification`` pools (its first token when
        every token is the pad id).
        """
        if self.dropped is not None and self.dropped.any():
            raise ValueError("last_index: this batch was packed with drop_last=True, so last tokens have no hidden "
                             "state")
        keep = np.arange(self.grid.shape[1])[None, :] < self.lengths[:, None]
        if pad_token_id is not None:
            keep &= self.token_grid[:, : self.grid.shape[1]] != pad_token_id
        last = np.where(keep.any(1), keep.shape[1] - 1 - keep[:, ::-1].argmax(1), 0)
        return torch.from_numpy(self.grid[np.arange(len(last)), last])

    def to(self, device: torch.device) -> PackedBatch:
        """The tensors the forward reads moved to ``device`` (the CPU grids and ``sequences`` stay)."""
        move = {name: getattr(self, name).to(device, non_blocking=True) for name in ("tokens", "positions", "gather",
                                                                                     "owner")}
        segments = self.segments
        if segments is not None:  # only CPU forwards read them (see hidden)
            segments = None if torch.device(device).type != "cpu" else \
                Segments(*(t.to(device) for t in (segments.gather, segments.owner, segments.allowed)))
        return replace(self, **move, segments=segments)

    def hidden(self, view: PackedForward, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (differentiable; in the view's convention, see :class:`rlhf_envs.lm.views.PackedForward`)
        from ``view.packed_forward``: ``[N, D]``, or ``[K, D]`` at the packed indices ``keep`` (the lean GPT-2
        forward then runs the last layer only there after attention).

        On CPU, when the attention probabilities stay under ``SEGMENT_ATTENTION_BYTES`` per layer (and,
        without gradients, rows are at most ``SEGMENT_INFERENCE_WIDTH`` wide), attention runs on the
        :class:`Segments` layout as two matmuls; otherwise (and on GPUs, where SDPA's fused kernels
        win) on one causal row per sequence through SDPA. Both are exact. A view with a sliding window
        narrower than the shared rows takes the causal rows.
        """
        seg = self.segments
        window = getattr(view, "sliding_window", None)
        fits = seg is not None and (window is None or seg.allowed.shape[-1] <= window)
        if fits and self.tokens.device.type == "cpu" and \
                view.n_head * seg.allowed.numel() * 4 <= SEGMENT_ATTENTION_BYTES and \
                (torch.is_grad_enabled() or seg.allowed.shape[-1] <= SEGMENT_INFERENCE_WIDTH):
            return view.packed_forward(self.tokens, self.positions, seg.gather, seg.owner, seg.rows, keep,
                                       additive_mask(seg.allowed, view.dtype))
        return view.packed_forward(self.tokens, self.positions, self.gather, self.owner, len(self.sequences), keep)

    def target_logits(self, view: PackedForward, predictor: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[M, V]`` at the ``predictor`` indices of :meth:`targets` (the LM head runs there only)."""
        return view.logits(self.hidden(view, predictor)).float()

    def distinct_targets(self, starts: list[int]) -> tuple[torch.Tensor, ...]:
        """:meth:`targets` with each predicting token named once: ``(predictor [U], row [M], target_ids [M],
        sequence [M])``, where ``predictor[row[m]]`` predicts target ``m``. A token in several sequences'
        prefix (a shared prompt's last token, a response's first tokens that sequences agree on)
        predicts each of their next tokens from one hidden state, so the LM head runs ``U <= M`` times."""
        predictor, target_ids, sequence = self.targets(starts)
        distinct, row = np.unique(predictor.numpy(), return_inverse=True)
        return torch.from_numpy(distinct), torch.from_numpy(row.reshape(-1)), target_ids, sequence

    def sequence_logps(self, view: PackedForward, predictor: torch.Tensor, row: torch.Tensor, target_ids: torch.Tensor,
                       sequence: torch.Tensor) -> torch.Tensor:
        """``[S]`` float32: each sequence's summed log-prob of its targets (from :meth:`distinct_targets`)."""
        logits = self.target_logits(view, predictor)
        # without gradients (a reference pass) the log-softmax overwrites the logits, a fresh [U, V] tensor
        logps = torch.log_softmax(logits, -1, out=None if torch.is_grad_enabled() else logits)
        return logps.new_zeros(len(self.sequences)).index_add_(0, sequence, logps[row, target_ids])


def pack_sequences(sequences: list[torch.Tensor], drop_last: bool = False) -> PackedBatch:
    """Pack ``sequences`` (non-empty 1-D int64 token tensors) as a prefix tree; see the module docstring.

    With ``drop_last`` each sequence's last token (of sequences longer than one) is left out of the
    forward: under a next-token loss (SFT, DPO, PPO) its hidden state predicts nothing, and no later
    token of its sequence reads it, so every other token's results are the same. Sequences are cut
    before the tree is built, so a token that one sequence ends on and another goes on from is still
    packed for the other. :meth:`PackedBatch.targets` still names the left-out token as its
    sequence's last target. Not for a reward model, which reads the last token's hidden state.

    The tree is built in lexicographic order, where a sequence shares with all those before it
    exactly its longest common prefix with the one just before it: one comparison per sequence,
    and the grid, tokens, positions and owners then follow with array arithmetic on the CPU.
    """
    if not sequences:
        raise ValueError("pack_sequences needs a non-empty list of sequences")
    given = [seq.tolist() for seq in sequences]
    given_lengths = np.fromiter(map(len, given), dtype=np.int64, count=len(given))
    if (given_lengths == 0).any():
        raise ValueError("pack_sequences got an empty sequence; every sequence needs at least one token")
    dropped = (given_lengths > 1).astype(np.int64) if drop_last else None  # a one-token sequence keeps its token
    lists = [seq[:-1] if len(seq) > 1 else seq for seq in given] if drop_last else given
    lengths = given_lengths - dropped if dropped is not None else given_lengths
    width = int(lengths.max())
    rows: list[list[int]] = [[]] * len(lists)  # per sequence, the packed index of each of its tokens
    shared = np.zeros(len(lists), dtype=np.int64)  # leading tokens a sequence takes from earlier ones
    n_tokens, before = 0, None
    for s in sorted(range(len(lists)), key=lists.__getitem__):
        seq, n, common = lists[s], len(lists[s]), 0
        if before is not None:
            other = lists[before]
            limit = min(n, len(other))
            while common < limit and seq[common] == other[common]:
                common += 1
        row = rows[before][:common] if common else []
        row.extend(range(n_tokens, n_tokens + n - common))
        n_tokens += n - common
        rows[s], shared[s], before = row + [row[-1]] * (width - n), common, s  # padding repeats the last real token
    grid = np.array(rows, dtype=np.int64)
    column = np.arange(width)[None, :]
    real = column < lengths[:, None]
    positions = np.empty(n_tokens, dtype=np.int64)
    positions[grid[real]] = np.broadcast_to(column, grid.shape)[real]
    # each token's output comes from the row of the sequence that added it to the tree
    own = real & (column >= shared[:, None])
    owner = np.empty(n_tokens, dtype=np.int64)
    owner[grid[own]] = (np.arange(len(lists))[:, None] * width + column)[own]
    # the tokens as given, position by position (padding repeats each sequence's last token)
    given_start = np.cumsum(given_lengths) - given_lengths
    given_column = np.minimum(np.arange(int(given_lengths.max()))[None, :], given_lengths[:, None] - 1)
    flat_given = np.fromiter(itertools.chain.from_iterable(given), dtype=np.int64, count=int(given_lengths.sum()))
    token_grid = flat_given[given_start[:, None] + given_column]
    tokens = np.empty(n_tokens, dtype=np.int64)
    tokens[grid[real]] = token_grid[:, :width][real]  # a cut sequence's tokens are its given ones
    return PackedBatch(torch.from_numpy(tokens), torch.from_numpy(positions), torch.from_numpy(grid.reshape(-1)),
                       torch.from_numpy(owner), list(sequences), grid, token_grid, lengths,
                       _segments(grid, lengths, owner), dropped)


def _segments(grid: np.ndarray, lengths: np.ndarray, owner: np.ndarray) -> Segments | None:
    """:class:`Segments` for sequences whose packed indices are ``grid [S, W]`` (one row each) and whose
    tokens take their outputs from the cells ``owner [N]`` of that grid."""
    layout = SegmentLayout(np.zeros_like(lengths), lengths)
    rows, width = layout.rows, layout.width
    if rows * width * width > _MAX_SEGMENT_CELLS:
        return None
    seq, column = np.repeat(np.arange(len(lengths)), lengths), within(lengths)
    start = layout.row * width + layout.k_offset  # each sequence's first cell
    gather = np.zeros(rows * width, dtype=np.int64)
    gather[start[seq] + column] = grid[seq, column]
    moved = start[owner // grid.shape[1]] + owner % grid.shape[1]
    return Segments(torch.from_numpy(gather), torch.from_numpy(moved), torch.from_numpy(layout.allowed()))
