"""What TextBandit and TextToken share: the reference model, prompts, KL and scoring of a batch.

Token-id conventions of both envs: observations are **left-padded** with ``pad_token_id`` to a fixed
length, so the attention mask of an observation is :func:`attention_mask_from_obs` (everything
after the leading run of pad tokens) and the next token is predicted at the last position.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from gymnasium.error import InvalidAction

from rlhf_envs.kl import check_env_estimator, check_exact_kl, make_kl_controller, truncates
from rlhf_envs.lm.chat import check_conversation, encode_prompt, is_conversation, prompt_text
from rlhf_envs.lm.decoding import PromptKVCache
from rlhf_envs.lm.gpt2 import GPT2View, ViewCache
from rlhf_envs.lm.hf_prompt_cache import HFPromptCache
from rlhf_envs.lm.sampling import SamplingConfig, positions_from_mask, processed_logprobs
from rlhf_envs.lm.views import packed_view
from rlhf_envs.lm.views import response_hidden as packed_response_hidden
from rlhf_envs.rewards import make_reward_model
from rlhf_envs.validation import check_number

__all__ = ["PROMPT_CACHE_BYTES", "AdaptersOff", "TextTask", "attention_mask_from_obs", "check_group_size",
           "context_length", "object_array", "pick_prompt", "vector_info", "vector_task"]

PROMPT_CACHE_BYTES = 256 * 2**20
"""Largest reference prompt cache (keys/values of every prompt) kept in memory; beyond it prompts are re-run."""


def attention_mask_from_obs(obs: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """``[..., L]`` bool mask of a left-padded observation: False on the leading pad run only.

    A pad id inside the text (e.g. when pad = EOS) stays visible.
    """
    return (obs != pad_token_id).long().cummax(dim=-1).values.bool()


def context_length(model: Any) -> int | None:
    """The longest sequence ``model`` takes (positions), or None when its config does not say."""
    config = model.config.get_text_config(decoder=True)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


@dataclass(frozen=True)
class AdaptersOff:
    """A reference model that is a peft model's base weights: ``model`` (e.g. the LoRA policy being trained)
    with its adapters disabled (``disable_adapter()``) for every reference pass. It is not copied, so the
    policy and the reference share one set of base weights; the env neither freezes it nor changes its mode."""

    model: Any
    tokenizer: Any


ModelSpec = str | os.PathLike | tuple | AdaptersOff | None
"""What a text env's ``model`` may be: None (the embedded default), a directory, a (model, tokenizer) pair or an
:class:`AdaptersOff`."""


def _reference_pass(method: Callable) -> Callable:
    """Run a :class:`TextTask` method that reads the reference with an :class:`AdaptersOff` model's adapters off."""

    @functools.wraps(method)
    def run(self: TextTask, *args: Any, **kwargs: Any) -> Any:
        with self.ref_model.disable_adapter() if self.adapters_off else contextlib.nullcontext():
            return method(self, *args, **kwargs)

    return run


def _load_reference(model: ModelSpec) -> tuple[Any, Any]:
    if isinstance(model, AdaptersOff):
        if not hasattr(model.model, "disable_adapter"):
            raise TypeError("AdaptersOff needs a peft model (with disable_adapter()), got "
                            f"{type(model.model).__name__}")
        return model.model, model.tokenizer
    if isinstance(model, tuple):
        if len(model) != 2:
            raise ValueError(f"model=(model, tokenizer) expects a pair, got a tuple of {len(model)}")
        return copy.deepcopy(model[0]), model[1]
    if model is None or isinstance(model, (str, os.PathLike)):
        from rlhf_envs.lm.loading import load_causal_lm

        return load_causal_lm(model)
    raise TypeError(
        f"model must be None (the embedded default), a path to an HF causal LM directory or a (model, tokenizer) "
        f"pair, got {type(model).__name__}")


class TextTask:
    """The frozen reference model, prompts, reward model and KL bookkeeping of a text env.

    A ``(model, tokenizer)`` pair is deep-copied before being frozen (``eval``, no gradients), so
    the caller's model, e.g. the policy being trained, is never modified and never drifts the
    reference.

    Shapes: ``N`` episodes, ``P = max_prompt_tokens``, ``T = max_new_tokens``, ``V`` = vocabulary.
    """

    def __init__(
        self,
        model: ModelSpec = None,
        reward_model: Any = "sentiment",
        prompts: Sequence[str] | None = None,
        beta: float = 0.05,
        kl_estimator: str = "k1",
        kl_setpoint: float | None = None,
        kl_horizon: float = 10000.0,
        max_prompt_tokens: int | None = None,
        max_new_tokens: int = 24,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        device: str = "cpu",
        reward_kwargs: dict | None = None,
        reward_timeout_s: float | None = None,
        n_prompts: int = 512,
        prompt_seed: int = 0,
        skip_reference: bool = False,
    ):
        beta, kl_horizon = check_number(beta, "beta"), check_number(kl_horizon, "kl_horizon")
        kl_setpoint = check_number(kl_setpoint, "kl_setpoint", optional=True)
        reward_timeout_s = check_number(reward_timeout_s, "reward_timeout_s", optional=True)
        max_prompt_tokens = check_number(max_prompt_tokens, "max_prompt_tokens", int, optional=True)
        n_prompts = check_number(n_prompts, "n_prompts", int)
        prompt_seed = check_number(prompt_seed, "prompt_seed", int)
        if isinstance(prompts, (str, bytes)):
            raise TypeError(f"prompts must be a list of strings, got a single {type(prompts).__name__} "
                            f"{prompts[:40]!r}; wrap it in a list: prompts=[{prompts[:40]!r}]")
        if not isinstance(skip_reference, bool):
            raise TypeError(f"skip_reference must be a bool, got {type(skip_reference).__name__} {skip_reference!r}")
        if skip_reference and (beta != 0 or kl_setpoint is not None):
            raise ValueError(f"skip_reference=True drops the KL term, so it needs beta=0 and no kl_setpoint "
                             f"(got beta={beta}, kl_setpoint={kl_setpoint}); set beta=0 or keep the reference pass")
        self.skip_reference = skip_reference
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        max_new_tokens = self.sampling.max_new_tokens
        self.ref_sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=self.sampling.temperature)
        self.kl_estimator = kl_estimator
        self._estimator = check_env_estimator(kl_estimator)
        self.kl_controller = make_kl_controller(beta, kl_setpoint, kl_horizon)
        self.device = torch.device(device)
        ref_model, self.tokenizer = _load_reference(model)
        self.adapters_off = isinstance(model, AdaptersOff)
        self.ref_model = ref_model if self.adapters_off else ref_model.to(self.device).eval().requires_grad_(False)
        self.vocab_size = int(self.ref_model.get_output_embeddings().weight.shape[0])
        self.eos_token_id = self.tokenizer.eos_token_id
        if self.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; set one (responses end at EOS)")
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_id
        self.reward_model = make_reward_model(reward_model, timeout_s=reward_timeout_s, **(reward_kwargs or {}))
        if prompts is None:
            from rlhf_envs.corpus import make_prompts

            prompts = make_prompts(n_prompts, prompt_seed)
        self.prompts = list(prompts)
        self._encode_prompts(max_prompt_tokens)
        self.max_new_tokens = max_new_tokens
        self._warned_uniform = False
        self._ref_prompt_cache: PromptKVCache | None = None
        self._ref_view = ViewCache(self.ref_model)
        self._ref_hf_prompt_cache: HFPromptCache | None = None
        self._backend_decode = _decodes_with_backend(self.tokenizer)

    @property
    def beta(self) -> float:
        """The current KL coefficient."""
        return self.kl_controller.kl_coef

    @property
    def needs_full_logprobs(self) -> bool:
        """Whether the KL needs the policy's full log-distributions ``[..., V]``: for ``exact``, and for ``k3``
        under top-k/top-p (its correction is the reference's mass on the tokens the policy kept)."""
        return self.kl_estimator == "exact" or (self.kl_estimator == "k3" and truncates(self.sampling, self.vocab_size))

    def _encode_prompts(self, max_prompt_tokens: int | None) -> None:
        if not self.prompts or not all(isinstance(p, str) or is_conversation(p) for p in self.prompts):
            raise ValueError(
                "prompts must be a non-empty list of strings or of conversations (lists of role/content "
                "turns), or None for the built-in corpus prompts"
            )
        for i, p in enumerate(self.prompts):
            if not isinstance(p, str):
                check_conversation(p, f"prompts[{i}]")
        # Encoded as the trainers (SFT, RM, DPO) encode prompts: plain text with the tokenizer's own special
        # tokens (a BOS), a conversation rendered with the chat template's generation prompt (rlhf_envs.lm.chat).
        self.prompt_texts = [prompt_text(self.tokenizer, p) for p in self.prompts]
        encoded = [encode_prompt(self.tokenizer, p) for p in self.prompts]
        empty = [i for i, ids in enumerate(encoded) if not ids]
        if empty:
            raise ValueError(f"prompts {empty[:5]} encode to zero tokens; every prompt needs at least one token")
        longest = max(len(ids) for ids in encoded)
        if max_prompt_tokens is None:
            max_prompt_tokens = longest
        if max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        too_long = [i for i, ids in enumerate(encoded) if len(ids) > max_prompt_tokens]
        if too_long:
            i = too_long[0]
            raise ValueError(
                f"prompt {i} ({self.prompt_texts[i][:40]!r}...) has {len(encoded[i])} tokens > max_prompt_tokens="
                f"{max_prompt_tokens} ({len(too_long)} prompts too long); raise max_prompt_tokens or shorten them"
            )
        context = context_length(self.ref_model)
        if context is not None and max_prompt_tokens + self.sampling.max_new_tokens > context:
            raise ValueError(
                f"max_prompt_tokens={max_prompt_tokens} + max_new_tokens={self.sampling.max_new_tokens} exceeds the "
                f"model's context of {context} tokens; shorten the prompts or lower max_new_tokens"
            )
        self.max_prompt_tokens = max_prompt_tokens
        ids = torch.full((len(encoded), max_prompt_tokens), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(encoded), max_prompt_tokens, dtype=torch.bool)
        for i, row in enumerate(encoded):
            ids[i, max_prompt_tokens - len(row) :] = torch.tensor(row)
            mask[i, max_prompt_tokens - len(row) :] = True
        self.prompt_ids, self.prompt_mask = ids.to(self.device), mask.to(self.device)
        self.prompt_obs = ids.numpy()

    def check_tokens(self, tokens: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
        """``tokens`` as int64 of exactly ``shape`` with ids in ``[0, V)``, else :class:`InvalidAction`."""
        arr = np.asarray(tokens)
        if arr.shape != shape:
            raise InvalidAction(f"{what} must have shape {shape} (token ids, EOS then padding), got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise InvalidAction(f"{what} must be integer token ids, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        bad = (arr < 0) | (arr >= self.vocab_size)
        if bad.any():
            raise InvalidAction(
                f"{what} has token ids out of range: {sorted(set(arr[bad].tolist()))[:5]}; expected "
                f"0..{self.vocab_size - 1}"
            )
        return arr

    def check_logprobs(self, values: Any, shape: tuple[int, ...], what: str) -> torch.Tensor:
        """Handed-over log-probs as float32 of exactly ``shape``, else ``ValueError``."""
        t = torch.as_tensor(values).detach()
        if tuple(t.shape) != shape:
            raise ValueError(f"{what} must have shape {shape}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{what} must be float log-probs, got dtype {t.dtype}")
        if torch.isnan(t).any() or (t > 1e-4).any():
            raise ValueError(f"{what} must be log-probabilities (<= 0, not NaN)")
        return t.to(self.device, torch.float32)

    def check_log_distributions(
        self,
        full: torch.Tensor,
        mask: torch.Tensor,
        what: str,
        logprobs: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
    ) -> None:
        """Raise unless ``full [..., V]`` is a normalised log-distribution wherever ``mask [...]`` is True.

        The one hand-over check of both envs. With ``logprobs`` and ``tokens`` (``[...]``), also that the
        per-token log-probs are the full distributions' entries at the tokens.
        """
        mass = torch.logsumexp(full[mask], dim=-1).exp()
        bad = (mass - 1.0).abs() > 1e-3
        if bad.any():
            at = mask.nonzero()[bad.nonzero()[0, 0]].tolist()
            raise ValueError(
                f"{what} must be a full log-distribution over the vocabulary (exp sums to 1 per row) at every "
                f"{'response token' if mask.dim() > 1 else 'step'}; at index {at} the total mass is "
                f"{mass[bad][0].item():.4g}; hand over log_softmax of the logits you sampled from "
                "(rlhf_envs.lm.sampling.processed_logprobs)"
            )
        if logprobs is not None and tokens is not None:
            picked = full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            off = ((picked - logprobs).abs() > 1e-3) & mask
            if off.any():
                at = off.nonzero()[0].tolist()
                raise ValueError(
                    f"logprobs disagree with full_logprobs at the sampled token (index {at}: {logprobs[tuple(at)]:.4g} "
                    f"vs {picked[tuple(at)]:.4g}); hand over both from the distribution you sampled from"
                )

    def warn_uniform(self) -> None:
        """Warn (once per env) that no log-probs were handed over and the KL is for a uniform policy."""
        if not self._warned_uniform:
            self._warned_uniform = True
            warnings.warn(
                "no policy log-probs were handed over with env.unwrapped.set_policy_logprobs(...) before step(); "
                "the KL assumes the action was drawn uniformly from the action space (true for "
                "action_space.sample()). Agents must hand over the log-probs they sampled with.",
                RuntimeWarning,
                stacklevel=4,
            )

    def uniform_logprob(self) -> float:
        """``-log V``: the log-prob of any token under a uniform policy."""
        return -math.log(self.vocab_size)

    def response_mask(self, response_ids: torch.Tensor) -> torch.Tensor:
        """``[N, T]`` bool: True up to and including the first EOS (all True without EOS)."""
        is_eos = (response_ids == self.eos_token_id).long()
        return (is_eos.cumsum(-1) - is_eos) == 0

    def decode(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        """Text of each response, EOS and padding excluded."""
        ids = response_ids.cpu().numpy()
        keep = response_mask.cpu().numpy() & (ids != self.eos_token_id)
        rows = [row[k].tolist() for row, k in zip(ids, keep)]
        if self._backend_decode:  # what batch_decode does for these arguments, without its per-row Python
            return self.tokenizer.backend_tokenizer.decode_batch(rows, skip_special_tokens=True)
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def reference_view(self) -> GPT2View | None:
        """The lean GPT-2 forward over the reference's weights (:class:`rlhf_envs.lm.gpt2.ViewCache`), or ``None``."""
        return self._ref_view.get()

    @_reference_pass
    @torch.no_grad()
    def ref_logprobs(
        self, prompt_index: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor, full: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reference log-probs ``[N, T]`` (and ``[N, T, V]`` with ``full``) in one batched forward.

        Temperature as the policy's, no top-k/top-p, so every token has a finite log-prob. Entries
        outside ``response_mask`` are 0. The forward stops at the longest response in the batch and
        computes logits only where a response token is predicted. A ``GPT2LMHeadModel`` runs through
        :meth:`rlhf_envs.lm.gpt2.GPT2View.packed_hidden` (padding skipped in the per-token work), a
        Llama-family model through its packed forward (:func:`rlhf_envs.lm.views.packed_view`).
        """
        width = int(response_mask.any(0).nonzero().max()) + 1 if response_mask.any() else 1
        ids, mask = response_ids[:, :width], response_mask[:, :width]
        view = self.reference_view()
        packed = packed_view(self.ref_model) if view is None else None
        ref = torch.zeros(response_ids.shape, device=response_ids.device)
        if view is None and packed is None:
            input_ids = torch.cat([self.prompt_ids[prompt_index], ids], dim=1)
            full_mask = torch.cat([self.prompt_mask[prompt_index], mask], dim=1)
            positions = positions_from_mask(full_mask)
            logits = self.ref_model(
                input_ids=input_ids,
                attention_mask=full_mask.long(),
                position_ids=positions,
                use_cache=False,
                logits_to_keep=width + 1,
            ).logits[:, :-1]
            ref_full = processed_logprobs(logits, self.ref_sampling).masked_fill_(~mask[..., None], 0.0)
            ref[:, :width] = ref_full.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        else:
            hidden = (
                self._ref_hidden(view, prompt_index, ids, mask)
                if packed is None
                else self._packed_ref_hidden(packed, prompt_index, ids, mask)
            )
            logits = (view if packed is None else packed).logits(hidden).float()
            ref_picked = processed_logprobs(logits, self.ref_sampling, overwrite=True)
            ref[:, :width][mask] = ref_picked.gather(-1, ids[mask].unsqueeze(-1)).squeeze(-1)
            if full:
                ref_full = ref_picked.new_zeros(mask.shape + ref_picked.shape[-1:])
                ref_full[mask] = ref_picked
        if not full:
            return ref, None
        padded = torch.zeros(response_ids.shape + (ref_full.shape[-1],), device=response_ids.device)
        padded[:, :width] = ref_full
        return ref, padded

    def _prompt_cache(self, view: GPT2View) -> PromptKVCache | None:
        """The reference's prompt cache, made on first use; None when the table would pass ``PROMPT_CACHE_BYTES``."""
        if self._ref_prompt_cache is None and PromptKVCache.nbytes(view, self.prompt_ids) <= PROMPT_CACHE_BYTES:
            self._ref_prompt_cache = PromptKVCache(self.prompt_ids, self.prompt_mask)
        return self._ref_prompt_cache

    @_reference_pass
    @torch.no_grad()
    def cache_prompts(self, batch_size: int = 256) -> bool:
        """Compute the reference's keys and values for every prompt now, ``batch_size`` prompts at a time.

        Steps otherwise do it for each prompt the first time it is drawn (and reuse it after); this
        moves that work out of the first steps, e.g. before timing them. Returns False (and does
        nothing) when the reference has no lean GPT-2 forward or the table would pass the cache's
        size limit: then every step runs its prompts.
        """
        view = self.reference_view()
        cache = None if view is None else self._prompt_cache(view)
        if cache is None:
            return False
        everything = torch.arange(len(self.prompts), device=self.prompt_ids.device)
        for start in range(0, len(everything), batch_size):
            cache.get(view, everything[start : start + batch_size])
        return True

    def _ref_hidden(
        self,
        view: GPT2View,
        prompt_index: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Reference hidden states ``[M, D]`` predicting the ``M`` response tokens ``ids[mask]`` (row-major).

        Prompts come from :class:`PromptKVCache` (computed once per prompt) when the table fits in
        ``PROMPT_CACHE_BYTES``; then only response tokens run. Otherwise, when a prompt repeats in the
        batch (group sampling), a cache over the batch's distinct prompts runs each once; else prompt and
        response run together.
        """
        cache = self._prompt_cache(view)
        prompt_mask = self.prompt_mask[prompt_index]
        rows = prompt_index
        if cache is None:
            distinct, rows = prompt_index.unique(return_inverse=True)
            if len(distinct) == len(prompt_index):
                return response_hidden(view, self.prompt_ids[prompt_index], prompt_mask, ids, mask)
            cache = PromptKVCache(self.prompt_ids[distinct], self.prompt_mask[distinct])
        kv, last_hidden = cache.get(view, rows)
        hidden = last_hidden.new_zeros(mask.shape + last_hidden.shape[-1:])
        hidden[:, 0] = last_hidden
        if mask.shape[1] > 1:
            # Response token j is fed only when token j + 1 exists (the mask is a prefix), so a row's EOS never runs.
            predicts = mask[:, 1:]
            positions = prompt_mask.long().sum(-1, keepdim=True) + torch.arange(mask.shape[1] - 1, device=mask.device)
            hidden[:, 1:][predicts] = view.packed_hidden(
                ids[:, :-1], predicts, positions, predicts, (kv, rows, prompt_mask)
            )
        return hidden[mask]

    def _packed_ref_hidden(
        self,
        view: Any,
        prompt_index: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """:meth:`_ref_hidden` for a Llama-family reference (:class:`rlhf_envs.lm.hf_packed.HFPackedView`): prompts
        from :class:`rlhf_envs.lm.hf_prompt_cache.HFPromptCache` while the table fits in ``PROMPT_CACHE_BYTES``
        (and no sliding window is shorter than a row), else prompt and response in one packed forward."""
        config = view.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        nbytes = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4 * int(self.prompt_mask.sum())
        window = view.sliding_window
        if (
            self._ref_hf_prompt_cache is None
            and nbytes <= PROMPT_CACHE_BYTES
            and (window is None or self.prompt_ids.shape[1] + self.max_new_tokens <= window)
        ):
            self._ref_hf_prompt_cache = HFPromptCache(self.prompt_ids, self.prompt_mask)
        if self._ref_hf_prompt_cache is None:
            prompt_ids, prompt_mask = self.prompt_ids[prompt_index], self.prompt_mask[prompt_index]
            return packed_response_hidden(view, prompt_ids, prompt_mask, ids, mask)
        return self._ref_hf_prompt_cache.hidden(view, prompt_index, ids, mask)

    def kl_per_token(
        self,
        logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor,
        mask: torch.Tensor,
        full_logprobs: torch.Tensor | None = None,
        full_ref_logprobs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The chosen estimator per token, 0 where ``mask`` is False (see :mod:`rlhf_envs.kl`)."""
        kl = self._estimator(logprobs, ref_logprobs, full_logprobs, full_ref_logprobs).masked_fill(~mask, 0.0)
        if self.kl_estimator == "exact":
            check_exact_kl(kl)
        return kl

    def score(self, prompt_index: Sequence[int], responses: list[str]) -> np.ndarray:
        """One batched reward-model call: float32 ``[N]``."""
        return self.reward_model.score([self.prompts[i] for i in prompt_index], responses)


def response_hidden(
    view: GPT2View,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """Hidden states ``[M, D]`` (before ``ln_f``) predicting the ``M`` tokens ``response_ids[response_mask]``
    (row-major), from one packed forward over the left-padded prompts ``[B, P]`` and the responses ``[B, T]``."""
    mask = torch.cat([prompt_mask.bool(), response_mask.bool()], dim=1)
    predicts = torch.zeros_like(mask)
    predicts[:, prompt_ids.shape[1] - 1 : -1] = response_mask
    return view.packed_hidden(torch.cat([prompt_ids, response_ids], dim=1), mask, positions_from_mask(mask), predicts)


def _decodes_with_backend(tokenizer: Any) -> bool:
    """Whether ``tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)``
    is its ``tokenizers`` backend's ``decode_batch``: a transformers ``TokenizersBackend`` that does not
    override ``_decode``."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    return isinstance(tokenizer, TokenizersBackend) and type(tokenizer)._decode is TokenizersBackend._decode


def vector_task(num_envs: Any, render_mode: str | None, env_id: str, task_kwargs: dict) -> TextTask:
    """Check a text vector env's own arguments and build its :class:`TextTask` from the rest.

    ``task_kwargs`` are the single env's arguments (``model``, ``reward_model``, ``beta``, ...); an
    unknown one is a ``TypeError`` that lists the accepted names.
    """
    import inspect

    if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
        raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
    if render_mode is not None:
        raise ValueError(f"the vector {env_id} does not render; use gym.make({env_id!r}, render_mode='ansi')")
    accepted = [name for name in inspect.signature(TextTask).parameters]
    unknown = sorted(set(task_kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"{env_id} got unknown keyword arguments {unknown}; accepted: {['num_envs', 'render_mode', *accepted]}"
        )
    return TextTask(**task_kwargs)


def object_array(values: Sequence[Any]) -> np.ndarray:
    """``[N]`` object array of ``values`` (strings or conversations: a list of turns stays one element)."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out


def check_group_size(group_size: Any, num_envs: Any) -> int:
    """``group_size`` as an int that is >= 1 and divides ``num_envs``, else a ``ValueError`` naming both."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer (responses per prompt), got {group_size!r}")
    if isinstance(num_envs, (int, np.integer)) and not isinstance(num_envs, bool) and num_envs % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide num_envs={num_envs}: each of the num_envs / "
            f"group_size prompts is handed out group_size times; pick a divisor of {num_envs}"
        )
    return int(group_size)


def vector_info(info: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Gymnasium's vector-info layout: every key with a ``_key`` mask (all envs present)."""
    out = dict(info)
    for key, value in info.items():
        out[f"_{key}"] = np.ones(len(value), dtype=bool)
    return out


def pick_prompt(task: TextTask, rng: np.random.Generator, options: dict | None) -> int:
    """The prompt index an episode starts from: ``options["prompt_index"]`` when given, else a uniform draw from
    ``rng``."""
    if options and "prompt_index" in options:
        index = options["prompt_index"]
        if not isinstance(index, (int, np.integer)) or not 0 <= index < len(task.prompts):
            raise ValueError(f"options['prompt_index'] must be an int in [0, {len(task.prompts)}), got {index!r}")
        return int(index)
    return int(rng.integers(len(task.prompts)))
