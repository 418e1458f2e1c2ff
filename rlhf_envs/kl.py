"""Per-token KL estimators and the KL coefficient (``beta``) controllers.

Every estimator has the signature ``f(logprobs, ref_logprobs, full_logprobs=None,
full_ref_logprobs=None) -> Tensor`` and returns a per-token estimate of
``KL(policy || ref_model)`` in nats, shaped like ``logprobs``:

* ``k1``: the log-ratio ``logp - ref_logp``; unbiased, high variance, can be negative per token;
* ``k2``: ``0.5 * (logp - ref_logp) ** 2``; biased, low variance, never negative;
* ``k3``: Schulman's ``(r - 1) - log r`` with ``r = exp(ref_logp - logp)``; unbiased, never negative;
* ``exact``: ``sum_v p(v) * (log p(v) - log q(v))`` over the vocabulary, from the full
  distributions ``[..., V]`` (the sampled tokens are not needed).

``logprobs`` are the policy's log-probs of the sampled tokens under the distribution actually
sampled from (temperature, top-k, top-p; see :mod:`rlhf_envs.lm.sampling`). ``ref_logprobs`` come from
the reference logits with the **same temperature but no top-k/top-p truncation**, so they are
finite for every token and the KL is finite; tokens the policy's truncation removed have
``p = 0`` and contribute nothing to the exact KL.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = [
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "get_kl_estimator",
    "kl_exact",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "make_kl_controller",
]


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
    """``(r - 1) - log r`` with ``r = exp(ref_logp - logp)`` per token (Schulman's estimator)."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def kl_exact(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
             full_logprobs: torch.Tensor | None = None, full_ref_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_v p (log p - log q)`` per position from ``full_logprobs`` and ``full_ref_logprobs`` ``[..., V]``."""
    if full_logprobs is None or full_ref_logprobs is None:
        raise ValueError(
            "the 'exact' KL estimator needs the full log-distributions [..., V] of the policy and the reference; "
            "hand them over (full_logprobs=...) or pick kl_estimator='k1', 'k2' or 'k3'")
    p = full_logprobs.exp()
    terms = torch.where(p > 0, p * (full_logprobs - full_ref_logprobs), torch.zeros_like(p))
    return terms.sum(-1)


KLEstimator = Callable[..., torch.Tensor]

KL_ESTIMATORS: dict[str, KLEstimator] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3, "exact": kl_exact}


def get_kl_estimator(name: str) -> KLEstimator:
    """The estimator called ``name`` (one of :data:`KL_ESTIMATORS`)."""
    try:
        return KL_ESTIMATORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown kl_estimator {name!r}; choose one of {sorted(KL_ESTIMATORS)}") from None


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
    """``FixedKLController(beta)``, or ``AdaptiveKLController(beta, kl_setpoint, horizon)`` when ``kl_setpoint`` is set."""
    if kl_setpoint is None:
        return FixedKLController(beta)
    return AdaptiveKLController(beta, kl_setpoint, horizon)
