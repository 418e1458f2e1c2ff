"""The exact KL-regularised optimum of a text bandit whose responses can be enumerated.

The text counterpart of :mod:`rlhf_envs.catgrid_solver`. For a prompt ``x`` the objective

    J(pi) = E_{y ~ pi}[r(x, y)] - beta * KL(pi(.|x) || pi_ref(.|x))

is maximised by ``pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x)`` with value ``J* = beta log Z(x)``,
and for any policy ``KL(pi || pi*) = (J* - J(pi)) / beta``. Figures are means over the env's prompts
(the env draws them uniformly).

A response is what :class:`rlhf_envs.text_bandit.TextBanditEnv` scores: up to ``max_new_tokens``
tokens ending at the first EOS, or ``max_new_tokens`` tokens without one. Over an alphabet of ``A``
non-EOS tokens there are ``sum_{k<T} A^k + A^T`` of them, each of which is teacher-forced through the
reference (and, in :func:`objective`, the policy) in batches: every probability here is exact, none sampled.

    from rlhf_envs.text_solver import enumerate_env, solve, objective, frontier
    enum = enumerate_env(env)                  # sequences, reference log-probs and rewards, once
    sol = solve(enum, beta=0.5)                # pi* [prompts, M] and J*
    obj = objective(enum, policy_lm, beta=0.5) # exact E[r], KL(pi||pi_ref), J, KL(pi||pi*), gain closed
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlhf_envs.kl import KL_ESTIMATORS
from rlhf_envs.lm.sampling import SamplingConfig, processed_logprobs

__all__ = [
    "Enumeration",
    "PolicyObjective",
    "TextSolution",
    "enumerate_env",
    "enumerate_responses",
    "estimator_moments",
    "frontier",
    "objective",
    "sequence_logprobs",
    "solve",
    "token_logprobs",
]

MAX_SEQUENCES = 200_000
"""Most responses per prompt :func:`enumerate_env` accepts (beyond it, teacher-forcing them all is slow)."""


def enumerate_responses(alphabet: Sequence[int], eos_token_id: int, max_new_tokens: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every response of up to ``max_new_tokens`` tokens: ``(tokens [M, T] int64, mask [M, T] bool)``.

    Rows are ordered by length: ``k`` symbols then EOS for ``k = 0 .. T-1``, then ``T`` symbols without
    EOS. ``mask`` is True up to and including the EOS (all True without one); tokens after it are EOS.
    """
    T = max_new_tokens
    rows = []
    for k in range(T + 1):
        for prefix in itertools.product(alphabet, repeat=k):
            rows.append(list(prefix) + [eos_token_id] * (T - k))
    tokens = torch.tensor(rows, dtype=torch.long)
    is_eos = (tokens == eos_token_id).long()
    mask = (is_eos.cumsum(-1) - is_eos) == 0
    return tokens, mask


@torch.no_grad()
def token_logprobs(model: Any, prompt_ids: Sequence[int], tokens: torch.Tensor, sampling: SamplingConfig,
                   batch_size: int = 4096) -> torch.Tensor:
    """Full next-token log-distributions ``[M, T, V]`` (float32) at each response position, teacher-forced.

    One prompt for all ``M`` rows, so no padding is needed: the rows are ``prompt + tokens`` with
    positions from 0, as the env's left-padded observations see them. ``sampling`` turns logits into the
    distribution sampled from (temperature, top-k, top-p), as in the env.
    """
    device = next(model.parameters()).device
    prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=device)
    P, T = len(prompt), tokens.shape[1]
    out = []
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start:start + batch_size].to(device)
        ids = torch.cat([prompt.expand(len(chunk), P), chunk[:, :-1]], dim=1)
        positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions,
                       use_cache=False).logits[:, P - 1:P - 1 + T]
        out.append(processed_logprobs(logits.float(), sampling).cpu())
    return torch.cat(out)


def sequence_logprobs(full: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[M]`` float64 log-probability of each response from :func:`token_logprobs`' ``full [M, T, V]``."""
    picked = full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).double()
    return picked.masked_fill(~mask, 0.0).sum(-1)


@dataclass
class Enumeration:
    """Every response of an env, with its reference log-probability and reward, per prompt.

    Shapes: ``X`` prompts, ``M`` responses, ``T`` tokens. Arrays are float64.
    """

    prompts: list[str]
    prompt_ids: list[list[int]]
    tokens: torch.Tensor
    """``[M, T]`` response token ids (EOS after the response)."""
    mask: torch.Tensor
    """``[M, T]`` True up to and including the EOS."""
    texts: list[str]
    ref_logprobs: np.ndarray
    """``[X, M]`` log pi_ref(y|x)."""
    rewards: np.ndarray
    """``[X, M]`` r(x, y): the env's score (its reward model)."""
    sampling: SamplingConfig
    """the policy's sampling config (the env's), used when a policy LM is evaluated."""


def _task(env: Any) -> Any:
    task = getattr(getattr(env, "unwrapped", env), "task", None)
    if task is None or not hasattr(task, "ref_model"):
        raise TypeError(f"expected a TextBandit-style env (with .unwrapped.task), got {type(env).__name__}")
    return task


@torch.no_grad()
def enumerate_env(env: Any, batch_size: int = 4096, max_sequences: int = MAX_SEQUENCES) -> Enumeration:
    """Teacher-force every response of ``env`` (a TextBandit-style env, single or vector) through its reference.

    The alphabet is every token id but EOS. Raises ``ValueError`` when a prompt would have more than
    ``max_sequences`` responses (vocabulary ``V`` and ``max_new_tokens`` too large to enumerate).
    """
    if isinstance(env, Enumeration):
        return env
    task = _task(env)
    alphabet = [t for t in range(task.vocab_size) if t != task.eos_token_id]
    T = task.max_new_tokens
    count = sum(len(alphabet) ** k for k in range(T)) + len(alphabet) ** T
    if count > max_sequences:
        raise ValueError(
            f"{count} responses per prompt (vocabulary {task.vocab_size}, max_new_tokens={T}) is more than "
            f"max_sequences={max_sequences}: use a smaller vocabulary or shorter responses (TextBanditExact-v0)")
    tokens, mask = enumerate_responses(alphabet, task.eos_token_id, T)
    texts = task.decode(tokens, mask)
    prompt_ids = [task.prompt_ids[i][task.prompt_mask[i]].tolist() for i in range(len(task.prompts))]
    ref, rewards = [], []
    for i, ids in enumerate(prompt_ids):
        full = token_logprobs(task.ref_model, ids, tokens, task.ref_sampling, batch_size)
        ref.append(sequence_logprobs(full, tokens, mask).numpy())
        rewards.append(np.asarray(task.score([i] * len(texts), texts), dtype=np.float64))
    return Enumeration(list(task.prompts), prompt_ids, tokens, mask, texts, np.stack(ref), np.stack(rewards),
                       task.sampling)


@dataclass
class TextSolution:
    """The optimum at one ``beta``. ``X`` prompts, ``M`` responses (the order of :class:`Enumeration`)."""

    beta: float
    pi_star: np.ndarray
    """``[X, M]`` probabilities of pi*."""
    log_z: np.ndarray
    """``[X]`` log Z(x) = log sum_y pi_ref(y|x) exp(r(x, y) / beta)."""
    optimal_value: float
    """J*: mean over prompts of beta * log Z(x)."""
    expected_reward: float
    """E_{pi*}[r], mean over prompts."""
    kl_ref: float
    """KL(pi* || pi_ref) in nats, mean over prompts."""
    reference_value: float
    """J(pi_ref) = E_{pi_ref}[r] (its KL is 0), mean over prompts."""


def solve(env: Any, beta: float) -> TextSolution:
    """pi* and J* of ``env`` (an env or its :class:`Enumeration`) at KL coefficient ``beta`` > 0."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}; at beta = 0 the optimum is the argmax of the reward")
    enum = enumerate_env(env)
    logits = enum.ref_logprobs + enum.rewards / beta
    log_z = np.logaddexp.reduce(logits, axis=1)
    log_star = logits - log_z[:, None]
    pi_star = np.exp(log_star)
    reward = (pi_star * enum.rewards).sum(1)
    kl = (pi_star * (log_star - enum.ref_logprobs)).sum(1)
    reference = (np.exp(enum.ref_logprobs) * enum.rewards).sum(1)
    return TextSolution(beta, pi_star, log_z, float(np.mean(beta * log_z)), float(reward.mean()), float(kl.mean()),
                        float(reference.mean()))


@dataclass
class PolicyObjective:
    """Exact figures of one policy at one ``beta``, means over prompts (nats for KLs)."""

    beta: float
    expected_reward: float
    kl_ref: float
    """KL(pi || pi_ref)."""
    value: float
    """J(pi) = E[r] - beta * KL(pi || pi_ref)."""
    optimal_value: float
    """J* = beta * log Z."""
    kl_to_optimum: float
    """KL(pi || pi*), computed directly; equals (J* - J) / beta."""
    gain_closed: float
    """(J - J(pi_ref)) / (J* - J(pi_ref)): 0 for the reference, 1 for pi*."""
    probability_mass: float
    """the policy's total probability over the enumerated responses (1 up to float rounding)."""


def policy_logprobs(env: Any, policy: Any, batch_size: int = 4096) -> np.ndarray:
    """``[X, M]`` log pi(y|x) of every enumerated response under a causal LM ``policy``
    (or the log of a ``[X, M]`` probability array)."""
    enum = enumerate_env(env)
    if isinstance(policy, torch.nn.Module):
        rows = []
        for ids in enum.prompt_ids:
            full = token_logprobs(policy, ids, enum.tokens, enum.sampling, batch_size)
            rows.append(sequence_logprobs(full, enum.tokens, enum.mask).numpy())
        return np.stack(rows)
    probs = np.asarray(policy, dtype=np.float64)
    if probs.shape != enum.ref_logprobs.shape:
        raise ValueError(f"a tabular policy must be probabilities of shape {enum.ref_logprobs.shape} [prompts, "
                         f"responses], got {probs.shape}; or pass a causal LM")
    with np.errstate(divide="ignore"):
        return np.log(probs)


def objective(env: Any, policy: Any, beta: float, batch_size: int = 4096) -> PolicyObjective:
    """Exact ``E[r]``, ``KL(pi || pi_ref)``, ``J``, ``J*``, ``KL(pi || pi*)`` and gain closed of ``policy``.

    ``policy``: a causal LM with the env's vocabulary (e.g. a PPO-trained GPT-2; its tokens are drawn
    with the env's sampling config) or a ``[X, M]`` array of probabilities over the enumerated responses.
    """
    enum = enumerate_env(env)
    sol = solve(enum, beta)
    logp = policy_logprobs(enum, policy, batch_size)
    p = np.exp(logp)
    safe = np.where(p > 0, logp, 0.0)
    reward = (p * enum.rewards).sum(1).mean()
    kl_ref = (p * (safe - enum.ref_logprobs)).sum(1).mean()
    log_star = enum.ref_logprobs + enum.rewards / beta - sol.log_z[:, None]
    kl_star = (p * (safe - log_star)).sum(1).mean()
    value = reward - beta * kl_ref
    gain = sol.optimal_value - sol.reference_value
    return PolicyObjective(beta, float(reward), float(kl_ref), float(value), sol.optimal_value, float(kl_star),
                           float((value - sol.reference_value) / gain) if gain > 0 else float("nan"),
                           float(p.sum(1).mean()))


def frontier(env: Any, betas: Sequence[float]) -> list[dict[str, float]]:
    """The exact reward-KL curve: for each ``beta``, pi*'s ``reward`` E[r], ``kl`` KL(pi* || pi_ref) and ``value``
    J*."""
    enum = enumerate_env(env)
    rows = []
    for beta in betas:
        sol = solve(enum, beta)
        rows.append({"beta": float(beta), "reward": sol.expected_reward, "kl": sol.kl_ref, "value": sol.optimal_value})
    return rows


def estimator_moments(env: Any, policy: Any, batch_size: int = 4096) -> dict[str, dict[str, float]]:
    """Bias and spread of each per-token KL estimator summed over a response, exactly, for ``policy`` (a causal LM).

    For ``y ~ pi`` the env's KL of a response is ``sum_t k(t)``; this returns, per estimator (``k1``,
    ``k2``, ``k3``, ``exact``), its mean, its bias against the true ``KL(pi || pi_ref)`` and its standard
    deviation over responses, all computed by enumeration (weights pi(y)), means over prompts.
    """
    if isinstance(env, Enumeration):
        raise TypeError("estimator_moments needs the env (for its reference model), not an Enumeration")
    task, enum = _task(env), enumerate_env(env)
    stats: dict[str, list[tuple[float, float]]] = {name: [] for name in KL_ESTIMATORS}
    true_kl = []
    for ids in enum.prompt_ids:
        full = token_logprobs(policy, ids, enum.tokens, enum.sampling, batch_size)
        ref_full = token_logprobs(task.ref_model, ids, enum.tokens, task.ref_sampling, batch_size)
        lp = full.gather(-1, enum.tokens.unsqueeze(-1)).squeeze(-1)
        ref_lp = ref_full.gather(-1, enum.tokens.unsqueeze(-1)).squeeze(-1)
        seq_logp = sequence_logprobs(full, enum.tokens, enum.mask)
        weights = seq_logp.exp()
        true_kl.append(float((weights * (seq_logp - sequence_logprobs(ref_full, enum.tokens, enum.mask))).sum()))
        for name, estimator in KL_ESTIMATORS.items():
            per_token = estimator(lp, ref_lp, full, ref_full).masked_fill(~enum.mask, 0.0)
            per_seq = torch.nan_to_num(per_token).double().sum(-1)
            mean = float((weights * per_seq).sum())
            std = float((weights * (per_seq - mean) ** 2).sum().sqrt())
            stats[name].append((mean, std))
    kl = float(np.mean(true_kl))
    out = {"true_kl": {"mean": kl, "bias": 0.0, "std": 0.0}}
    for name, rows in stats.items():
        mean = float(np.mean([m for m, _ in rows]))
        out[name] = {"mean": mean, "bias": mean - kl, "std": float(np.mean([s for _, s in rows]))}
    return out
