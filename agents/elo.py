"""Win rates and Elo ratings from head-to-head games judged by a reward (the gold reward by default).

A *game* is one prompt answered by two models; the judge's higher score wins, equal scores draw.
Elo ratings are the maximum-likelihood Bradley-Terry strengths of all games at once (as
Chatbot Arena computes them), on the Elo scale (400 points = 10:1 odds), centred on a mean of
1000. Unlike sequential Elo updates they do not depend on the order of the games.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

ELO_SCALE = 400.0 / math.log(10.0)


def game_scores(scores_a: np.ndarray, scores_b: np.ndarray) -> np.ndarray:
    """Per prompt: 1 if A's response scored higher, 0 if lower, 0.5 on a tie. Shapes ``[N]``."""
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"win rates need two equal-length 1-D score arrays, got shapes {a.shape} and {b.shape}")
    return np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))


def win_rate(scores_a: np.ndarray, scores_b: np.ndarray) -> float:
    """Fraction of prompts on which A beats B (ties count half)."""
    return float(game_scores(scores_a, scores_b).mean())


def elo_ratings(scores: dict[str, np.ndarray], iterations: int = 2000, mean: float = 1000.0) -> dict[str, float]:
    """Elo ratings of models from all head-to-head games on the same prompts.

    ``scores[name]`` holds the judge's score of that model's response to each prompt (``[N]``,
    same prompts in the same order for every model). Every pair of models plays one game per
    prompt. Returns ``{name: rating}``.
    """
    names = list(scores)
    if len(names) < 2:
        raise ValueError(f"Elo needs at least two models, got {names}")
    k = len(names)
    wins = np.zeros((k, k))  # wins[i, j]: points i scored against j
    for i, j in itertools.combinations(range(k), 2):
        g = game_scores(scores[names[i]], scores[names[j]])
        wins[i, j], wins[j, i] = g.sum(), (1.0 - g).sum()
    games = wins + wins.T
    # A half-game draw against every other model keeps ratings finite when one model wins every game.
    wins, games = wins + 0.25 * (1 - np.eye(k)), games + 0.5 * (1 - np.eye(k))
    strength = np.ones(k)
    for _ in range(iterations):  # the minorisation-maximisation updates for Bradley-Terry (Hunter 2004)
        denom = (games / (strength[:, None] + strength[None, :])).sum(axis=1)
        new = wins.sum(axis=1) / denom
        new /= np.exp(np.log(new).mean())
        if np.allclose(new, strength, rtol=1e-10, atol=0):
            strength = new
            break
        strength = new
    log_s = np.log(strength)
    ratings = mean + ELO_SCALE * (log_s - log_s.mean())
    return {name: float(r) for name, r in zip(names, ratings)}


def expected_score(rating_a: float, rating_b: float) -> float:
    """Elo's expected score of A against B."""
    return 1.0 / (1.0 + 10.0 ** ((rating_b - rating_a) / 400.0))
