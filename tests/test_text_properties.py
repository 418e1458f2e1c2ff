"""Property-based tests of the text envs: Hypothesis drives random prompts, seeds, settings and action
sequences through TextBandit and TextToken, single and natively batched, on a tiny GPT-2.

For every example: no crash; rewards are exactly ``score - beta * kl`` (TextBandit) or ``-beta * kl_t``
plus the score on the last step (TextToken); the VADER score lies in its documented [-1, 1];
k3 and exact KL estimates are >= 0; log-probs are <= 0; ``terminated``/``truncated`` follow the
documented episode ends; and a second run with the same seed gives the same trajectory.
"""

from __future__ import annotations

import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlhf_envs  # noqa: F401
from rlhf_envs.rewards import make_reward_model
from tests.tiny_models import tiny_causal_lm

EOS, V = 256, 258
LM = tiny_causal_lm(seed=0)
SENTIMENT = make_reward_model("sentiment")  # built once: VADER's lexicon takes a while to load
SETTINGS = settings(max_examples=25, deadline=None)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


prompts_st = st.lists(st.text(alphabet="abcdefghij klmnop!?.", min_size=1, max_size=12), min_size=1, max_size=4)
tokens_st = st.one_of(st.integers(0, V - 1), st.just(EOS))  # EOS often enough to end episodes early


@st.composite
def env_kwargs_st(draw) -> dict:
    """Prompts, response length, KL estimator, fixed or adaptive beta (whose start must then be > 0), temperature."""
    kl_setpoint = draw(st.one_of(st.none(), st.floats(0.1, 5.0)))
    return {
        "prompts": draw(prompts_st),
        "max_new_tokens": draw(st.integers(1, 6)),
        "kl_estimator": draw(st.sampled_from(["k1", "k3", "exact"])),
        "beta": draw(st.floats(0.0 if kl_setpoint is None else 0.01, 1.0)),
        "kl_setpoint": kl_setpoint,
        "temperature": draw(st.floats(0.5, 2.0)),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.shape == b.shape and a.tolist() == b.tolist()
    return a == b


def _policy(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A random full log-distribution ``[..., V]`` (float32, finite, rows sum to 1 in probability)."""
    logits = torch.as_tensor(rng.normal(0.0, 2.0, shape + (V,)), dtype=torch.float32)
    return torch.log_softmax(logits, dim=-1).numpy()


def _make(env_id: str, kwargs: dict, num_envs: int | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if num_envs is None:
            return gym.make(env_id, model=LM, reward_model=SENTIMENT, **kwargs)
        return gym.make_vec(env_id, num_envs=num_envs, model=LM, reward_model=SENTIMENT, **kwargs)


def _check_kl(kl: np.ndarray, estimator: str) -> None:
    assert np.isfinite(kl).all()
    if estimator != "k1":  # k3 and the exact KL are never negative; k1 (the log-ratio) may be
        assert (kl >= -1e-5).all(), kl


def _bandit_actions(rng: np.random.Generator, shape: tuple[int, ...], eos_at: np.ndarray) -> np.ndarray:
    """Random token ids with EOS at ``eos_at`` (beyond the end: no EOS, the response fills T)."""
    tokens = rng.integers(0, V, shape)
    tokens[tokens == EOS] = 0
    for index in np.ndindex(shape[:-1]):
        if eos_at[index] < shape[-1]:
            tokens[index + (int(eos_at[index]),)] = EOS
    return tokens


def _bandit_run(kwargs: dict, seed: int, steps: int, hand_over: bool, num_envs: int | None) -> list:
    env = _make("TextBandit-v0", kwargs, num_envs)
    T, exact = kwargs["max_new_tokens"], kwargs["kl_estimator"] == "exact"
    batch = () if num_envs is None else (num_envs,)
    rng = np.random.default_rng(seed)
    trace = [env.reset(seed=seed)]
    unwrapped = env.unwrapped if num_envs is None else env
    for _ in range(steps):
        actions = _bandit_actions(rng, batch + (T,), rng.integers(0, T + 1, batch))
        if hand_over:
            full = _policy(rng, batch + (T,))
            picked = np.take_along_axis(full, actions[..., None], -1)[..., 0]
            unwrapped.set_policy_logprobs(picked, full if exact else None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            obs, reward, terminated, truncated, info = env.step(actions)
        trace.append((obs, reward, terminated, truncated, info))
        reward, terminated, truncated = np.atleast_1d(reward), np.atleast_1d(terminated), np.atleast_1d(truncated)
        assert terminated.all() and not truncated.any()                  # one step, always terminated
        score, kl, beta = (np.atleast_1d(info[k]) for k in ("score", "kl", "beta"))
        assert ((score >= -1.0) & (score <= 1.0)).all()                   # VADER compound
        np.testing.assert_allclose(reward, score - beta * kl, rtol=1e-5, atol=1e-5)
        _check_kl(np.atleast_2d(info["kl_per_token"]), kwargs["kl_estimator"])
        per_token, logprobs = np.atleast_2d(info["kl_per_token"]), np.atleast_2d(info["logprobs"])
        ref = np.atleast_2d(info["ref_logprobs"])
        after_eos = np.cumsum(np.atleast_2d(actions) == EOS, -1) - (np.atleast_2d(actions) == EOS) > 0
        assert (per_token[after_eos] == 0).all() and (ref[after_eos] == 0).all()  # nothing counts after EOS
        assert (logprobs <= 1e-6).all() and (ref <= 1e-6).all() and np.isfinite(ref).all()
        np.testing.assert_allclose(per_token.sum(-1), kl, rtol=1e-5, atol=1e-5)
        if num_envs is None:
            trace.append(env.reset())
    return trace


@SETTINGS
@given(kwargs=env_kwargs_st(), seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 3), hand_over=st.booleans())
def test_textbandit_random_play(kwargs, seed, steps, hand_over):
    assert _same(_bandit_run(kwargs, seed, steps, hand_over, None), _bandit_run(kwargs, seed, steps, hand_over, None))


@SETTINGS
@given(kwargs=env_kwargs_st(), seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 3), hand_over=st.booleans(),
       num_envs=st.integers(1, 5))
def test_textbandit_vector_random_play(kwargs, seed, steps, hand_over, num_envs):
    first = _bandit_run(kwargs, seed, steps, hand_over, num_envs)
    assert _same(first, _bandit_run(kwargs, seed, steps, hand_over, num_envs))


def _token_run(kwargs: dict, seed: int, actions: list[int], hand_over: bool) -> list:
    env = _make("TextToken-v0", kwargs)
    T = kwargs["max_new_tokens"]
    rng = np.random.default_rng(seed)
    trace = [env.reset(seed=seed)]
    length = 0
    for action in actions:
        if hand_over:
            env.unwrapped.set_policy_logprobs(_policy(rng, ()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            obs, reward, terminated, truncated, info = env.step(action)
        trace.append((obs, reward, terminated, truncated, info))
        length += 1
        assert obs[-1] == action and not truncated
        assert terminated == (action == EOS or length == T)                # ends at EOS or max_new_tokens
        kl_t = float(info["kl_per_token"][length - 1])
        _check_kl(info["kl_per_token"][:length], kwargs["kl_estimator"])
        assert (info["kl_per_token"][length:] == 0).all()
        assert np.isclose(info["kl"], info["kl_per_token"].sum(), rtol=1e-5, atol=1e-5)
        assert info["logprobs"][length - 1] <= 1e-6 and info["ref_logprobs"][length - 1] <= 1e-6
        expected = -float(info["beta"]) * kl_t
        if terminated:
            assert -1.0 <= info["score"] <= 1.0                            # VADER compound, last step only
            expected += info["score"]
            trace.append(env.reset())
            length = 0
        else:
            assert "score" not in info
        assert np.isclose(reward, expected, rtol=1e-5, atol=1e-5)
    return trace


@SETTINGS
@given(kwargs=env_kwargs_st(), seed=st.integers(0, 2**31 - 1), actions=st.lists(tokens_st, min_size=1, max_size=14),
       hand_over=st.booleans())
def test_texttoken_random_play(kwargs, seed, actions, hand_over):
    assert _same(_token_run(kwargs, seed, actions, hand_over), _token_run(kwargs, seed, actions, hand_over))


def _token_vector_run(kwargs: dict, seed: int, num_envs: int, steps: int, hand_over: bool) -> list:
    envs = _make("TextToken-v0", kwargs, num_envs)
    task = envs.unwrapped.task
    T = kwargs["max_new_tokens"]
    rng = np.random.default_rng(seed)
    trace = [envs.reset(seed=seed)]
    length = np.zeros(num_envs, dtype=int)
    for _ in range(steps):
        actions = np.where(rng.random(num_envs) < 0.25, EOS, rng.integers(0, V, num_envs))
        if hand_over:
            envs.set_policy_logprobs(_policy(rng, (num_envs,)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            obs, reward, terminated, truncated, info = envs.step(actions)
        trace.append((obs, reward, terminated, truncated, info))
        length += 1
        done = (actions == EOS) | (length == T)
        assert (terminated == done).all() and not truncated.any()
        kl_t = info["kl_per_token"][np.arange(num_envs), length - 1]
        _check_kl(kl_t, kwargs["kl_estimator"])
        expected = -info["beta"] * kl_t
        if done.any():
            assert (info["_score"] == done).all() and (info["_final_obs"] == done).all()
            assert (info["final_obs"][done, -1] == actions[done]).all()
            score = info["score"][done]
            assert ((score >= -1.0) & (score <= 1.0)).all()
            expected[done] += score
            fresh = {tuple(row) for row in task.prompt_obs}                # autoreset: a new prompt, no response yet
            assert (obs[done, :T] == task.pad_token_id).all() and all(tuple(row) in fresh for row in obs[done, T:])
        else:
            assert "score" not in info
        np.testing.assert_allclose(reward, expected, rtol=1e-5, atol=1e-5)
        assert (obs[~done, -1] == actions[~done]).all()
        length[done] = 0
    return trace


@SETTINGS
@given(kwargs=env_kwargs_st(), seed=st.integers(0, 2**31 - 1), num_envs=st.integers(1, 4), steps=st.integers(1, 10),
       hand_over=st.booleans())
def test_texttoken_vector_random_play(kwargs, seed, num_envs, steps, hand_over):
    first = _token_vector_run(kwargs, seed, num_envs, steps, hand_over)
    assert _same(first, _token_vector_run(kwargs, seed, num_envs, steps, hand_over))
