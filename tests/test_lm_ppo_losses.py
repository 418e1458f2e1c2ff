"""RLHF PPO arithmetic against hand-computed values."""

import math

import pytest
import torch

from agents.lm_ppo_losses import gae, masked_mean, masked_whiten, policy_loss, token_rewards, value_loss

T = torch.tensor


def row(x: torch.Tensor) -> list[float]:
    return x[0].tolist()


def test_token_rewards_put_the_score_on_the_last_response_token():
    r = token_rewards(T([2.0]), T([[0.1, 0.2, 0.3]]), 0.5, T([[True, True, False]]))
    assert row(r) == pytest.approx([-0.05, -0.1 + 2.0, 0.0])


def test_gae_hand_computed():
    rewards, values, mask = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.5, 0.5]]), T([[True, True, True]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert row(adv) == pytest.approx([0.5, 0.5, 0.5]) and row(ret) == pytest.approx([1.0, 1.0, 1.0])
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert row(adv) == pytest.approx([0.125, 0.25, 0.5])
    # Masked tail: the episode ends after the second token, the third value is ignored.
    adv, ret = gae(T([[0.0, 1.0, 0.0]]), T([[0.5, 0.5, 0.9]]), T([[True, True, False]]), gamma=1.0, lam=0.5)
    assert row(adv) == pytest.approx([0.25, 0.5, 0.0]) and row(ret) == pytest.approx([0.75, 1.0, 0.0])


def test_masked_statistics():
    x, m = T([[1.0, 3.0, 100.0]]), T([[True, True, False]])
    assert masked_mean(x, m) == pytest.approx(2.0)
    assert row(masked_whiten(x, m)) == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0], abs=1e-6)


def test_policy_loss_clipping():
    mask = T([[True, True]])
    loss, stats = policy_loss(T([[-1.0, -2.0]]), T([[-1.0, -2.0]]), T([[1.0, -3.0]]), mask, clip=0.2)
    assert loss.item() == pytest.approx(-(1.0 - 3.0) / 2) and stats["approx_kl"].item() == pytest.approx(0.0)
    # ratio 2 with a positive advantage is clipped at 1.2; ratio 0.5 with a negative one at 0.8.
    loss, stats = policy_loss(T([[math.log(2.0), math.log(0.5)]]), T([[0.0, 0.0]]), T([[1.0, -1.0]]), mask, clip=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2) and stats["clipfrac"].item() == 1.0


def test_value_loss_clipping():
    loss, stats = value_loss(T([[1.0]]), T([[0.0]]), T([[1.0]]), T([[True]]), clip=0.2)
    # unclipped error 0, clipped prediction 0.2 has error 0.64: the max is taken.
    assert loss.item() == pytest.approx(0.5 * 0.64) and stats["clipfrac"].item() == 1.0
