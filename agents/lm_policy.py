"""The RLHF PPO policy: a causal LM with a value head, and one teacher-forced pass giving log-probs, values and entropy.

The log-probs are those of the processed distribution the sampler draws from (temperature, top-k, top-p:
:func:`rlhf_envs.lm.sampling.processed_logprobs`), so the PPO ratio and the env's KL use the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rlhf_envs.lm.packing import pack_sequences
from rlhf_envs.lm.sampling import SamplingConfig, positions_from_mask, processed_logprobs
from rlhf_envs.lm.views import PackedForward, packed_view

__all__ = ["PolicyWithValueHead", "ValueHead", "policy_forward"]


class ValueHead(nn.Module):
    """A scalar value per position from the policy's last hidden state (zero-initialised)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden).squeeze(-1)


def _logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, cfg: SamplingConfig
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(chosen [...], entropy [...], full [..., V])`` of the processed (sampled-from) distribution."""
    full = processed_logprobs(logits, cfg)
    probs = full.exp()
    return full.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(probs * full.masked_fill(probs == 0,
                                                                                          0.0)).sum(-1), full


def _packed_policy_forward(view: PackedForward, v_head: ValueHead | None, prompt_ids: torch.Tensor,
                           prompt_mask: torch.Tensor,
                           response_ids: torch.Tensor, response_mask: torch.Tensor, cfg: SamplingConfig,
                           return_full: bool = False):
    """:func:`policy_forward` through a packed forward (:mod:`rlhf_envs.lm.views`): no padding, the LM head at
    response tokens only."""
    prompt_keep, keep = prompt_mask.bool(), response_mask.bool()
    seqs = [torch.cat([p[pk], r[k]]) for p, pk, r, k in zip(prompt_ids.cpu(), prompt_keep.cpu(), response_ids.cpu(),
                                                            keep.cpu())]
    batch = pack_sequences(seqs, drop_last=True)  # the last token predicts nothing
    predictor, targets, _ = batch.targets(prompt_keep.sum(-1).tolist())
    device = prompt_ids.device
    hidden = view.final_norm(batch.to(device).hidden(view, predictor.to(device)))
    logprobs, entropy, full = _logprobs_and_entropy(F.linear(hidden, view.lm_head), targets.to(device), cfg)
    out = []
    values = v_head(hidden) if v_head is not None else hidden.new_zeros(hidden.shape[:1])
    for flat in (logprobs, values, entropy):  # response tokens in row-major order = keep's True cells
        out.append(flat.new_zeros(keep.shape).masked_scatter(keep, flat))
    if return_full:
        out.append(full.new_zeros(keep.shape + full.shape[-1:]).index_put_((keep,), full))
    return tuple(out)


def policy_forward(policy: nn.Module, v_head: ValueHead | None, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   response_ids: torch.Tensor, response_mask: torch.Tensor, cfg: SamplingConfig,
                   return_full: bool = False):
    """One teacher-forced pass: ``(logprobs [B, T], values [B, T], entropy [B, T])`` of the responses
    under the processed (sampled-from) distribution; the value at t is that of the state before token t.
    ``v_head=None`` (critic-free trainers) gives zero values. With ``return_full`` a fourth tensor, the full
    log-distributions ``[B, T, V]`` (0 past each
    response), e.g. for the env's ``exact`` KL estimator.

    GPT-2 and Llama-family models without active dropout take a packed forward (:mod:`rlhf_envs.lm.views`);
    other models Hugging Face's forward on the padded batch. Both give the same values to float rounding.
    """
    view = packed_view(policy)
    if view is not None and view.lm_head is not None:
        return _packed_policy_forward(view, v_head, prompt_ids, prompt_mask, response_ids, response_mask, cfg,
                                      return_full)
    prompt_len = prompt_ids.shape[1]
    mask = torch.cat([prompt_mask.bool(), response_mask.bool()], dim=1)
    out = policy(input_ids=torch.cat([prompt_ids, response_ids], dim=1), attention_mask=mask.long(),
                 position_ids=positions_from_mask(mask), output_hidden_states=True, use_cache=False)
    logprobs, entropy, full = _logprobs_and_entropy(out.logits[:, prompt_len - 1:-1], response_ids, cfg)
    values = v_head(out.hidden_states[-1][:, prompt_len - 1:-1]) if v_head is not None else torch.zeros_like(logprobs)
    keep = response_mask.bool()
    result = (logprobs.masked_fill(~keep, 0.0), values.masked_fill(~keep, 0.0), entropy.masked_fill(~keep, 0.0))
    return result + (full.masked_fill(~keep[..., None], 0.0),) if return_full else result


class PolicyWithValueHead(nn.Module):
    """The policy LM and its value head, saved and restored together."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.v_head = ValueHead(lm.config.get_text_config().hidden_size)

    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask, cfg: SamplingConfig,
                return_full: bool = False):
        return policy_forward(self.lm, self.v_head, prompt_ids, prompt_mask, response_ids, response_mask, cfg,
                              return_full)
