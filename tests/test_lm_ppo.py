"""RLHF PPO on a tiny LM: the reward rises with bounded KL, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from agents.lm_ppo import LMPPOConfig, train_lm_ppo
from tests.tiny_models import tiny_causal_lm


def vowel_share(prompts, responses):
    """An easy task: the share of vowels in the response."""
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, save_tiny_lm):
    return str(save_tiny_lm(tmp_path_factory.mktemp("tiny")))


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
    assert (tmp_path / "policy" / "model.safetensors").is_file() and (
        tmp_path / "policy" / "value_head.safetensors"
    ).is_file()


@pytest.mark.parametrize("return_full_path", ["packed", "generic"])
def test_full_distributions_for_the_exact_estimator_match_the_chosen_log_probs(
    save_tiny_lm, tmp_path, return_full_path
):
    from agents.lm_policy import PolicyWithValueHead
    from rlhf_envs.lm.loading import load_causal_lm
    from rlhf_envs.lm.sampling import SamplingConfig

    model = PolicyWithValueHead(load_causal_lm(str(save_tiny_lm(tmp_path / "m")))[0])
    handle = model.lm.register_forward_pre_hook(lambda module, args: None) if return_full_path == "generic" else None
    g = torch.Generator().manual_seed(0)
    prompt_ids, prompt_mask = torch.randint(0, 256, (3, 4), generator=g), torch.ones(3, 4, dtype=torch.bool)
    response_ids, response_mask = torch.randint(0, 256, (3, 5), generator=g), torch.ones(3, 5, dtype=torch.bool)
    response_mask[1, 3:] = False
    with torch.no_grad():
        logprobs, _, _, full = model(
            prompt_ids,
            prompt_mask,
            response_ids,
            response_mask,
            SamplingConfig(max_new_tokens=5, temperature=0.7, top_k=20),
            return_full=True,
        )
    if handle is not None:
        handle.remove()
    picked = full.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(picked[response_mask], logprobs[response_mask])
    assert (full[~response_mask] == 0).all()
    sums = full[response_mask].exp().sum(-1)  # top-k 20: a distribution over 20 tokens
    torch.testing.assert_close(sums, torch.ones_like(sums))


def test_exact_kl_estimator_trains_and_starts_at_zero(tiny_dir, tmp_path):
    result = train_lm_ppo(_config(tiny_dir, tmp_path, total_episodes=32 * 3, kl_estimator="exact"))
    kls = [row["objective/kl"] for row in result.history]
    assert kls[0] == pytest.approx(0.0, abs=1e-5) and all(np.isfinite(kls)) and min(kls) >= -1e-5, kls


def test_adaptive_beta_moves_toward_the_target(tiny_dir, tmp_path):
    result = train_lm_ppo(_config(tiny_dir, tmp_path, total_episodes=32 * 4, kl_setpoint=1e-3, beta=0.1))
    betas = [row["objective/kl_coef"] for row in result.history]
    assert betas[-1] > betas[0]  # observed KL above a tiny target: beta grows


def test_resumed_run_equals_uninterrupted_run(tiny_dir, tmp_path):
    full = train_lm_ppo(_config(tiny_dir, tmp_path / "full", total_episodes=16 * 3, batch_size=16, save_every=1))
    train_lm_ppo(_config(tiny_dir, tmp_path / "cut", total_episodes=16 * 2, batch_size=16, save_every=1))
    resumed = train_lm_ppo(
        _config(tiny_dir, tmp_path / "cut", total_episodes=16 * 3, batch_size=16, save_every=1, resume=True)
    )
    a = load_file(str(tmp_path / "full" / "policy" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "policy" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.history[-1] == {
        **resumed.history[-1],
        **{k: v for k, v in full.history[-1].items() if k.startswith("time/")},
    }
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 30, "num_minibatches": 4}, "not divisible"),
        ({"beta": -0.1}, "beta must be >= 0"),
        ({"top_p": 1.5}, "top_p"),
        ({"reward_model": "learned"}, "reward_model_path"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LMPPOConfig(**kwargs)


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=5, top_p=0.9)])
def test_packed_policy_forward_equals_hugging_face(sampling):
    """The packed lean forward gives the padded Hugging Face forward's log-probs, values, entropies and gradients."""
    from agents.lm_policy import PolicyWithValueHead
    from rlhf_envs.lm.sampling import SamplingConfig

    lm, _ = tiny_causal_lm(seed=3)
    for module in lm.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model = PolicyWithValueHead(lm.train())
    from rlhf_envs.lm.gpt2 import gpt2_view

    assert gpt2_view(model.lm) is not None, "the first run must take the packed path"
    torch.nn.init.normal_(model.v_head.summary.weight)
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(0, 256, (4, 6), generator=g)
    prompt_mask = torch.ones(4, 6, dtype=torch.bool)
    prompt_mask[0, :3] = prompt_mask[2, :1] = False  # left padding
    response_ids = torch.randint(0, 256, (4, 5), generator=g)
    response_mask = torch.ones(4, 5, dtype=torch.bool)
    response_mask[1, 2:] = response_mask[3, 4:] = False  # ended early
    cfg = SamplingConfig(max_new_tokens=5, **sampling)

    def run():
        model.zero_grad()
        outs = model(prompt_ids, prompt_mask, response_ids, response_mask, cfg)
        sum(o.sum() for o in outs).backward()
        return [o.detach() for o in outs], {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    packed, packed_grads = run()
    handle = model.lm.register_forward_pre_hook(lambda module, args: None)  # a hook: the generic path
    try:
        generic, generic_grads = run()
    finally:
        handle.remove()
    for a, b in zip(packed, generic):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert packed_grads.keys() == generic_grads.keys()
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], generic_grads[name], atol=1e-5, rtol=1e-3, msg=name)


def test_k3_under_top_k_hands_over_full_distributions_and_trains(tiny_dir, tmp_path):
    """k3 with top-k needs the kept set: the trainer hands the full distributions over; the KL is then >= 0 and
    positive from the start (the truncated policy is not the full-support reference)."""
    result = train_lm_ppo(_config(tiny_dir, tmp_path, total_episodes=32 * 2, kl_estimator="k3", top_k=20))
    kls = [row["objective/kl"] for row in result.history]
    assert all(np.isfinite(kls)) and kls[0] > 0.05, kls
