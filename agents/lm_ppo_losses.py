"""The arithmetic of RLHF PPO on token sequences, as small pure functions (shapes ``[B, T]``).

``mask`` is True on response tokens (up to and including EOS). Everything masked out contributes
nothing: means, variances and the GAE recursion all respect it.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the True entries of ``mask``."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of ``x`` over the True entries of ``mask``."""
    mean = masked_mean(x, mask)
    n = mask.sum().clamp(min=2)
    return ((x - mean) ** 2 * mask.to(x.dtype)).sum() / (n - 1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / std`` over the masked entries (masked-out entries are returned as 0)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def token_rewards(score: torch.Tensor, kl_per_token: torch.Tensor, beta: torch.Tensor | float,
                  mask: torch.Tensor) -> torch.Tensor:
    """InstructGPT's per-token reward: ``-beta * kl_t`` on every token, plus the score on the last one.

    ``score [B]``, ``kl_per_token [B, T]``, ``beta`` a float or ``[B]``. Returns ``[B, T]``.
    """
    beta = torch.as_tensor(beta, dtype=kl_per_token.dtype)
    if beta.ndim == 1:
        beta = beta[:, None]
    rewards = -beta * kl_per_token * mask.to(kl_per_token.dtype)
    last = mask.long().sum(-1).clamp(min=1) - 1
    rewards[torch.arange(rewards.shape[0]), last] += score.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation per token; the episode ends after the last masked token.

    Returns ``(advantages, returns)``, both ``[B, T]`` and 0 where ``mask`` is False.
    """
    m = mask.to(values.dtype)
    values = values * m
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * m


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float, truncated: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, averaged over response tokens; stats ``approx_kl`` and ``clipfrac``.

    ``approx_kl`` estimates KL(old || new) by k3, or by k1 when the sampler truncates (``truncated``):
    then ``E_old[ratio]`` is the new policy's mass on the old one's kept tokens, not 1, and k3 reads low.
    """
    logratio = (logprobs - old_logprobs) * mask.to(logprobs.dtype)
    ratio = logratio.exp()
    loss = masked_mean(torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)), mask)
    with torch.no_grad():
        stats = {"approx_kl": masked_mean(-logratio if truncated else (ratio - 1) - logratio, mask),
                 "clipfrac": masked_mean(((ratio - 1).abs() > clip).float(), mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``0.5 * max((v - R)^2, (clip(v, v_old +- clip) - R)^2)``, token-averaged."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean(((values - old_values).abs() > clip).float(), mask)}
    return loss, stats
