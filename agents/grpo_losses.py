"""The arithmetic of the critic-free group methods, as small pure functions chosen from dicts.

Shapes: ``B`` responses in ``B / G`` consecutive groups of ``G`` (one prompt each), ``T`` response
tokens; ``mask [B, T]`` is True on response tokens up to and including EOS (all ``T`` for a truncated
response, which has no EOS). Nothing past EOS carries an advantage, a KL term or a loss.

**Advantages** (:data:`ADVANTAGES`, from sequence rewards ``[B]``):

- ``grpo``: ``r - mean(group)``, divided by ``std(group) + eps`` when ``scale_rewards`` (DeepSeekMath);
- ``rloo``: ``r - mean(others in the group)`` = ``G / (G - 1) * (r - mean(group))`` (Ahmadian et al.);
- ``reinforce_pp``: ``(r - mean(batch)) / (std(batch) + eps)``, REINFORCE++'s global normalisation.

A group of one has no baseline from its group: its ``grpo`` and ``rloo`` advantage is 0.

**Loss aggregation** (:data:`AGGREGATIONS`, from per-token losses ``[B, T]``):

- ``grpo``: mean over each response's tokens, then over responses (the ``1/|o|`` that favours long
  wrong answers and short right ones: Liu et al., Dr. GRPO);
- ``dr_grpo``: sum over all tokens divided by the constant ``B * max_new_tokens``;
- ``dapo``: sum over all tokens divided by the number of tokens (token-level mean; Yu et al., DAPO).

**KL in the loss** (:data:`KL_LOSSES`, per token, against the frozen reference):

- ``k3``: ``exp(ref - logp) - (ref - logp) - 1``. Its value estimates ``KL(pi || ref)``, but its
  on-policy gradient is ``E_pi[(1 - pi_ref / pi) grad log pi] = grad KL(ref || pi)``: the *reverse*
  KL's gradient, biased for the KL it reports (trl#4967).
- ``k2``: ``0.5 * (logp - ref)^2``. Its on-policy gradient is ``E_pi[log(pi / pi_ref) grad log pi]``,
  the gradient of ``KL(pi || ref)`` at each token (the myopic part: a token's effect on later tokens'
  KL is left out, as with every per-token KL in the loss).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["ADVANTAGES", "AGGREGATIONS", "KL_LOSSES", "clipped_token_loss", "overlong_penalty",
           "zero_variance_groups"]

EPS = 1e-4


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.reshape(-1, group_size)


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool = True) -> torch.Tensor:
    """``r - mean(group)`` (``/ (std(group) + eps)`` with ``scale_rewards``; std unbiased); ``[B]``."""
    groups = _grouped(rewards.float(), group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale_rewards and group_size > 1:
        centred = centred / (groups.std(-1, keepdim=True) + EPS)
    return centred.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool = False) -> torch.Tensor:
    """Leave-one-out: ``r_i - mean_{j != i} r_j``; 0 for a group of one; ``[B]`` (``scale_rewards`` unused)."""
    groups = _grouped(rewards.float(), group_size)
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


def reinforce_pp_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: bool = True) -> torch.Tensor:
    """REINFORCE++: ``(r - mean(batch)) / (std(batch) + eps)`` over the whole batch; ``[B]``."""
    rewards = rewards.float()
    centred = rewards - rewards.mean()
    if scale_rewards and rewards.numel() > 1:
        centred = centred / (rewards.std() + EPS)
    return centred


ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": grpo_advantages, "rloo": rloo_advantages, "reinforce_pp": reinforce_pp_advantages}


def zero_variance_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[B / G]`` bool: the groups whose scores are all equal (every answer right, or every one wrong)."""
    groups = _grouped(scores, group_size)
    return (groups == groups[:, :1]).all(-1)


def overlong_penalty(lengths: torch.Tensor, truncated: torch.Tensor, max_new_tokens: int, buffer: int,
                     penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment ``[B]``: 0 up to ``max_new_tokens - buffer`` tokens, then falling
    linearly to ``-penalty`` at ``max_new_tokens``; ``-penalty`` for a truncated response (no EOS)."""
    if buffer <= 0:
        return torch.zeros(lengths.shape)
    start = max_new_tokens - buffer
    shaped = -penalty * ((lengths.float() - start).clamp(min=0) / buffer).clamp(max=1.0)
    return torch.where(truncated, torch.full_like(shaped, -penalty), shaped)


def clipped_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                       mask: torch.Tensor, clip_low: float, clip_high: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate per token ``[B, T]`` (0 off ``mask``), ratio clipped to ``[1 - low, 1 + high]``;
    ``advantages [B]`` apply to every token of their response. Stats: ``ratio`` (mean), ``clipfrac``."""
    m = mask.to(logprobs.dtype)
    ratio = ((logprobs - old_logprobs) * m).exp()
    adv = advantages[:, None].to(logprobs.dtype)
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high)) * m
    with torch.no_grad():
        n = m.sum().clamp(min=1)
        clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
        stats = {"ratio": (ratio * m).sum() / n, "clipfrac": (clipped.float() * m).sum() / n}
    return loss, stats


def grpo_aggregate(token_loss: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Mean over each response's tokens, then over responses."""
    m = mask.to(token_loss.dtype)
    return ((token_loss * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


def dr_grpo_aggregate(token_loss: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Sum over all tokens divided by ``B * max_new_tokens`` (a constant: no length normalisation)."""
    return (token_loss * mask.to(token_loss.dtype)).sum() / (token_loss.shape[0] * max_new_tokens)


def dapo_aggregate(token_loss: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Token-level mean over the batch: sum over all tokens divided by their number."""
    m = mask.to(token_loss.dtype)
    return (token_loss * m).sum() / m.sum().clamp(min=1)


AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "grpo": grpo_aggregate, "dr_grpo": dr_grpo_aggregate, "dapo": dapo_aggregate}


def k3_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 per token: ``exp(ref - logp) - (ref - logp) - 1`` (gradient: the reverse KL's)."""
    log_ratio = ref_logprobs - logprobs
    return log_ratio.exp() - log_ratio - 1


def k2_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 per token: ``0.5 * (logp - ref)^2`` (gradient: the per-token ``KL(pi || ref)``'s)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


KL_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"k3": k3_loss, "k2": k2_loss}
