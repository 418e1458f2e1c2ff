"""The packed forward for Llama-family models, through transformers' own model code.

Llama, Qwen2, Qwen3 and Mistral (RMSNorm, rotary positions, grouped-query attention, SwiGLU) run
their own Hugging Face modules on the ``N`` packed tokens of a :class:`rlhf_envs.lm.packing.PackedBatch`
as one row ``[1, N]`` with each token's own position id (so the rotary embedding, any rope scaling
included, is the model's). Everything in such a model but attention works token by token, so only
attention needs the packing's layout: for the duration of the call the model's attention
implementation is an attention function registered with transformers' ``AttentionInterface``
(:data:`PACKED_ATTENTION`), which gathers the packed queries, keys and values into the batch's
attention grid, attends there, and hands each token its output back. transformers builds no mask for
an implementation it has no mask function for, so the per-call mask work is skipped as well.

Nothing here is a second implementation of the architecture: the norms, projections (peft's LoRA
layers included), rotary embedding, MLP, hooks and final norm are the model's own, so the results are
Hugging Face's to float rounding (``tests/test_hf_packed.py`` checks log-probs, rewards and gradients
against its padded forward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["HFPackedView", "PACKED_ATTENTION", "PACKED_MODEL_TYPES", "hf_packed_view"]

PACKED_ATTENTION = "rlhf_packed"
"""The name the packed attention function is registered under in transformers' ``AttentionInterface``."""
PACKED_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})
"""``config.model_type`` values whose decoder is token-wise outside attention and calls the attention interface."""
_CLASS_SUFFIXES = ("ForCausalLM", "ForSequenceClassification")


@dataclass(frozen=True)
class _Layout:
    """Where the packed tokens sit in the attention grid: ``gather [rows * W]`` (the packed token of each
    cell), ``owner [N]`` (the cell each token's output comes from) and an additive mask ``[rows, 1, W, W]``
    (several sequences share a row) or ``None`` (one causal row per sequence)."""

    gather: torch.Tensor
    owner: torch.Tensor
    rows: int
    attn_mask: torch.Tensor | None


def _grid(x: torch.Tensor, layout: _Layout, heads: int) -> torch.Tensor:
    """``x [1, h, N, hd]`` -> ``[heads * rows, W, hd]`` (head-major) on the layout's grid; ``h`` kv heads are
    repeated to ``heads`` as ``repeat_kv`` does (query head ``i`` reads kv head ``i // (heads / h)``)."""
    kv_heads, hd = x.shape[1], x.shape[-1]
    grid = x[0].index_select(1, layout.gather)
    if kv_heads != heads:
        grid = grid[:, None].expand(kv_heads, heads // kv_heads, *grid.shape[1:]).reshape(heads, -1, hd)
    return grid.reshape(heads * layout.rows, -1, hd)


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     sliding_window: int | None = None, packed_layout: _Layout | None = None,
                     packed_record: list | None = None, packed_past=None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over a packed row: ``query [1, H, N, hd]``, ``key`` and
    ``value [1, H_kv, N, hd]`` -> ``([1, N, H, hd], None)``.

    The layout comes in ``packed_layout`` (passed through the model's ``**kwargs``). Rows of the
    causal layout go through SDPA's causal kernel; a shared-row layout runs as two batched matmuls
    under its block-diagonal mask (for rows of tens of tokens faster than SDPA on CPU; see
    :data:`rlhf_envs.lm.packing.SEGMENT_ATTENTION_BYTES`). With ``packed_record`` (a list) each layer
    appends its keys and values; with ``packed_past`` (:class:`rlhf_envs.lm.hf_prompt_cache.PastLayout`)
    the new tokens attend to cached prompt keys and values as well.
    """
    if packed_record is not None:
        packed_record.append((key, value))
    if packed_past is not None:
        return packed_past.attend(query, key, value, query.shape[-1] ** -0.5 if scaling is None else scaling), None
    if packed_layout is None:
        raise ValueError(f"the {PACKED_ATTENTION!r} attention implementation runs only inside HFPackedView's "
                         "packed_forward and past_forward")
    if dropout:
        raise ValueError(f"packed attention has no dropout, got attention dropout {dropout}; "
                         "hf_packed_view returns None for such a model in training mode")
    heads, hd = query.shape[1], query.shape[-1]
    scale = hd ** -0.5 if scaling is None else scaling
    q, k, v = (_grid(x, packed_layout, heads) for x in (query, key, value))
    width = q.shape[1]
    mask = packed_layout.attn_mask
    if sliding_window is not None and width > sliding_window:
        mask = _windowed(packed_layout, width, sliding_window, query.dtype)
    if mask is not None:
        rows = packed_layout.rows
        mask = mask.transpose(0, 1).expand(heads, rows, width, width).reshape(heads * rows, width, width)
        att = torch.bmm(torch.baddbmm(mask, q, k.transpose(1, 2), alpha=scale).softmax(-1), v)
    else:
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    out = att.view(heads, -1, hd).index_select(1, packed_layout.owner)
    return out.transpose(0, 1).unsqueeze(0), None


def _windowed(layout: _Layout, width: int, window: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of a sliding-window layer: transformers' rule (a query sees keys less than
    ``window`` positions back) on top of the layout's own mask, or of causal rows."""
    from rlhf_envs.lm.segments import additive_mask

    column = torch.arange(width, device=layout.gather.device)
    near = (column[:, None] - column[None, :] < window)
    if layout.attn_mask is None:  # causal rows: a column is the position
        return additive_mask((near & (column[None, :] <= column[:, None]))[None, None], dtype)
    raise ValueError(f"a shared-row layout of width {width} under a sliding window of {window}: "
                     "HFPackedView takes causal rows whenever the rows are wider than the window")


def _register() -> None:
    from transformers import AttentionInterface

    if PACKED_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(PACKED_ATTENTION, packed_attention)


@contextlib.contextmanager
def _attention_implementation(config, name: str) -> Iterator[None]:
    """``config``'s attention implementation set to ``name`` for the block (sub-configs too), then restored."""
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (the LoRA layers are in its modules), or ``model``."""
    if type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def hf_packed_view(model: torch.nn.Module) -> HFPackedView | None:
    """An :class:`HFPackedView` of a Llama-family ``...ForCausalLM`` or ``...ForSequenceClassification``
    (bare or inside peft), or ``None`` for any other model, or while attention dropout is active."""
    base = _unwrap(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "model_type", None) not in PACKED_MODEL_TYPES:
        return None
    name = type(base).__name__
    if not name.endswith(_CLASS_SUFFIXES) or type(base).__module__.split(".")[:2] != ["transformers", "models"]:
        return None
    if base.training and getattr(config, "attention_dropout", 0.0):
        return None
    head = getattr(base, "lm_head", None) if name.endswith("ForCausalLM") else getattr(base, "score", None)
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return HFPackedView(base)


class HFPackedView:
    """A Llama-family model's packed forward (the :class:`rlhf_envs.lm.views.PackedForward` protocol).

    ``packed_forward`` returns the model's last hidden state (after its final norm), so
    :meth:`final_norm` is the identity and :meth:`logits` the LM head alone. ``lm_head`` is the LM
    head's weight ``[V, D]`` (None for a sequence classifier); ``score`` the classifier's ``[labels, D]``.
    """

    path = "hf-packed"

    def __init__(self, model: torch.nn.Module):
        _register()
        self.model = model
        self.body = model.base_model
        config = model.config.get_text_config()
        self.config = model.config
        self.n_head = config.num_attention_heads
        use_window = getattr(config, "use_sliding_window", True)  # Qwen2/Qwen3 switch it off by default
        self.sliding_window = getattr(config, "sliding_window", None) if use_window else None
        head = getattr(model, "lm_head", None)
        self.lm_head = head.weight if head is not None and type(model).__name__.endswith("ForCausalLM") else None
        score = getattr(model, "score", None)
        self.score = score.weight if score is not None and self.lm_head is None else None

    @property
    def dtype(self) -> torch.dtype:
        return self.body.get_input_embeddings().weight.dtype

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The identity: :meth:`packed_forward` already returns the final norm's output."""
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., D]`` (the last hidden state) -> logits ``[..., V]``."""
        return F.linear(hidden, self.lm_head)

    def packed_forward(self, tokens: torch.Tensor, positions: torch.Tensor, gather: torch.Tensor, owner: torch.Tensor,
                       rows: int, keep: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                       record: list | None = None) -> torch.Tensor:
        """Differentiable last hidden states ``[N, D]`` of ``N`` packed tokens (``[K, D]`` at ``keep``), with the
        arguments of :meth:`rlhf_envs.lm.gpt2.GPT2View.packed_forward`.

        A shared-row layout (``attn_mask``) wider than a sliding window is not built by the packing's
        callers; causal rows wider than it get the windowed mask (:func:`_windowed`). With ``record`` (a
        list) every layer's keys and values ``[1, H_kv, N, hd]`` are appended to it.
        """
        width = gather.numel() // rows
        if attn_mask is not None and self.sliding_window is not None and width > self.sliding_window:
            raise ValueError(f"shared rows of width {width} exceed the sliding window {self.sliding_window}; "
                             "pass the causal-row layout (attn_mask=None)")
        layout = _Layout(gather, owner, rows, attn_mask)
        extra = {} if record is None else {"packed_record": record}
        with _attention_implementation(self.config, PACKED_ATTENTION):
            out = self.body(input_ids=tokens[None], position_ids=positions[None], use_cache=False, packed_layout=layout,
                            **extra)
        hidden = out.last_hidden_state[0]
        return hidden if keep is None else hidden.index_select(0, keep)

    def past_forward(self, tokens: torch.Tensor, positions: torch.Tensor, past) -> torch.Tensor:
        """Last hidden states ``[N, D]`` of ``N`` new tokens that attend to cached keys and values as ``past``
        (a :class:`rlhf_envs.lm.hf_prompt_cache.PastLayout`) lays them out. Not for sliding-window models."""
        if self.sliding_window is not None and past.width > self.sliding_window:
            raise ValueError(f"rows of {past.width} tokens exceed the sliding window {self.sliding_window}")
        past.layer = 0
        with _attention_implementation(self.config, PACKED_ATTENTION):
            out = self.body(input_ids=tokens[None], position_ids=positions[None], use_cache=False, packed_past=past)
        return out.last_hidden_state[0]
