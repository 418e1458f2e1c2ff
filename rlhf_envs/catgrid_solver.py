"""Exact solution of a CatGrid map by value iteration over its known transition model.

Episodes are undiscounted and end at the time limit, so the optimum that every benchmark
reports against is the finite-horizon one: the largest expected *undiscounted* return within
``horizon`` steps from the start, ``V_H(start)``. ``gamma < 1`` is available for the
discounted problem as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rlhf_envs.catgrid import GridModel, check_slip

_STEP_COST = 1e-6


@dataclass(frozen=True)
class Solution:
    """The optimum of a map.

    Attributes:
        optimal_return: expected return of the optimal policy from the start (``values[start]``).
        values: ``[n_states]`` optimal expected return from each cell with ``horizon`` steps left.
        q_values: ``[n_states, 4]`` the same per first action.
        policy: ``[n_states]`` the greedy action per cell at ``horizon`` steps left.
        horizon: steps the values look ahead; gamma: the discount used.
    """

    optimal_return: float
    values: np.ndarray
    q_values: np.ndarray
    policy: np.ndarray
    horizon: int
    gamma: float


def transition_matrix(model: GridModel, slip: float) -> np.ndarray:
    """``P[s, a, s']``: probability that action ``a`` in cell ``s`` leads to cell ``s'``."""
    slip = check_slip(slip)
    n = model.n_states
    P = np.zeros((n, 4, n))
    for a in range(4):
        for actual in range(4):
            p = 1.0 - slip if actual == a else slip / 3.0
            if p > 0.0:
                np.add.at(P, (np.arange(n), a, model.next_state[:, actual]), p)
    return P


def _backup(model: GridModel, P: np.ndarray, v: np.ndarray, gamma: float) -> np.ndarray:
    """``Q[s, a] = sum_s' P[s,a,s'] * (r(s') + gamma * (1 - terminal(s')) * v(s'))``."""
    target = model.reward + gamma * np.where(model.terminal, 0.0, v)
    return P @ target


def _resolve(env_or_model, slip: float | None, horizon: int | None) -> tuple[GridModel, float, int]:
    if isinstance(env_or_model, GridModel):
        model = env_or_model
        if slip is None or horizon is None:
            raise ValueError("solving a GridModel needs slip= and horizon= (or pass the env itself)")
        return model, slip, horizon
    env = env_or_model.unwrapped
    spec = getattr(env_or_model, "spec", None) or env.spec
    if horizon is None:
        horizon = spec.max_episode_steps if spec is not None else None
    if horizon is None:
        raise ValueError("the env has no max_episode_steps: pass horizon= explicitly")
    return env.model, env.slip if slip is None else slip, horizon


def solve(env_or_model, slip: float | None = None, horizon: int | None = None, gamma: float = 1.0) -> Solution:
    """Value iteration for ``horizon`` steps (the env's ``max_episode_steps`` by default).

    ``env_or_model`` is a CatGrid env (wrapped or not) or a :class:`GridModel`.
    """
    model, slip, horizon = _resolve(env_or_model, slip, horizon)
    if not isinstance(horizon, (int, np.integer)) or horizon < 1:
        raise ValueError(f"horizon must be a positive integer number of steps, got {horizon!r}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
    P = transition_matrix(model, slip)
    v = np.zeros(model.n_states)
    v_fast = np.zeros(model.n_states)
    q = np.zeros((model.n_states, 4))
    for _ in range(int(horizon)):
        q = _backup(model, P, v, gamma)
        v = q.max(axis=1)
        v_fast = (_backup(model, P, v_fast, gamma) - _STEP_COST).max(axis=1)
    # Many policies tie for the optimum (any path to the meat within the horizon scores 100). The
    # policy returned solves the same problem with a tiny cost per step (at most _STEP_COST * horizon
    # in total), so among the optimal ones it takes the quickest, and it never dithers.
    policy = (_backup(model, P, v_fast, gamma) - _STEP_COST).argmax(axis=1)
    return Solution(float(v[model.start]), v, q, policy, int(horizon), gamma)


def policy_return(env_or_model, policy: np.ndarray, slip: float | None = None,
                  horizon: int | None = None, gamma: float = 1.0) -> float:
    """Exact expected return from the start of a stationary policy.

    ``policy`` is ``[n_states]`` actions (deterministic) or ``[n_states, 4]`` action
    probabilities (stochastic, e.g. a PPO agent's softmax).
    """
    model, slip, horizon = _resolve(env_or_model, slip, horizon)
    policy = np.asarray(policy)
    if policy.shape == (model.n_states,):
        probs = np.eye(4)[policy.astype(np.int64)]
    elif policy.shape == (model.n_states, 4):
        probs = policy.astype(np.float64)
        if (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-5):
            raise ValueError("a stochastic policy needs non-negative action probabilities summing to 1 per cell")
    else:
        raise ValueError(f"policy must be shape ({model.n_states},) actions or ({model.n_states}, 4) probabilities, "
                         f"got {policy.shape}")
    P = transition_matrix(model, slip)
    v = np.zeros(model.n_states)
    for _ in range(int(horizon)):
        v = (_backup(model, P, v, gamma) * probs).sum(axis=1)
    return float(v[model.start])
