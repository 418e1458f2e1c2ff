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


def _truncated(logits: torch.Tensor, **sampling) -> torch.Tensor:
    from rlhf_envs.lm.sampling import SamplingConfig, processed_logprobs

    return processed_logprobs(logits, SamplingConfig(**sampling))


SETTINGS = [{"temperature": 0.9, "top_p": 0.95}, {"top_k": 5}, {"top_p": 0.5}, {"temperature": 1.3, "top_k": 50,
                                                                                "top_p": 0.9},
            {"temperature": 0.7}]


@pytest.mark.parametrize("sampling", SETTINGS, ids=[str(s) for s in SETTINGS])
def test_k1_and_corrected_k3_have_the_exact_kl_as_expectation_under_truncation(sampling):
    """Summed over the truncated distribution q itself (no sampling noise): E_q[k1] = E_q[k3] = exact KL(q || p)."""
    g = torch.Generator().manual_seed(0)
    policy_logits, ref_logits = torch.randn(6, 258, generator=g) * 2, torch.randn(6, 258, generator=g) * 2
    q = _truncated(policy_logits, **sampling)
    p = _truncated(ref_logits, temperature=sampling.get("temperature",
                                                        1.0))  # the reference: same temperature, full support
    exact = get_kl_estimator("exact")(None, None, q, p)
    kept = torch.isfinite(q)
    tokens = torch.arange(258).expand(6, -1)
    lp, ref = q.gather(-1, tokens), p.gather(-1, tokens)
    full_q, full_p = q[:, None, :].expand(-1, 258, -1), p[:, None, :].expand(-1, 258, -1)
    weights = q.exp()
    for name in ("k1", "k3"):
        per_token = get_kl_estimator(name)(lp, ref, full_q, full_p).masked_fill(~kept, 0.0)
        torch.testing.assert_close((weights * per_token).sum(-1), exact, atol=1e-5, rtol=1e-4)
    plain_k3 = (weights * get_kl_estimator("k3")(lp, ref).masked_fill(~kept, 0.0)).sum(-1)
    if "top_k" in sampling or "top_p" in sampling:  # without the correction k3 reads KL - (1 - Z): too low
        assert (plain_k3 < exact - 1e-3).all()
        assert (get_kl_estimator("k3")(lp, ref, full_q, full_p)[kept] >= 0).all()  # r - Z - log r >= 1 - Z >= 0


def test_k3_correction_is_zero_without_truncation():
    lp = torch.log_softmax(torch.randn(3, 11), -1)
    ref = torch.log_softmax(torch.randn(3, 11), -1)
    tokens = torch.tensor([[1], [4], [7]])
    picked, ref_picked = lp.gather(-1, tokens).squeeze(-1), ref.gather(-1, tokens).squeeze(-1)
    k3 = get_kl_estimator("k3")
    assert torch.equal(k3(picked, ref_picked, lp, ref), k3(picked, ref_picked))


def test_exact_kl_rounding_reads_zero_and_more_is_refused():
    from rlhf_envs.kl import check_exact_kl

    lp = torch.log_softmax(torch.randn(64, 1000, dtype=torch.float32) * 3, -1)
    assert (get_kl_estimator("exact")(None, None, lp, lp) == 0).all()
    near = torch.log_softmax(lp + 1e-4 * torch.randn_like(lp), -1)
    assert (get_kl_estimator("exact")(None, None, lp, near) >= 0).all()
    not_normalised = get_kl_estimator("exact")(None, None, lp, lp + 1.0)  # the "reference" has mass e
    with pytest.raises(ValueError, match="below 0 beyond float rounding: the log-distributions are not normalised"):
        check_exact_kl(not_normalised)


def test_k2_is_refused_as_an_env_estimator_but_stays_a_function():
    from rlhf_envs.kl import check_env_estimator

    with pytest.raises(ValueError, match=r"kl_estimator='k2' .* does not estimate the KL"):
        check_env_estimator("k2")
    assert check_env_estimator("k3") is get_kl_estimator("k3")


def test_bandit_k3_under_top_k_uses_the_kept_mass(one_thread):
    """TextBandit with k3 and top-k: per token, k3 with the policy's full vectors is r - Z - log r."""
    import gymnasium as gym
    import numpy as np

    from rlhf_envs.lm.sampling import generate, positions_from_mask, response_logprobs
    from rlhf_envs.text_common import attention_mask_from_obs

    lm, tok = tiny_causal_lm(seed=0)
    envs = gym.make_vec("TextBandit-v0", num_envs=8, model=(lm, tok), prompts=["hello", "the cat"], max_new_tokens=5,
                        kl_estimator="k3", top_k=20, reward_model=lambda p, r: [0.0] * len(r))
    task = envs.unwrapped.task
    assert task.needs_full_logprobs
    obs, _ = envs.reset(seed=0)
    ids = torch.as_tensor(obs)
    mask = attention_mask_from_obs(ids, task.pad_token_id)
    gen = generate(lm, ids, mask, task.sampling, eos_token_id=task.eos_token_id, pad_token_id=task.pad_token_id,
                   generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp, full = response_logprobs(lm, ids, mask, gen.response_ids, gen.response_mask, task.sampling,
                                     return_full=True)
    n, width = gen.response_ids.shape
    actions = np.full((8, 5), task.pad_token_id)
    actions[:, :width] = gen.response_ids.numpy()
    handed, handed_full = np.zeros((8, 5), np.float32), np.zeros((8, 5, 258), np.float32)
    handed[:, :width] = lp.numpy()
    handed_full[:, :width] = full.masked_fill(~gen.response_mask[..., None], 0.0).numpy()
    with pytest.raises(ValueError, match="k3 needs the reference's mass on the tokens the policy kept"):
        envs.set_policy_logprobs(handed)
    envs.set_policy_logprobs(handed, handed_full)
    _, _, _, _, info = envs.step(actions)
    m = gen.response_mask.numpy()
    both = torch.cat([mask, gen.response_mask], 1)
    with torch.no_grad():
        logits = lm(torch.cat([ids, gen.response_ids], 1), attention_mask=both.long(),
                    position_ids=positions_from_mask(both)).logits
    ref_full = torch.log_softmax(logits[:, ids.shape[1] - 1:-1], -1)
    z = torch.where(torch.isfinite(full), ref_full.exp(), 0.0).sum(-1).numpy()
    log_r = info["ref_logprobs"][:, :width] - info["logprobs"][:, :width]
    expected = (np.exp(log_r) - z - log_r) * m
    assert (z[m] < 1 - 1e-3).all()  # top-20 of 258 tokens leaves reference mass outside
    np.testing.assert_allclose(info["kl_per_token"][:, :width], expected, atol=2e-4)
