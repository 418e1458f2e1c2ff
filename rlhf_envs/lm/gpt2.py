"""A lean forward for GPT-2-architecture models, over the parameters of a Hugging Face ``GPT2LMHeadModel``.

At the sizes RLHF experiments start from (the embedded default: 4 layers, width 128), Hugging Face's
module stack costs more than its arithmetic: attention-interface dispatch, mask utilities, cache
classes, dropout modules and ``gelu_new`` written as five Python-level ops. This module is the same
computation written out nanoGPT-style, a dozen tensor ops per layer:

    x = wte[ids] + wpe[pos]
    per layer:  x = x + c_proj(sdpa(split_heads(c_attn(ln_1(x)))))
                x = x + mlp.c_proj(gelu_tanh(mlp.c_fc(ln_2(x))))
    logits = ln_f(x) @ lm_head.T            (only at the positions asked for)

It reads the model's own parameter tensors on every call (no copies), so optimizer updates are seen
immediately. HF's ``Conv1D`` stores weights ``[in, out]`` and computes ``addmm(bias, x, weight)``;
so does this module. ``gelu(approximate="tanh")`` is ``gelu_new``.

:func:`gpt2_view` returns a :class:`GPT2View` only when the shortcut is exact: a ``GPT2LMHeadModel``
or ``GPT2ForSequenceClassification`` (not a subclass; bare, or inside a peft model with plain LoRA
adapters on its projections) with no dropout active, without forward hooks and without
cross-attention, with a tanh-GELU activation. Anything else gets ``None`` and callers take the
generic Hugging Face path.

Two teacher-forced forwards skip padding in the per-token work: :meth:`GPT2View.packed_hidden`
(inference: a shared buffer written in place) and :meth:`GPT2View.packed_forward` (differentiable,
for training; the gradients land on the model's own parameters).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules import module as nn_module

from rlhf_envs.lm.kernels import gelu_tanh
from rlhf_envs.lm.segments import SegmentLayout, additive_mask, ranks

__all__ = ["GPT2View", "ViewCache", "gpt2_view"]

_TANH_GELUS = frozenset({"gelu_new", "gelu_pytorch_tanh"})


class _LoRA(NamedTuple):
    """A projection with a LoRA adapter: ``x @ base + (x @ a.T) @ b.T * scaling``, as peft computes it
    (the base weight ``[in, out]``, ``a [r, in]``, ``b [out, r]``); nothing of size ``in x out`` is built."""

    base: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    scaling: float


def _proj(bias: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | _LoRA) -> torch.Tensor:
    """A Conv1D projection ``bias + x @ weight`` of ``x [N, in]``, with a LoRA adapter's term when it has one."""
    if isinstance(weight, _LoRA):
        return torch.addmm(bias, x, weight.base) + (x @ weight.a.T @ weight.b.T) * weight.scaling
    return torch.addmm(bias, x, weight)


class _Layer(NamedTuple):
    """One GPT-2 block's tensors (Conv1D weights are ``[in, out]``, or a :class:`_LoRA`) and its attention scale."""

    ln_1: tuple[torch.Tensor, torch.Tensor]
    attn_w: torch.Tensor | _LoRA
    attn_b: torch.Tensor
    attn_proj_w: torch.Tensor | _LoRA
    attn_proj_b: torch.Tensor
    ln_2: tuple[torch.Tensor, torch.Tensor]
    fc_w: torch.Tensor | _LoRA
    fc_b: torch.Tensor
    proj_w: torch.Tensor | _LoRA
    proj_b: torch.Tensor
    scaling: float


def _residual(update: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x + update``, written into ``update`` (a fresh output whose backward does not need it) when the
    dtypes agree; under autocast a lower-precision ``update`` is promoted to the residual stream's dtype."""
    return update.add_(x) if update.dtype == x.dtype else x + update


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
               scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale + attn_mask) v`` as two batched matmuls (short sequences).

    For the short rows of a scoring batch (tens of keys, head size 32) this is as fast as CPU SDPA's
    flash kernel on one thread and twice as fast on two, where that kernel parallelises poorly.
    Differentiable: the in-place scaling and masking touch only the fresh scores, which autograd
    does not keep.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(attn_mask)
    return torch.matmul(scores.softmax(-1), v)


def _hooks_or_dropout(modules: Iterable[torch.nn.Module]) -> bool:
    """True when a forward (pre-)hook is registered (globally or on any of ``modules``) or a dropout is active."""
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or (isinstance(m, torch.nn.Dropout) and m.training and m.p > 0)
               for m in modules)


def gpt2_view(model: torch.nn.Module) -> GPT2View | None:
    """A :class:`GPT2View` of ``model`` when the lean forward computes exactly what ``model`` does, else ``None``.

    Eligible: ``type(model)`` is ``GPT2LMHeadModel`` or ``GPT2ForSequenceClassification`` (or a peft
    model wrapping one), no dropout active (eval mode, or every dropout probability 0, as the trainers
    set it), no forward (pre-)hooks (module or global: e.g. accelerate offloading, output capture), no
    cross-attention, activation ``gelu_new``/``gelu_pytorch_tanh``, ``reorder_and_upcast_attn`` off,
    and every submodule the forward reads of exactly its stock type, except plain LoRA adapters on
    the projections (see :func:`_projection`): an adapter or wrapper the view does not know would
    otherwise be skipped silently.
    """
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    base = model.get_base_model() if _is_peft_model(model) else model
    if type(base) not in (GPT2LMHeadModel, GPT2ForSequenceClassification):
        return None
    config = base.config
    if (config.add_cross_attention or config.activation_function not in _TANH_GELUS
            or config.reorder_and_upcast_attn or _hooks_or_dropout(model.modules())):
        return None
    try:
        return GPT2View(base)
    except _NotExact:
        return None


class _NotExact(Exception):
    """A module the lean forward cannot reproduce exactly (an adapter type it does not know, ...)."""


def _is_peft_model(model: torch.nn.Module) -> bool:
    return type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model")


def _exactly(module: torch.nn.Module, kind: type) -> torch.nn.Module:
    if type(module) is not kind:
        raise _NotExact(f"{type(module).__name__} where a {kind.__name__} was expected")
    return module


def _projection(module: torch.nn.Module) -> tuple[torch.Tensor | _LoRA, torch.Tensor]:
    """``(weight, bias)`` of a GPT-2 projection.

    A transformers ``Conv1D`` gives its own tensors (weight ``[in, out]``). A peft LoRA layer over
    one (plain LoRA, one active adapter, no active dropout, no DoRA or other variant, no LoRA bias,
    not merged) gives a :class:`_LoRA` over the base weight and the adapter's own ``A`` and ``B``
    (gradients reach them), or the base weight alone while adapters are disabled. Anything else
    raises :class:`_NotExact`.
    """
    from transformers.pytorch_utils import Conv1D

    if type(module) is Conv1D:
        return module.weight, module.bias
    if not type(module).__module__.startswith("peft."):
        raise _NotExact(f"unknown projection {type(module).__name__}")
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(module) is not LoraLinear or type(module.base_layer) is not Conv1D or not module.fan_in_fan_out:
        raise _NotExact(f"{type(module).__name__} over {type(getattr(module, 'base_layer', None)).__name__}")
    base = module.base_layer
    if module.merged:
        raise _NotExact("merged LoRA weights")
    if module.disable_adapters:
        return base.weight, base.bias
    active = [name for name in module.active_adapters if name in module.lora_A]
    if not active:
        return base.weight, base.bias
    if len(active) > 1:
        raise _NotExact("several active LoRA adapters")
    name = active[0]
    dropout = module.lora_dropout[name]
    if (name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False)
            or getattr(module, "lora_bias", {}).get(name, False) or module.lora_B[name].bias is not None
            or not (type(dropout) is torch.nn.Identity
                    or (type(dropout) is torch.nn.Dropout and (dropout.p == 0 or not dropout.training)))):
        raise _NotExact("a LoRA variant, bias or dropout")
    return _LoRA(base.weight, module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]), base.bias


class ViewCache:
    """:func:`gpt2_view` of one model, kept between calls for as long as it stays exact.

    Walking the module tree and collecting the parameters is a noticeable part of a small batch's
    forward, so an env that scores every step keeps the view.
    Each :meth:`get` checks a flat list of the modules instead (tens of microseconds): if any
    module's children or parameter objects changed (by identity) the view is rebuilt; while a hook
    is registered or a dropout is active it returns ``None``, as :func:`gpt2_view` would. In-place
    weight updates need no check: the view reads the model's own tensors. A model with peft adapters
    gets a fresh view on every call (adapters can be disabled without any module changing).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._modules: list[torch.nn.Module] = []
        self._key: tuple[int, ...] = ()
        self._view: GPT2View | None = None
        self._adapters = False

    def _identity(self) -> tuple[int, ...]:
        return tuple(id(x) for m in self._modules for x in (*m._modules.values(), *m._parameters.values()))

    def get(self) -> GPT2View | None:
        """The view, or ``None`` where the lean forward would not compute exactly what the model does."""
        if not self._modules or self._identity() != self._key:
            self._modules = list(self.model.modules())
            self._key = self._identity()
            self._adapters = any(type(m).__module__.startswith("peft.") for m in self._modules)
            self._view = gpt2_view(self.model)
            return self._view
        if self._view is None or self._adapters:  # adapters switch on and off without changing any module
            self._view = gpt2_view(self.model)
            return self._view
        return None if _hooks_or_dropout(self._modules) else self._view


def _flat(items: Iterable) -> Iterable[torch.Tensor | None]:
    """The tensors (and Nones) in nested tuples and lists: layers, LoRA projections, layer norms' pairs."""
    for item in items:
        if isinstance(item, (tuple, list)):
            yield from _flat(item)
        elif item is None or isinstance(item, torch.Tensor):
            yield item


def _norm(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    module = _exactly(module, torch.nn.LayerNorm)
    return module.weight, module.bias


class GPT2View:
    """The parameter tensors of a GPT-2 (the same objects, no copies) and a lean forward over them.

    ``lm_head`` is the LM head's weight ``[V, D]`` (None for a sequence classifier); ``score`` is a
    ``GPT2ForSequenceClassification``'s score weight ``[num_labels, D]`` (None for an LM).

    Shapes: ``B`` rows, ``L`` new positions, ``K`` key positions (cached + new), ``D = n_embd``,
    ``H`` heads of ``hd = D / H``, ``V`` vocabulary.
    """

    path = "gpt2"
    """Its name in :func:`rlhf_envs.lm.views.forward_path`."""

    def __init__(self, model: torch.nn.Module):
        config, body = model.config, model.transformer
        self.n_head = config.n_head
        self.d_model = config.n_embd
        self.head_dim = self.d_model // self.n_head
        self.eps = config.layer_norm_epsilon
        nn = torch.nn
        self.wte, self.wpe = _exactly(body.wte, nn.Embedding).weight, _exactly(body.wpe, nn.Embedding).weight
        self.ln_f = _norm(body.ln_f)
        head, score = getattr(model, "lm_head", None), getattr(model, "score", None)
        self.lm_head = _exactly(head, nn.Linear).weight if head is not None else None
        self.score = _exactly(score, nn.Linear).weight if score is not None else None
        self.layers = []
        for i, block in enumerate(body.h):
            scaling = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
            if config.scale_attn_by_inverse_layer_idx:
                scaling /= float(i + 1)
            attn, mlp = block.attn, block.mlp
            (attn_w, attn_b), (attn_proj_w, attn_proj_b), (fc_w, fc_b), (proj_w, proj_b) = (
                _projection(m) for m in (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj))
            self.layers.append(_Layer(_norm(block.ln_1), attn_w, attn_b, attn_proj_w, attn_proj_b, _norm(block.ln_2),
                                      fc_w, fc_b, proj_w, proj_b, scaling))
        self.tensors = [t for t in _flat((self.wte, self.wpe, self.ln_f, self.lm_head, self.score, self.layers))
                        if t is not None]
        """Every tensor the view reads (a LoRA projection's base and adapter weights too)."""

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.dtype

    def _ln(self, x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.layer_norm(x, (self.d_model,), params[0], params[1], self.eps)

    def _mlp_out(self, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        """``MLP(ln_2(x))`` for ``x [N, D]``; the GELU runs in place when no gradient is recorded."""
        hidden = _proj(layer.fc_b, self._ln(x, layer.ln_2), layer.fc_w)
        return _proj(layer.proj_b, gelu_tanh(hidden), layer.proj_w)

    def _mlp(self, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        """``x [N, D]`` -> ``x + MLP(ln_2(x))``."""
        return self._mlp_out(x, layer).add_(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., D]`` (before ``ln_f``) -> logits ``[..., V]``."""
        return F.linear(self._ln(hidden, self.ln_f), self.lm_head)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """``ln_f(hidden)``: the last hidden state a Hugging Face GPT-2 returns."""
        return self._ln(hidden, self.ln_f)

    def packed_forward(self, tokens: torch.Tensor, positions: torch.Tensor, gather: torch.Tensor, owner: torch.Tensor,
                       rows: int, keep: torch.Tensor | None = None,
                       attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Differentiable hidden states ``[N, D]`` (before ``ln_f``) of ``N`` packed tokens, or ``[K, D]`` of
        the ``K`` packed indices ``keep`` (in that order, repeats allowed).

        ``tokens`` and ``positions`` are ``[N]``. Attention runs on a ``[rows, W]`` grid of causal
        rows: ``gather [rows * W]`` names the packed token at each cell (a token may stand in several
        rows, e.g. a prompt shared by two responses; right padding repeats a real token, which
        causal attention never reaches from a real one), and ``owner [N]`` the cell whose output each
        token takes (:func:`rlhf_envs.lm.packing.pack_sequences` builds them). Layer norms, projections and
        the MLP run on the ``N`` tokens only. With gradients recorded only the residual adds write in
        place, into projection outputs that their backward does not read, so autograd sees every op
        and gradients reach the model's parameters (a token gathered into several rows sums its
        gradients); without (a reference pass), the GELU runs in place too. Causal
        rows go through SDPA's causal kernel with or without gradients (see
        :data:`rlhf_envs.lm.packing.SEGMENT_INFERENCE_WIDTH` for when a reference pass takes them on CPU).

        With ``keep`` (e.g. the tokens that predict a target, or each sequence's last token for a
        reward model), the last layer's per-token work after attention (its output projection, layer
        norm and MLP) runs on those tokens only: every other token's last-layer output feeds nothing
        (its keys and values, which later tokens do read, come before). On DPO's preference pairs a
        fifth of the tokens (prompts) drop out there; for a reward model all but one per sequence.

        With ``attn_mask`` (additive, ``[rows, 1, W, W]``) a grid row may hold several sequences
        side by side (:class:`SegmentLayout`): attention runs as two matmuls under that mask
        instead of causal rows, for gradients too (it keeps the ``[rows, H, W, W]`` probabilities
        for the backward pass, so callers pass it for short rows only).
        """
        width = gather.numel() // rows
        heads, hd = self.n_head, self.head_dim
        x = F.embedding(tokens, self.wte) + F.embedding(positions, self.wpe)
        last = len(self.layers) - 1
        # [rows, 1, W, W] -> [H * rows, W, W] in the grids' head-major order, once for all layers
        if attn_mask is not None:
            attn_mask = attn_mask.transpose(0, 1).expand(heads, rows, width, width).reshape(heads * rows, width, width)
        for i, layer in enumerate(self.layers):
            qkv = _proj(layer.attn_b, self._ln(x, layer.ln_1), layer.attn_w)
            # Gathered head-major, ``[3 * H, rows * W, hd]``: each of q, k, v is then a contiguous
            # ``[H * rows, W, hd]`` batch of matrices, which the batched products read without copying.
            grid = qkv.view(-1, 3 * heads, hd).transpose(0, 1).index_select(1, gather)
            q, k, v = grid.view(3, heads * rows, width, hd).unbind(0)
            if attn_mask is not None:
                scores = torch.baddbmm(attn_mask, q, k.transpose(1, 2), alpha=layer.scaling)
                att = torch.bmm(scores.softmax(-1), v)
            else:
                shape = (heads, rows, width, hd)  # SDPA's batch and head dimensions, here heads then rows
                att = F.scaled_dot_product_attention(
                    q.view(shape), k.view(shape), v.view(shape), is_causal=True, scale=layer.scaling
                )
            cells = owner
            if keep is not None and i == last:
                cells, x = owner.index_select(0, keep), x.index_select(0, keep)
            att = att.reshape(heads, rows * width, hd).index_select(1, cells).transpose(0, 1).reshape(-1, self.d_model)
            x = _residual(_proj(layer.attn_proj_b, att, layer.attn_proj_w), x)
            x = _residual(self._mlp_out(x, layer), x)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attn_mask: torch.Tensor,
        cache: list[tuple[torch.Tensor, torch.Tensor]],
        start: int,
        first: int = 0,
    ) -> torch.Tensor:
        """Run ``input_ids [B, L]`` at cache slots ``[start, start + L)``; return hidden states ``[B, L, D]`` (before
        ``ln_f``).

        The queries attend to cache slots ``[first, start + L)``: ``attn_mask [B, 1, L, start + L - first]``
        is additive over them (0 = may attend, the dtype's minimum = may not); slots before ``first``
        are not read (a caller whose live keys all lie later says so, e.g. a rolling cache).
        ``cache`` holds per layer ``(keys, values)`` of ``[B, H, max_len, hd]``, written in place.
        """
        batch, length = input_ids.shape
        end = start + length
        x = (F.embedding(input_ids, self.wte) + F.embedding(position_ids, self.wpe)).view(batch * length, self.d_model)
        for layer, (keys, values) in zip(self.layers, cache):
            qkv = _proj(layer.attn_b, self._ln(x, layer.ln_1), layer.attn_w)
            q, k, v = qkv.view(batch, length, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            if length == 1:  # decoding: one query per row, where two small matmuls beat the flash kernel
                att = _attention(q, keys[:, :, first:end], values[:, :, first:end], attn_mask, layer.scaling)
            else:
                att = F.scaled_dot_product_attention(
                    q, keys[:, :, first:end], values[:, :, first:end], attn_mask=attn_mask, scale=layer.scaling
                )
            att = att.transpose(1, 2).reshape(batch * length, self.d_model)
            x = self._mlp(_proj(layer.attn_proj_b, att, layer.attn_proj_w).add_(x), layer)
        return x.view(batch, length, self.d_model)

    def new_cache(self, batch: int, max_len: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(keys, values)``, each ``[B, H, max_len, hd]`` in the model's dtype."""
        shape = (batch, self.n_head, max_len, self.head_dim)
        return [
            (torch.zeros(shape, dtype=self.dtype, device=device), torch.zeros(shape, dtype=self.dtype, device=device))
            for _ in self.layers
        ]

    def packed_hidden(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor,
        wanted: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        kv_out: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Teacher-forced hidden states ``[M, D]`` (before ``ln_f``) at the ``M`` positions where ``wanted [B, L]`` is
        True.

        Row-major order; ``wanted`` must lie inside ``mask [B, L]``. Row ``b``'s real tokens
        (``mask[b]``) attend causally to each other and, with ``past = (kv, rows, past_mask)``, to
        earlier positions, e.g. cached prompts: to ``kv[rows[b]]`` where ``past_mask [B, Lp]`` is
        True; ``kv [n, n_layer, 2, H, Lp, hd]`` holds per layer keys then values, as
        :class:`PromptKVCache` keeps them. Only real tokens go through the per-token work (layer
        norms, projections, MLP), so padding costs nothing there.

        Attention runs on :class:`SegmentLayout`: each row's past and real tokens (a
        *segment*) lie side by side with other rows' in a few shared grid rows, keys and values in
        ``[R, H, W, hd]`` (``W`` = the longest segment), queries (real tokens only) in
        ``[R, H, Wq, hd]``, and a block-diagonal causal mask keeps segments apart. For a scoring
        batch whose responses stop early this is half as many, denser attention products as one
        padded row per sequence. One flat buffer holds the three grids: each layer writes its q, k, v
        heads (and copies the past's keys and values) into a table of ``hd``-wide rows, the buffer
        gathers its cells from that table with one ``index_select`` (on CPU several times faster per
        row than scattering them with ``index_copy_``), and the outputs come back with another.

        With ``kv_out = (table, rows)`` every layer's keys and values of the real tokens are also
        written to ``table [n, n_layer, 2, H, L, hd]`` (the :class:`PromptKVCache` layout): row ``b``'s
        token in column ``j`` goes to ``table[rows[b], layer, :, :, j]``.
        """
        heads, hd = self.n_head, self.head_dim
        device = mask.device
        row, col = mask.nonzero(as_tuple=True)
        picked = wanted[row, col].nonzero().squeeze(-1)
        x = F.embedding(input_ids[row, col], self.wte) + F.embedding(position_ids[row, col], self.wpe)
        new = mask.cpu().numpy()
        old = past[2].cpu().numpy() if past is not None else np.zeros((len(new), 0), dtype=bool)
        layout = SegmentLayout(old.sum(1), new.sum(1))
        n_rows, width, q_width = layout.rows, layout.width, layout.q_width
        bases = (0, n_rows * heads * q_width, n_rows * heads * (q_width + width))  # where the Q, K and V grids start
        # Per real token: its segment's grid row and its query and key columns (its rank among its row's real tokens).
        b_new, rank = ranks(new)
        seg_row = layout.row[b_new]
        q_col = layout.q_offset[b_new] + rank
        k_col = layout.k_offset[b_new] + layout.past[b_new] + rank
        h = np.arange(heads)
        cells = np.stack(
            [
                bases[0] + ((seg_row * heads)[:, None] + h) * q_width + q_col[:, None],
                bases[1] + ((seg_row * heads)[:, None] + h) * width + k_col[:, None],
                bases[2] + ((seg_row * heads)[:, None] + h) * width + k_col[:, None],
            ],
            axis=1,
        )
        outputs = torch.from_numpy(cells[:, 0].reshape(-1)).to(device)
        attn_mask = additive_mask(torch.from_numpy(layout.allowed()).to(device), x.dtype)
        # Each layer's source rows (``hd`` wide): the new tokens' q, k, v heads, then the past keys and values,
        # then one zero row; every grid cell gathers its row from there (unused cells the zero row).
        n_new = len(b_new) * 3 * heads
        n_past = 0 if past is None else int(old.sum()) * 2 * heads
        grid = np.full(bases[2] + n_rows * heads * width, n_new + n_past, dtype=np.int64)
        grid[cells.reshape(-1)] = np.arange(n_new)
        source_rows = x.new_zeros(n_new + n_past + 1, hd)
        new_rows = source_rows[:n_new].view(len(b_new), 3 * self.d_model)
        if past is not None:
            kv, table_rows = past[0], past[1].cpu().numpy()
            b_old, p = old.nonzero()
            old_rank = ranks(old)[1]
            span = kv.shape[-2]
            k_old = layout.k_offset[b_old] + old_rank
            # kv.view(-1, hd) row of (table row n, layer i, part c, head h, position p):
            # (((n * layers + i) * 2 + c) * H + h) * span + p
            source = (
                ((table_rows[b_old] * len(self.layers))[:, None, None] * 2 + np.arange(2)[:, None]) * heads + h
            ) * span
            source = torch.from_numpy((source + p[:, None, None]).reshape(-1)).to(device)
            target = np.stack(
                [bases[c] + ((layout.row[b_old] * heads)[:, None] + h) * width + k_old[:, None] for c in (1, 2)], axis=1
            )
            grid[target.reshape(-1)] = n_new + np.arange(n_past)
            kv_rows = kv.reshape(-1, hd)
            layer_stride = 2 * heads * span
            past_rows = source_rows[n_new : n_new + n_past]
        grid = torch.from_numpy(grid).to(device)
        if kv_out is not None:
            table, out_rows = kv_out[0], kv_out[1].cpu().numpy()
            out_span = table.shape[-2]
            # table.view(-1, hd) row of (table row n, layer i, part c, head h, column j), as for the past above
            out_index = (
                ((out_rows[b_new] * len(self.layers))[:, None, None] * 2 + np.arange(2)[:, None]) * heads + h
            ) * out_span + col.cpu().numpy()[:, None, None]
            out_index = torch.from_numpy(out_index.reshape(-1)).to(device)
            out_flat = table.view(-1, hd)
        q_shape, kv_shape = (n_rows, heads, q_width, hd), (n_rows, heads, width, hd)
        buffer = x.new_empty(grid.shape[0], hd)
        for i, layer in enumerate(self.layers):
            if past is not None:
                torch.index_select(kv_rows, 0, source + i * layer_stride, out=past_rows)
            if isinstance(layer.attn_w, _LoRA):
                new_rows.copy_(_proj(layer.attn_b, self._ln(x, layer.ln_1), layer.attn_w))
            else:
                torch.addmm(layer.attn_b, self._ln(x, layer.ln_1), layer.attn_w, out=new_rows)
            torch.index_select(source_rows, 0, grid, out=buffer)
            if kv_out is not None:
                out_flat.index_copy_(
                    0, out_index + i * 2 * heads * out_span, new_rows[:, self.d_model :].reshape(-1, hd)
                )
            att = _attention(
                buffer[: bases[1]].view(q_shape),
                buffer[bases[1] : bases[2]].view(kv_shape),
                buffer[bases[2] :].view(kv_shape),
                attn_mask,
                layer.scaling,
            )
            att = att.view(-1, hd).index_select(0, outputs).view(-1, self.d_model)
            x = self._mlp(_proj(layer.attn_proj_b, att, layer.attn_proj_w).add_(x), layer)
        return x.index_select(0, picked)
