"""RLHF PPO on a tiny LM: the reward rises with bounded KL, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from agents.lm_ppo import LMPPOConfig, train_lm_ppo
from rlhf_envs.text_common import tiny_causal_lm


def vowel_share(prompts, responses):
    """An easy task: the share of vowels in the response."""
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model, tokenizer = tiny_causal_lm(seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _config(tiny_dir, out, **kw):
    base = dict(model_path=tiny_dir, reward_model=vowel_share, prompts=["hello", "the cat", "once upon"],
                output_dir=str(out), batch_size=32, max_new_tokens=8, learning_rate=3e-3, beta=0.01, progress=False)
    base.update(kw)
    return LMPPOConfig(**base)


def test_ppo_raises_the_score_with_bounded_kl(tiny_dir, tmp_path):
    result = train_lm_ppo(_config(tiny_dir, tmp_path, total_episodes=32 * 12))
    scores = [row["objective/scores"] for row in result.history]
    kls = [row["objective/kl"] for row in result.history]
    assert result.history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    assert np.mean(scores[-3:]) > 3 * np.mean(scores[:3]), scores
    assert max(kls) < 15.0, kls
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12 and "objective/kl_coef" in json.loads(lines[0])
    assert (tmp_path / "policy" / "model.safetensors").is_file() and (tmp_path / "policy" / "value_head.safetensors").is_file()


def test_adaptive_beta_moves_toward_the_target(tiny_dir, tmp_path):
    result = train_lm_ppo(_config(tiny_dir, tmp_path, total_episodes=32 * 4, target_kl=1e-3, beta=0.1))
    betas = [row["objective/kl_coef"] for row in result.history]
    assert betas[-1] > betas[0]  # observed KL above a tiny target: beta grows


def test_resumed_run_equals_uninterrupted_run(tiny_dir, tmp_path):
    full = train_lm_ppo(_config(tiny_dir, tmp_path / "full", total_episodes=16 * 3, batch_size=16, save_every=1))
    train_lm_ppo(_config(tiny_dir, tmp_path / "cut", total_episodes=16 * 2, batch_size=16, save_every=1))
    resumed = train_lm_ppo(_config(tiny_dir, tmp_path / "cut", total_episodes=16 * 3, batch_size=16, save_every=1, resume=True))
    a = load_file(str(tmp_path / "full" / "policy" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "policy" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.history[-1] == {**resumed.history[-1], **{k: v for k, v in full.history[-1].items() if k.startswith("time/")}}
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 30, "num_minibatches": 4}, "not divisible"),
    ({"beta": -0.1}, "beta must be >= 0"),
    ({"top_p": 1.5}, "top_p"),
    ({"reward_model": "learned"}, "reward_model_path"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LMPPOConfig(**kwargs)
