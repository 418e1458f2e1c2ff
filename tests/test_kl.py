"""KL estimators and controllers."""

import math

import pytest
import torch

from rlhf_envs.kl import AdaptiveKLController, FixedKLController, get_kl_estimator, make_kl_controller
from tests.tiny_models import tiny_causal_lm


def test_estimator_values():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(get_kl_estimator("k1")(lp, ref), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(get_kl_estimator("k2")(lp, ref), torch.tensor([0.125, 0.5]))
    r = torch.exp(ref - lp)
    torch.testing.assert_close(get_kl_estimator("k3")(lp, ref), (r - 1) - torch.log(r))
    p = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))
    q = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    torch.testing.assert_close(get_kl_estimator("exact")(None, None, p, q), torch.tensor([math.log(2.0)]))


def test_zero_when_policy_is_reference():
    lp = torch.log_softmax(torch.randn(4, 7), -1)
    for name in ("k1", "k2", "k3"):
        assert (get_kl_estimator(name)(lp[:, 0], lp[:, 0]) == 0).all()
    assert (get_kl_estimator("exact")(None, None, lp, lp) == 0).all()


def test_unknown_estimator_and_missing_full():
    with pytest.raises(ValueError, match="k1"):
        get_kl_estimator("k4")
    with pytest.raises(ValueError, match="full"):
        get_kl_estimator("exact")(torch.zeros(1), torch.zeros(1))


def test_k1_k3_are_unbiased_for_exact_kl_on_a_small_model():
    policy, _ = tiny_causal_lm(seed=1)
    ref, _ = tiny_causal_lm(seed=2)
    ids = torch.tensor([[104, 101, 108, 108, 111]])
    with torch.no_grad():
        p = torch.log_softmax(policy(ids).logits[0, -1] * 3.0, -1)
        q = torch.log_softmax(ref(ids).logits[0, -1] * 3.0, -1)
    exact = get_kl_estimator("exact")(None, None, p, q).item()
    assert exact > 0.05
    samples = torch.multinomial(p.exp(), 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for name in ("k1", "k3"):
        values = get_kl_estimator(name)(p[samples], q[samples])
        stderr = values.std().item() / math.sqrt(len(values))
        assert abs(values.mean().item() - exact) < 4 * stderr + 1e-3, name
    assert (get_kl_estimator("k3")(p[samples], q[samples]) >= 0).all()


def test_adaptive_controller_follows_ziegler():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=256)
    assert ctl.kl_coef == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    ctl.update(current_kl=5.4, n_steps=100)
    assert ctl.kl_coef == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000) * (1 - 0.1 * 100 / 10000))
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 10)
    assert fixed.kl_coef == 0.05
    assert isinstance(make_kl_controller(0.05, kl_setpoint=3.0), AdaptiveKLController)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0)
