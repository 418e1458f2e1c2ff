"""Per-token KL estimators and the KL coefficient (``beta``) controllers.

Every estimator has the signature ``f(logprobs, ref_logprobs, full_logprobs=None,
full_ref_logprobs=None) -> Tensor`` and returns a per-token estimate of
``KL(policy || ref_model)`` in nats, shaped like ``logprobs``:

* ``k1``: the log-ratio ``logp - ref_logp``; unbiased, high variance, can be negative per token;
* ``k2``: ``0.5 * (logp - ref_logp) ** 2``; low variance, never negative, but **not an estimate of
  the KL's value**: its expectation is ``E[(log r)^2] / 2``, which equals the KL only to second
  order, with or without truncation. It is a loss whose gradient on-policy is the KL's gradient.
  The envs therefore refuse it as their ``kl_estimator`` (:func:`check_env_estimator`);
* ``k3``: Schulman's ``(r - 1) - log r`` with ``r = exp(ref_logp - logp)``; unbiased, never negative.
  Under top-k/top-p the policy samples from a truncated distribution, so ``E[r] = Z``, the
  reference's mass on the tokens the policy kept, not 1, and the plain formula reads
  ``KL - (1 - Z)`` too low. Given the full distributions, :func:`kl_k3` adds ``1 - Z`` back
  (``r - Z - log r``, still never negative since ``Z <= 1``); the envs ask for them whenever the
  sampler truncates (:func:`truncates`);
* ``exact``: ``sum_v p(v) * (log p(v) - log q(v))`` over the vocabulary, from the full
  distributions ``[..., V]`` (the sampled tokens are not needed); float rounding below 0
  (down to ``-EXACT_ROUNDING``) reads 0, and the envs refuse anything more negative
  (:func:`check_exact_kl`: the distributions were not normalised).

``logprobs`` are the policy's log-probs of the sampled tokens under the distribution actually
sampled from (temperature, top-k, top-p; see :mod:`rlhf_envs.lm.sampling`). ``ref_logprobs`` come from
the reference logits with the **same temperature but no top-k/top-p truncation**, so they are
finite for every token and the KL is finite; tokens the policy's truncation removed have
``p = 0`` and contribute nothing to the exact KL. The KL estimated is therefore
``KL(pi_sampled || ref_T)``: the distribution actually sampled from against the reference at the
same temperature. ``k1``, ``k3`` (with the correction) and ``exact`` all have that expectation
under every temperature, top-k and top-p (``benchmarks/bench_reliability.py`` measures it).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = [
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "EXACT_ROUNDING",
    "KLController",
    "check_env_estimator",
    "check_exact_kl",
    "get_kl_estimator",
    "kl_exact",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "make_kl_controller",
    "truncates",
]

EXACT_ROUNDING = 1e-3
"""Most negative exact KL per position (nats) taken for float rounding and clamped to 0."""


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
          full_logprobs: torch.Tensor | None = None, full_ref_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """``logp - ref_logp`` per token."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
          full_logprobs: torch.Tensor | None = None, full_ref_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """``0.5 * (logp - ref_logp) ** 2`` per token."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
          full_logprobs: torch.Tensor | None = None, full_ref_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """``(r - 1) - log r`` with ``r = exp(ref_logp - logp)`` per token (Schulman's estimator).

    With the full distributions ``[..., V]`` it is ``(r - Z) - log r``, ``Z`` the reference's mass
    on the policy's support (finite ``full_logprobs``): unbiased when the policy samples from a
    truncated distribution too. Without them the policy is taken to have full support (``Z = 1``).
    """
    log_ratio = ref_logprobs - logprobs
    k3 = torch.expm1(log_ratio) - log_ratio
    if full_logprobs is None or full_ref_logprobs is None:
        return k3
    # 1 - Z summed over the removed tokens directly: exactly 0 without truncation, no cancellation
    removed_ref_mass = torch.where(torch.isinf(full_logprobs), full_ref_logprobs.exp(), 0.0).sum(-1)
    return k3 + removed_ref_mass


def kl_exact(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
             full_logprobs: torch.Tensor | None = None, full_ref_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_v p (log p - log q)`` per position from ``full_logprobs`` and ``full_ref_logprobs`` ``[..., V]``."""
    if full_logprobs is None or full_ref_logprobs is None:
        raise ValueError(
            "the 'exact' KL estimator needs the full log-distributions [..., V] of the policy and the reference; "
            "hand them over (full_logprobs=...) or pick kl_estimator='k1', 'k2' or 'k3'")
    p = full_logprobs.exp()
    terms = torch.where(p > 0, p * (full_logprobs - full_ref_logprobs), torch.zeros_like(p))
    kl = terms.sum(-1)
    # float rounding (about 1e-7 per position) becomes 0; anything more negative stays visible for check_exact_kl
    return torch.where(kl < 0, torch.where(kl >= -EXACT_ROUNDING, 0.0, kl), kl)


def check_exact_kl(kl: torch.Tensor) -> None:
    """Raise if an exact KL (``kl_exact``'s output, where it counts) is negative beyond float rounding."""
    if kl.numel() and kl.min() < -EXACT_ROUNDING:
        raise ValueError(
            f"the exact KL reads {kl.min().item():.4g} nats at a position, below 0 beyond float rounding: the "
            "log-distributions are not normalised (each must have logsumexp 0 over the vocabulary)")


KLEstimator = Callable[..., torch.Tensor]

KL_ESTIMATORS: dict[str, KLEstimator] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3, "exact": kl_exact}


def get_kl_estimator(name: str) -> KLEstimator:
    """The estimator called ``name`` (one of :data:`KL_ESTIMATORS`)."""
    try:
        return KL_ESTIMATORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown kl_estimator {name!r}; choose one of {sorted(KL_ESTIMATORS)}") from None


def check_env_estimator(name: str) -> KLEstimator:
    """:func:`get_kl_estimator` for an env's KL (the value penalised and reported): ``k2`` is refused."""
    if name == "k2":
        raise ValueError(
            "kl_estimator='k2' (0.5 * log-ratio ** 2) does not estimate the KL: its expectation is E[(log r)^2] / 2, "
            "equal to the KL only to second order, so the reward and the logged KL would be off by an unknown "
            "amount. It is a loss (its on-policy gradient is the KL's). Pick 'k1', 'k3' or 'exact'")
    return get_kl_estimator(name)


def truncates(sampling: Any, vocab_size: int) -> bool:
    """Whether ``sampling`` (a :class:`rlhf_envs.lm.sampling.SamplingConfig`) removes tokens: top-k below ``V``
    or top-p below 1. Then the sampled distribution's support is smaller than the reference's."""
    return (0 < sampling.top_k < vocab_size) or sampling.top_p < 1.0


class FixedKLController:
    """A constant KL coefficient ``kl_coef`` (``beta``)."""

    def __init__(self, kl_coef: float):
        if not kl_coef >= 0.0:
            raise ValueError(f"kl_coef (beta) must be >= 0, got {kl_coef!r}")
        self.kl_coef = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient stays fixed."""


class AdaptiveKLController:
    """Ziegler et al. (2019)'s proportional controller steering the observed KL toward ``target``.

    ``error = clip(kl / target - 1, -0.2, 0.2)`` and ``kl_coef *= 1 + error * n_steps / horizon``,
    where ``kl`` is the observed KL per sequence (nats) and ``n_steps`` the number of samples
    (episodes) it was measured over.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float = 10000.0):
        if not init_kl_coef > 0.0:
            raise ValueError(f"init_kl_coef must be > 0 for the adaptive controller, got {init_kl_coef!r}")
        if not target > 0.0:
            raise ValueError(f"target (KL in nats per sequence) must be > 0, got {target!r}")
        if not horizon > 0.0:
            raise ValueError(f"horizon must be > 0, got {horizon!r}; Ziegler et al. use 10000")
        self.kl_coef = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move ``kl_coef`` after observing mean KL ``current_kl`` over ``n_steps`` samples."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.kl_coef *= 1.0 + error * n_steps / self.horizon


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(beta: float, kl_setpoint: float | None = None, horizon: float = 10000.0) -> KLController:
    """``FixedKLController(beta)``, or ``AdaptiveKLController(beta, kl_setpoint, horizon)`` when ``kl_setpoint`` is
    set."""
    if kl_setpoint is None:
        return FixedKLController(beta)
    return AdaptiveKLController(beta, kl_setpoint, horizon)
