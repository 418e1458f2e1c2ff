"""One sampler used everywhere: greedy, temperature, top-k and top-p (nucleus) decoding.

The log-probs this module reports are those of the distribution actually sampled from
(temperature, then top-k, then top-p), never of the raw logits: a mismatch between the two is the
classic source of "negative KL" in RLHF.

Conventions (shared by the envs and agents):

* prompts are **left-padded**; ``prompt_mask`` is True on real tokens. Position ids are computed
  from the mask, so a padded row gets the same positions as the unpadded prompt;
* a response runs up to and including the first EOS; after it come pad tokens with
  ``response_mask`` False and log-prob 0. A first token that is EOS is a valid *empty* response.

Truncation rules: top-k keeps exactly the ``k`` largest logits (``torch.topk``); top-p then keeps,
in descending probability order, every token whose preceding cumulative probability (under the
renormalised top-k distribution) is below ``top_p``, so the token that crosses ``top_p`` is kept
and at least one token always is.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

from rlhf_envs.lm.decoding import GPT2Decoder
from rlhf_envs.lm.gpt2 import gpt2_view
from rlhf_envs.lm.llama_decoding import LlamaDecoder, llama_decoder_weights
from rlhf_envs.lm.segments import additive_mask
from rlhf_envs.lm.views import announce
from rlhf_envs.validation import check_config_fields

__all__ = [
    "BufferedKVLayer",
    "cache_keyword",
    "Generation",
    "SamplingConfig",
    "generate",
    "positions_from_mask",
    "preallocated_cache",
    "prefill",
    "processed_logprobs",
    "response_logprobs",
]


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn from the logits. The defaults sample from the model unchanged."""

    max_new_tokens: int = field(default=48, metadata={"help": "Most tokens to generate per response (EOS included)."})
    temperature: float = field(default=1.0, metadata={"help": "Logits are divided by this (> 0) before truncation."})
    top_k: int = field(default=0, metadata={"help": "Keep only the k most likely tokens; 0 turns top-k off."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass in (0, 1]; 1.0 turns top-p off."})
    greedy: bool = field(default=False,
                         metadata={"help": "Take the argmax (one-hot distribution) instead of sampling."})

    def __post_init__(self) -> None:
        check_config_fields(self)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}; pass e.g. 48")
        if not self.temperature > 0.0 or self.temperature != self.temperature or self.temperature == float("inf"):
            raise ValueError(
                f"temperature must be a finite number > 0, got {self.temperature!r}; use greedy=True for argmax "
                "decoding")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1.0 = off), got {self.top_p!r}")


@dataclass
class Generation:
    """A batch of sampled responses. ``B`` rows, ``T <= max_new_tokens`` columns (trimmed once all rows ended)."""

    response_ids: torch.Tensor
    """``[B, T]`` int64 token ids; pad after the first EOS."""
    response_mask: torch.Tensor
    """``[B, T]`` bool; True up to and including the first EOS."""
    logprobs: torch.Tensor
    """``[B, T]`` float32 log-prob of each sampled token under the processed distribution; 0 where masked."""


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B, L]`` for a left- or right-padded ``mask [B, L]``: 0 at the first real token."""
    return (mask.long().cumsum(-1) - 1).clamp_(min=0)


def _truncate(logits: torch.Tensor, cfg: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply temperature, top-k, then top-p to float logits ``[..., V]``.

    Returns ``(logprobs, index)``: ``logprobs [..., K]`` normalised over the kept support (``-inf``
    on removed entries) and ``index [..., K]`` (vocabulary ids of those columns), or ``index=None``
    when nothing was truncated (``K = V``, columns are the vocabulary). Top-k runs before the
    temperature division (it commutes with it), so only ``K`` values get scaled.
    """
    vocab = logits.shape[-1]
    index = None
    if 0 < cfg.top_k < vocab:
        logits, index = torch.topk(logits, cfg.top_k, dim=-1)
    scaled = logits / cfg.temperature
    if cfg.top_p < 1.0:
        if index is None:
            scaled, index = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(scaled, dim=-1)
        mass_before = probs.cumsum(-1) - probs
        scaled = scaled.masked_fill(mass_before >= cfg.top_p, float("-inf"))
    return torch.log_softmax(scaled, dim=-1), index


def processed_logprobs(logits: torch.Tensor, cfg: SamplingConfig, *, overwrite: bool = False) -> torch.Tensor:
    """Log-probs ``[..., V]`` (float32) of the distribution sampled from: temperature, top-k, top-p.

    Removed tokens get ``-inf``. With ``cfg.greedy`` the distribution is one-hot on the argmax
    (log-prob 0 there, ``-inf`` elsewhere). Differentiable in ``logits``.

    ``overwrite=True`` (float32 ``logits`` that no graph records and the caller discards, and
    neither top-k nor top-p set) computes the result in ``logits``' own memory, the same values
    without allocating two more ``[..., V]`` tensors: on CPU each fresh multi-megabyte tensor costs
    a page fault per 4 KiB the first time it is written.
    """
    if overwrite and not cfg.greedy and cfg.top_k == 0 and cfg.top_p == 1.0:
        if logits.dtype != torch.float32 or (torch.is_grad_enabled() and logits.requires_grad):
            raise ValueError("overwrite=True needs float32 logits outside autograd")
        return torch.log_softmax(logits.div_(cfg.temperature), dim=-1, out=logits)
    logits = logits.float()
    if cfg.greedy:
        best = logits.argmax(-1, keepdim=True)
        return torch.full_like(logits, float("-inf")).scatter(-1, best, 0.0)
    logprobs, index = _truncate(logits, cfg)
    if index is None:
        return logprobs
    return torch.full_like(logits, float("-inf")).scatter(-1, index, logprobs)


def _sample(logits: torch.Tensor, cfg: SamplingConfig,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from ``logits [B, V]``: ``(tokens [B] int64, logprobs [B] float32)``.

    Works on the truncated support only (``K`` columns), so top-k sampling never touches the full
    vocabulary after ``torch.topk``; the log-probs equal :func:`processed_logprobs` at the token.
    """
    logits = logits.float()
    if cfg.greedy:
        return logits.argmax(-1), torch.zeros(logits.shape[0], device=logits.device)
    logprobs, index = _truncate(logits, cfg)
    column = torch.multinomial(logprobs.exp(), 1, generator=generator)
    chosen = logprobs.gather(-1, column).squeeze(-1)
    tokens = column if index is None else index.gather(-1, column)
    return tokens.squeeze(-1), chosen


class BufferedKVLayer(DynamicLayer):
    """A KV-cache layer over a buffer preallocated to ``max_len``: appends write in place (no
    ``torch.cat`` per step) and attention sees only the filled part ``[:, :, :length]``.

    ``keys``/``values`` are ``[B, heads, max_len, head_dim]``; ``length`` positions are filled.
    """

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, _ = key_states.shape
        self.keys = key_states.new_zeros(batch, heads, self.max_len, key_states.shape[-1])
        self.values = value_states.new_zeros(batch, heads, self.max_len, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.length


@functools.lru_cache(maxsize=None)
def _cache_keyword(forward_type: type) -> str:
    parameters = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_keyword(model: torch.nn.Module) -> str:
    """The name ``model``'s forward takes its KV cache under: ``cache`` (transformers 5.2x on, where
    ``past_key_values`` is deprecated with a FutureWarning) or ``past_key_values`` (earlier 5.x)."""
    return _cache_keyword(type(model))


def preallocated_cache(model: torch.nn.Module, max_len: int) -> Cache:
    """A KV cache of :class:`BufferedKVLayer` (one per decoder layer) holding up to ``max_len`` positions."""
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[BufferedKVLayer(max_len) for _ in range(n_layers)])


def prefill(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cache: Cache) -> torch.Tensor:
    """Run left-padded prompts ``[B, P]`` into an empty ``cache``; return the last position's logits ``[B, V]``.

    Pad positions attend only to themselves (so no row of the mask is empty); real tokens never see pads.
    """
    prompt_len = prompt_ids.shape[1]
    keep = prompt_mask.bool()
    causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=prompt_ids.device).tril_()
    prompt_keep = (keep[:, None, :] & causal) | torch.eye(prompt_len, dtype=torch.bool, device=prompt_ids.device)
    out = model(
        input_ids=prompt_ids,
        attention_mask=additive_mask(prompt_keep.unsqueeze(1), _model_dtype(model)),
        position_ids=positions_from_mask(keep),
        use_cache=True,
        **{cache_keyword(model): cache},
        logits_to_keep=1,
    )
    return out.logits[:, -1]


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    cfg: SamplingConfig,
    *,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    repeats: int = 1,
) -> Generation:
    """Sample ``cfg.max_new_tokens`` tokens (or fewer, once every row hit EOS) for a batch of prompts.

    Args:
        model: a Hugging Face causal LM (``model(input_ids, attention_mask, position_ids,
            cache, use_cache) -> .logits``).
        prompt_ids: ``[B, P]`` int64, left-padded.
        prompt_mask: ``[B, P]`` bool/int, True on real prompt tokens.
        cfg: decoding settings.
        eos_token_id: the token that ends a response.
        pad_token_id: written after EOS.
        generator: a ``torch.Generator`` on the model's device for reproducible sampling.
        repeats: sample each prompt this many times (group sampling): rows ``i * repeats`` to
            ``(i + 1) * repeats - 1`` answer prompt ``i``; the prompt runs once, its cache is copied.

    The prompt is run once; each later step feeds one token per row through a preallocated KV
    cache (no per-step concatenation; attention reads only the filled part), with explicit position ids and a prebuilt
    4D attention mask updated in place (so the model does no mask bookkeeping). A ``GPT2LMHeadModel`` in eval
    mode without hooks runs through the lean forward of :mod:`rlhf_envs.lm.gpt2` (same parameters, same
    logits, a fraction of Hugging Face's per-op overhead), a Llama, Mistral or Qwen2 through
    :mod:`rlhf_envs.lm.llama_decoding`; any other model through its own forward.
    Runs under ``torch.inference_mode``; the returned tensors are ordinary (usable with autograd).
    """
    with torch.inference_mode():
        ids, mask, logprobs = _generate(model, prompt_ids, prompt_mask, cfg, eos_token_id, pad_token_id, generator,
                                        repeats)
    return Generation(ids.clone(), mask.clone(), logprobs.clone())


class _HFDecoder:
    """The generic path: any Hugging Face causal LM through its own forward, with :class:`BufferedKVLayer` caching."""

    def __init__(self, model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 max_new_tokens: int):
        self.model, self.prompt_ids, self.prompt_mask = model, prompt_ids, prompt_mask
        batch, self.filled = prompt_ids.shape
        total = self.filled + max_new_tokens
        self.cache = preallocated_cache(model, total)
        keep = torch.zeros(batch, total, dtype=torch.bool, device=prompt_ids.device)
        keep[:, : self.filled] = prompt_mask.bool()
        self.step_mask = additive_mask(keep[:, None, None, :], _model_dtype(model))
        self.next_position = prompt_mask.long().sum(-1, keepdim=True)

    def prefill(self) -> torch.Tensor:
        return prefill(self.model, self.prompt_ids, self.prompt_mask, self.cache)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.step_mask[:, :, :, self.filled] = 0.0
        self.filled += 1
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.step_mask[:, :, :, : self.filled],
            position_ids=self.next_position,
            use_cache=True,
            **{cache_keyword(self.model): self.cache},
        )
        self.next_position += 1
        return out.logits[:, -1]

    def keep_rows(self, index: torch.Tensor) -> None:
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        self.step_mask = self.step_mask.index_select(0, index)
        self.next_position = self.next_position.index_select(0, index)


def _generate(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    cfg: SamplingConfig,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None,
    repeats: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoding loop. Rows that emitted EOS leave the batch (the decoder drops their cache rows once
    a quarter of the running rows has finished), so later steps, sampling included, cost only the live rows."""
    device = prompt_ids.device
    batch = prompt_ids.shape[0]
    steps = cfg.max_new_tokens
    view = gpt2_view(model)
    llama = llama_decoder_weights(model, prompt_ids.shape[1] + steps) if view is None else None
    if view is not None:
        decoder = GPT2Decoder(view, prompt_ids, prompt_mask, steps)
    elif llama is not None:
        decoder = LlamaDecoder(llama, prompt_ids, prompt_mask, steps)
    else:
        decoder = _HFDecoder(model, prompt_ids, prompt_mask, steps)
    announce(model, "sampler: " + ("lean GPT-2" if view is not None else "lean Llama" if llama is not None else
                                   "Hugging Face forward"), fallback=view is None and llama is None)
    logits = decoder.prefill()
    if repeats > 1:
        copies = torch.arange(batch, device=device).repeat_interleave(repeats)
        decoder.keep_rows(copies)
        logits, batch = logits.index_select(0, copies), batch * repeats

    response_ids = torch.full((batch, steps), pad_token_id, dtype=torch.long, device=device)
    response_mask = torch.zeros(batch, steps, dtype=torch.bool, device=device)
    logprobs = torch.zeros(batch, steps, dtype=torch.float32, device=device)
    rows = torch.arange(batch, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    used = steps
    for t in range(steps):
        live = (~done).nonzero().squeeze(-1)
        tokens, chosen = _sample(logits.index_select(0, live), cfg, generator)
        at = rows.index_select(0, live)
        response_ids[at, t] = tokens
        response_mask[at, t] = True
        logprobs[at, t] = chosen
        ended = tokens == eos_token_id
        n_live = live.shape[0] - int(ended.sum())
        if t == steps - 1 or n_live == 0:
            used = t + 1
            break
        done[live[ended]] = True
        step_tokens = torch.full_like(rows, pad_token_id).index_copy_(0, live, tokens)
        if n_live <= 3 * rows.shape[0] // 4:
            keep = (~done).nonzero().squeeze(-1)
            decoder.keep_rows(keep)
            rows, done, step_tokens = rows[keep], done[keep], step_tokens[keep]
        logits = decoder.step(step_tokens)
    return response_ids[:, :used], response_mask[:, :used], logprobs[:, :used]


def response_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    cfg: SamplingConfig,
    return_full: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs of responses under the processed distribution, in one forward.

    Args:
        prompt_ids, prompt_mask: ``[B, P]`` left-padded prompts and their mask.
        response_ids, response_mask: ``[B, T]`` responses (as from :func:`generate`).
        cfg: the decoding settings the responses were sampled with.
        return_full: also return the full log-distributions.

    Returns:
        ``logprobs [B, T]`` float32 (0 where ``response_mask`` is False), and with ``return_full``
        also ``full [B, T, V]`` (``-inf`` on tokens top-k/top-p removed). Gradients flow to the
        model unless the caller disables them. A token outside the current top-k/top-p support
        gets ``-inf``, which is the correct log-prob under that distribution.
    """
    prompt_len = prompt_ids.shape[1]
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    mask = torch.cat([prompt_mask.bool(), response_mask.bool()], dim=1)
    logits = model(
        input_ids=input_ids, attention_mask=mask.long(), position_ids=positions_from_mask(mask), use_cache=False,
    ).logits[:, prompt_len - 1 : -1]
    full = processed_logprobs(logits, cfg)
    chosen = full.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    chosen = chosen.masked_fill(~response_mask.bool(), 0.0)
    return (chosen, full) if return_full else chosen
