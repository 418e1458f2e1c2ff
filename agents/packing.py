"""Packed batches for the LM trainers: no padding in the per-token work, shared prefixes computed once.

A batch is a list of **groups** of token sequences: a DPO pair (chosen, rejected), the K ranked
responses of one prompt for the reward model, or a single SFT example. The tokens every sequence
of a group starts with (their longest common prefix: the prompt, and any first response tokens
they agree on) are laid out once, and each sequence's remaining tokens follow it, attending to the
prefix and to themselves only, with the position ids they would have alone. For a causal LM this
is exact: a prefix token's hidden state does not depend on what follows it.

Attention runs on a grid with one row per sequence, right-padded to the longest: a row gathers
the keys and values of its group's shared prefix (computed once) and of its own tokens, so plain
causal attention is exact and the padding is never attended to. The per-token work (layer norms,
projections, MLP, LM head) runs on the ``N`` packed tokens only, through
:meth:`rlhf_envs.fast_lm.GPT2View.packed_forward`. On the benchmark's preference pairs this is
2.2x fewer tokens than padding chosen and rejected to the batch's longest sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf_envs.fast_lm import GPT2View

__all__ = ["PackedBatch", "pack_groups"]


@dataclass
class PackedBatch:
    """Tokens of a batch of sequence groups, packed (see the module docstring).

    Sequences are numbered group by group, in order (``s = 0 .. S-1``).
    """

    tokens: torch.Tensor
    """``[N]`` token ids: each group's shared prefix once, then each sequence's own tokens."""
    positions: torch.Tensor
    """``[N]`` position ids (each sequence's own: 0 at its first token)."""
    gather: torch.Tensor
    """``[S * W]`` the packed token at each cell of the ``[S, W]`` grid (row ``s`` = sequence ``s``;
    padding cells repeat a real token, which causal attention never reaches from a real one)."""
    owner: torch.Tensor
    """``[N]`` the grid cell whose output each packed token takes (a prefix token: its group's first sequence)."""
    index: list[torch.Tensor]
    """per sequence, the packed index (into ``tokens``) of each of its tokens, in order."""
    sequences: list[torch.Tensor]
    """the sequences as given (CPU)."""

    def targets(self, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Next-token targets from position ``starts[s]`` (>= 1) to the end of each sequence ``s``.

        Returns ``predictor [M]`` (packed index of the token whose hidden state predicts the
        target), ``target_ids [M]`` and ``sequence [M]`` (which sequence each target is in).
        """
        predictor, target_ids, sequence = [], [], []
        for s, (seq, index, start) in enumerate(zip(self.sequences, self.index, starts)):
            start = max(int(start), 1)
            predictor.append(index[start - 1 : len(seq) - 1])
            target_ids.append(seq[start:])
            sequence.append(torch.full((max(len(seq) - start, 0),), s, dtype=torch.long))
        return torch.cat(predictor), torch.cat(target_ids), torch.cat(sequence)

    def last_index(self, pad_token_id: int | None) -> torch.Tensor:
        """``[S]`` packed index of each sequence's last token that is not ``pad_token_id``.

        This is where Hugging Face's ``GPT2ForSequenceClassification`` pools (its first token when
        every token is the pad id).
        """
        last = []
        for seq, index in zip(self.sequences, self.index):
            keep = (seq != pad_token_id).nonzero() if pad_token_id is not None else torch.arange(len(seq))[:, None]
            last.append(index[int(keep[-1]) if len(keep) else 0])
        return torch.stack(last)

    def to(self, device: torch.device) -> PackedBatch:
        """The tensors the forward reads moved to ``device`` (``index``/``sequences`` stay on the CPU)."""
        move = {name: getattr(self, name).to(device, non_blocking=True) for name in ("tokens", "positions", "gather", "owner")}
        return PackedBatch(**move, index=self.index, sequences=self.sequences)

    def hidden(self, view: GPT2View) -> torch.Tensor:
        """``[N, D]`` hidden states before ``ln_f`` (differentiable), from :meth:`GPT2View.packed_forward`."""
        return view.packed_forward(self.tokens, self.positions, self.gather, self.owner, len(self.sequences))

    def target_logits(self, view: GPT2View, predictor: torch.Tensor) -> torch.Tensor:
        """float32 logits ``[M, V]`` at the ``predictor`` indices of :meth:`targets` (the LM head runs there only)."""
        return view.logits(self.hidden(view)[predictor]).float()

    def sequence_logps(self, view: GPT2View, predictor: torch.Tensor, target_ids: torch.Tensor,
                       sequence: torch.Tensor) -> torch.Tensor:
        """``[S]`` float32: each sequence's summed log-prob of its targets (from :meth:`targets`)."""
        token_logps = -F.cross_entropy(self.target_logits(view, predictor), target_ids, reduction="none")
        return token_logps.new_zeros(len(self.sequences)).index_add_(0, sequence, token_logps)


def _common_prefix(seqs: list[torch.Tensor]) -> int:
    shortest = min(len(s) for s in seqs)
    if len(seqs) == 1:
        return shortest
    first = seqs[0][:shortest]
    agree = torch.ones(shortest, dtype=torch.bool)
    for seq in seqs[1:]:
        agree &= seq[:shortest] == first
    differ = (~agree).nonzero()
    return int(differ[0]) if len(differ) else shortest


def pack_groups(groups: list[list[torch.Tensor]]) -> PackedBatch:
    """Pack ``groups`` (lists of non-empty 1-D int64 token tensors); see the module docstring."""
    if not groups or any(not group for group in groups):
        raise ValueError("pack_groups needs a non-empty list of non-empty groups of sequences")
    if any(len(seq) == 0 for group in groups for seq in group):
        raise ValueError("pack_groups got an empty sequence; every sequence needs at least one token")
    tokens, positions, index, sequences, owned = [], [], [], [], []
    width = max(len(seq) for group in groups for seq in group)
    offset = 0
    for group in groups:
        shared = _common_prefix(group)
        tokens.append(group[0][:shared])
        positions.append(torch.arange(shared))
        prefix = torch.arange(offset, offset + shared)
        # the prefix's outputs come from the group's first row, at columns 0 .. shared-1
        owned.append(len(sequences) * width + torch.arange(shared))
        start = offset + shared
        for seq in group:
            rest = len(seq) - shared
            tokens.append(seq[shared:])
            positions.append(torch.arange(shared, len(seq)))
            owned.append(len(sequences) * width + torch.arange(shared, len(seq)))
            index.append(torch.cat([prefix, torch.arange(start, start + rest)]))
            sequences.append(seq)
            start += rest
        offset = start
    gather = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, idx in enumerate(index):
        gather[row, : len(idx)] = idx
        gather[row, len(idx):] = idx[-1]
    return PackedBatch(torch.cat(tokens), torch.cat(positions), gather.view(-1), torch.cat(owned), index, sequences)
