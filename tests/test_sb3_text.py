"""SB3 PPO trains an LM policy on TextToken-v0 through the log-prob hand-over."""

import copy
import warnings

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

import rlhf_envs  # noqa: F401
from agents.sb3_text import HandOverLogprobs, LMActorCriticPolicy, LogprobChannel, sb3_text_ppo
from tests.tiny_models import tiny_causal_lm


def lowercase_fraction(prompts, responses):
    """Pays for lowercase ASCII letters: the fraction of response characters in a..z."""
    return [sum("a" <= c <= "z" for c in r) / max(len(r), 1) for r in responses]


def _setup(seed=0, n_envs=4, max_new_tokens=3):
    ref, tokenizer = tiny_causal_lm(seed=0)
    env_kwargs = dict(model=(ref, tokenizer), prompts=["ab", "cd", "hi"], max_new_tokens=max_new_tokens,
                      reward_model=lowercase_fraction, beta=0.01, render_mode=None)
    channel = LogprobChannel()
    venv = HandOverLogprobs(make_vec_env("TextToken-v0", n_envs=n_envs, seed=seed, env_kwargs=env_kwargs), channel)
    sampling = venv.get_attr("task")[0].sampling
    policy_kwargs = dict(lm=copy.deepcopy(ref).train(), pad_token_id=tokenizer.pad_token_id, sampling=sampling,
                         channel=channel)
    return venv, policy_kwargs


def _mean_score(model, venv, episodes=64):
    scores, kls = [], []
    obs = venv.reset()
    while len(scores) < episodes:
        actions, _ = model.predict(obs, deterministic=False)
        obs, _, dones, infos = venv.step(actions)
        for done, info in zip(dones, infos):
            if done:
                scores.append(info["score"])
                kls.append(info["kl"])
    return float(np.mean(scores)), float(np.mean(kls))


def test_handover_gives_zero_kl_for_the_untrained_copy():
    venv, policy_kwargs = _setup()
    model = PPO(LMActorCriticPolicy, venv, policy_kwargs=policy_kwargs, n_steps=8, batch_size=32, seed=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _, kl = _mean_score(model, venv, episodes=8)
    assert abs(kl) < 1e-5


@pytest.mark.slow
def test_sb3_ppo_learns_on_text_token():
    torch.manual_seed(0)
    venv, policy_kwargs = _setup(max_new_tokens=1)
    model = PPO(LMActorCriticPolicy, venv, policy_kwargs=policy_kwargs, n_steps=64, batch_size=64, n_epochs=4,
                learning_rate=3e-3, gamma=1.0, gae_lambda=1.0, ent_coef=0.0, seed=0, device="cpu")
    before, _ = _mean_score(model, venv, episodes=96)
    model.learn(total_timesteps=2048)
    after, kl = _mean_score(model, venv, episodes=96)
    assert before < 0.2
    assert after > before + 0.25, (before, after)
    assert kl > 0


def test_a_frozen_lm_is_refused_at_construction():
    venv, policy_kwargs = _setup()
    frozen = venv.get_attr("task")[0].ref_model  # the env's own frozen reference
    with pytest.raises(ValueError, match=r"requires_grad=False .* would train only the value head"):
        PPO(LMActorCriticPolicy, venv, policy_kwargs={**policy_kwargs, "lm": copy.deepcopy(frozen)}, device="cpu")


def test_sb3_text_ppo_refuses_a_whole_response_env():
    ref, tokenizer = tiny_causal_lm(seed=0)
    with pytest.raises(ValueError, match="needs a token-level env"):
        sb3_text_ppo("TextBandit-v0", (ref, tokenizer), n_envs=1, env_kwargs={"prompts": ["ab"], "max_new_tokens": 2})


@pytest.mark.slow
def test_sb3_text_ppo_trains_the_lm_and_raises_the_score(one_thread):
    torch.manual_seed(0)
    ref, tokenizer = tiny_causal_lm(seed=0)
    model = sb3_text_ppo("TextToken-v0", (ref, tokenizer), n_envs=4,
                         env_kwargs={"prompts": ["ab", "cd", "hi"], "max_new_tokens": 1,
                                     "reward_model": lowercase_fraction,
                                     "beta": 0.01},
                         n_steps=64, batch_size=64, n_epochs=4, learning_rate=3e-3, gamma=1.0, gae_lambda=1.0,
                         ent_coef=0.0)
    venv = model.get_env()
    before_weights = {k: v.clone() for k, v in model.policy.lm.state_dict().items()}
    before, _ = _mean_score(model, venv, episodes=96)
    model.learn(total_timesteps=1024)
    after, kl = _mean_score(model, venv, episodes=96)
    moved = [k for k, v in model.policy.lm.state_dict().items() if not torch.equal(v, before_weights[k])]
    assert len(moved) >= len(before_weights) // 2, f"{len(moved)} of {len(before_weights)} LM tensors changed"
    assert after > before + 0.2, (before, after)
    assert kl > 0
