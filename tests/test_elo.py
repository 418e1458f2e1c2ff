"""Win rates and Elo ratings."""

import numpy as np
import pytest

from agents.elo import elo_ratings, expected_score, game_scores, win_rate


def test_win_rate_counts_ties_half():
    assert game_scores(np.array([1.0, 0.0, 0.5]), np.array([0.0, 1.0, 0.5])).tolist() == [1.0, 0.0, 0.5]
    assert win_rate([0.9, 0.2, 0.5, 0.7], [0.1, 0.3, 0.5, 0.6]) == pytest.approx(2.5 / 4)


def test_elo_recovers_known_strengths():
    # Three models whose scores come from Bradley-Terry strengths 1000 / 1100 / 1300 Elo:
    # the fitted ratings reproduce the gaps within sampling error.
    rng = np.random.default_rng(0)
    true = {"a": 1000.0, "b": 1100.0, "c": 1300.0}
    n = 20_000
    # A latent Gumbel per (model, prompt) makes pairwise win probabilities exactly logistic in
    # the strength difference (the Bradley-Terry model).
    scores = {m: r / (400 / np.log(10)) + rng.gumbel(size=n) for m, r in true.items()}
    ratings = elo_ratings(scores)
    assert ratings["b"] - ratings["a"] == pytest.approx(100, abs=15)
    assert ratings["c"] - ratings["a"] == pytest.approx(300, abs=15)
    assert np.mean(list(ratings.values())) == pytest.approx(1000.0)


def test_elo_matches_the_win_rate_of_two_models():
    a = np.array([1.0] * 75 + [0.0] * 25)
    b = np.full(100, 0.5)
    ratings = elo_ratings({"a": a, "b": b})
    # With the half-game prior, the fitted expected score is (75 + 0.25) / (100 + 0.5).
    assert expected_score(ratings["a"], ratings["b"]) == pytest.approx(75.25 / 100.5, abs=1e-6)


def test_elo_is_finite_when_one_model_always_wins():
    ratings = elo_ratings({"a": np.ones(50), "b": np.zeros(50)})
    assert all(np.isfinite(list(ratings.values()))) and ratings["a"] > ratings["b"]


def test_elo_bad_input():
    with pytest.raises(ValueError, match="at least two models"):
        elo_ratings({"a": np.ones(3)})
    with pytest.raises(ValueError, match="equal-length"):
        win_rate(np.ones(3), np.ones(4))
