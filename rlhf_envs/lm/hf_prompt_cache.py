"""A frozen reference's prompt keys and values for Llama-family models (the env's reference pass).

The text envs score responses to prompts of a fixed table over and over. :class:`HFPromptCache` runs
every prompt once through the model's packed forward (:class:`rlhf_envs.lm.hf_packed.HFPackedView`),
keeping each layer's (rotated) keys and values and each prompt's last hidden state; a scoring pass then
feeds only the response tokens, whose attention reads the prompt's keys and values from the table. On
the embedded Llama twin's TextBandit step this takes the prompt tokens (about half) out of every
reference forward: the step's time over sampling's went from 0.345 without it to 0.245-0.267 with it
(``python -m benchmarks.bench_sampling --model embedded-llama``, 2026-12-04, one thread). The table is rebuilt
whenever a parameter changes (a parameter's identity, storage
or version counter differs from when it was built), so a model that trains is never read stale.
"""

from __future__ import annotations

import numpy as np
import torch

from rlhf_envs.lm.hf_packed import HFPackedView
from rlhf_envs.lm.segments import additive_mask

__all__ = ["HFPromptCache", "PastLayout"]


class PastLayout:
    """One scoring pass's attention grid: ``B`` rows of ``[prompt keys (from the table), new keys]``.

    ``table_cells``/``table_index`` put table tokens into key cells, ``new_cells`` the new tokens (packed
    order) into key cells and ``query_cells`` into query cells; ``mask [B, 1, Wq, W]`` is additive.
    """

    def __init__(self, table: list[tuple[torch.Tensor, torch.Tensor]], table_cells: torch.Tensor,
                 table_index: torch.Tensor, new_cells: torch.Tensor, query_cells: torch.Tensor, rows: int, width: int,
                 q_width: int, mask: torch.Tensor):
        self.table, self.table_cells, self.table_index = table, table_cells, table_index
        self.new_cells, self.query_cells = new_cells, query_cells
        self.rows, self.width, self.q_width, self.mask = rows, width, q_width, mask
        self.layer = 0

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        """``query [1, H, N, hd]``, ``key``/``value [1, H_kv, N, hd]`` of the new tokens -> ``[1, N, H, hd]``."""
        heads, kv_heads, hd = query.shape[1], key.shape[1], query.shape[-1]
        table_k, table_v = self.table[self.layer]
        self.layer += 1
        grids = []
        for new, old in ((key, table_k), (value, table_v)):
            grid = new.new_zeros(kv_heads, self.rows * self.width, hd)
            grid[:, self.table_cells] = old.index_select(1, self.table_index)
            grid[:, self.new_cells] = new[0]
            if kv_heads != heads:  # as repeat_kv: query head i reads key/value head i // (heads / kv_heads)
                grid = grid[:, None].expand(kv_heads, heads // kv_heads, *grid.shape[1:]).reshape(heads, -1, hd)
            grids.append(grid.view(heads * self.rows, self.width, hd))
        q = query.new_zeros(heads, self.rows * self.q_width, hd)
        q[:, self.query_cells] = query[0]
        mask = self.mask.transpose(0, 1).expand(heads, self.rows, self.q_width, self.width)
        scores = torch.baddbmm(mask.reshape(heads * self.rows, self.q_width, self.width),
                               q.view(heads * self.rows, self.q_width, hd), grids[0].transpose(1, 2), alpha=scale)
        att = torch.bmm(scores.softmax(-1), grids[1]).view(heads, -1, hd).index_select(1, self.query_cells)
        return att.transpose(0, 1).unsqueeze(0)


class HFPromptCache:
    """Keys, values and last hidden states of a fixed, left-padded prompt table ``[n, P]`` (see the module docstring).
    """

    def __init__(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask.bool()
        self.fingerprint: tuple = ()
        self.table: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.token_index = np.zeros((0, 0), dtype=np.int64)  # [n, P] packed index of prompt i's j-th real token
        self.last_hidden: torch.Tensor | None = None

    def _fill(self, view: HFPackedView) -> None:
        from rlhf_envs.lm.packing import pack_sequences

        keep = self.prompt_mask.cpu()
        seqs = [row[k] for row, k in zip(self.prompt_ids.cpu(), keep)]
        batch = pack_sequences(seqs)
        device = self.prompt_ids.device
        record: list[tuple[torch.Tensor, torch.Tensor]] = []
        packed = batch.to(device)
        hidden = view.packed_forward(packed.tokens, packed.positions, packed.gather, packed.owner, len(seqs),
                                     record=record)
        self.table = [(k[0], v[0]) for k, v in record]
        self.token_index = batch.grid
        last = batch.grid[np.arange(len(seqs)), batch.lengths - 1]
        self.last_hidden = hidden.index_select(0, torch.from_numpy(last).to(device))

    def hidden(self, view: HFPackedView, prompt_index: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
               ) -> torch.Tensor:
        """The view's hidden states ``[M, D]`` predicting the ``M`` response tokens ``ids[mask]`` (row-major;
        ``mask [B, T]`` a prefix of each row) after prompts ``prompt_index [B]`` of the table."""
        fingerprint = tuple((id(p), p.data_ptr(), p._version) for p in view.model.parameters())
        if fingerprint != self.fingerprint or self.last_hidden is None:
            self._fill(view)
            self.fingerprint = fingerprint
        device = ids.device
        index = prompt_index.cpu().numpy()
        plen = self.prompt_mask[prompt_index].sum(-1).cpu().numpy()
        rlen = mask.sum(-1).cpu().numpy()
        n_new = np.maximum(rlen - 1, 0)  # a response's last token predicts nothing
        first = self.last_hidden.index_select(0, prompt_index)
        if n_new.sum() == 0:
            return first[torch.from_numpy(rlen > 0).to(device)]
        rows, width, q_width = len(index), int((plen + n_new).max()), int(n_new.max())
        row_t, col_t = (np.repeat(np.arange(rows), plen), _within(plen))
        row_n, col_n = (np.repeat(np.arange(rows), n_new), _within(n_new))
        q_pos = col_n  # query cell column = the new token's rank in its row
        allowed = (np.arange(width)[None, None, :] <= (plen[:, None, None] + np.arange(q_width)[None, :, None]))
        allowed &= (np.arange(q_width)[None, :, None] < n_new[:, None, None])
        allowed[:, :, 0] = True  # a query cell no token uses attends to key 0 (a finite softmax, never read)
        tokens = ids[:, :-1][torch.from_numpy(np.arange(ids.shape[1] - 1)[None, :] < n_new[:, None]).to(device)]
        positions = torch.from_numpy(plen[row_n] + col_n).to(device)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        layout = PastLayout(self.table, t(row_t * width + col_t), t(self.token_index[index[row_t], col_t]),
                            t(row_n * width + plen[row_n] + col_n), t(row_n * q_width + q_pos), rows, width, q_width,
                            additive_mask(t(allowed)[:, None], view.dtype))
        out = view.past_forward(tokens, positions, layout)
        # targets in row-major order: a row's first from its prompt's last hidden state, the rest from its new tokens
        starts = np.cumsum(n_new) - n_new
        source = [np.concatenate([[-1 - b], starts[b] + np.arange(n_new[b])]) for b in range(rows) if rlen[b] > 0]
        source = np.concatenate(source)
        own = torch.from_numpy(source).to(device)
        return torch.where((own < 0)[:, None], first.index_select(0, (-1 - own).clamp(min=0)),
                           out.index_select(0, own.clamp(min=0)))


def _within(counts: np.ndarray) -> np.ndarray:
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
