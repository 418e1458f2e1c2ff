"""The exact text-bandit solver and TextBanditExact-v0: brute force, identities, the env's KL, learning."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlhf_envs  # noqa: F401  (registers the envs)
from rlhf_envs.text_bandit import TextBanditEnv, score_responses
from rlhf_envs.text_bandit_exact import (
    MAX_NEW_TOKENS,
    PROMPTS,
    REFERENCE_DIR,
    TextBanditExactEnv,
    learned_reward_model,
    make_symbol_tokenizer,
    target,
    true_score,
)
from rlhf_envs.text_solver import (
    enumerate_env,
    frontier,
    objective,
    sequence_logprobs,
    solve,
    token_logprobs,
)


def _tiny_lm(vocab_size: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def exact_env():
    return TextBanditExactEnv(beta=0.5)


@pytest.fixture(scope="module")
def enum(exact_env):
    return enumerate_env(exact_env)


def _perturbed_policy(scale: float = 0.3, seed: int = 1):
    from rlhf_envs.lm import load_causal_lm

    model = load_causal_lm(REFERENCE_DIR)[0]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model


def test_solver_matches_brute_force_on_two_symbols_two_tokens():
    tokenizer = make_symbol_tokenizer("ab")  # a=0, b=1, EOS=2
    model = _tiny_lm(3, seed=3)

    def reward(prompts, responses):
        return np.array([r.count("a") - 0.3 * len(r) + (p == "b") * 0.5 for p, r in zip(prompts, responses)],
                        dtype=np.float32)

    prompts, beta = ["a", "ba"], 0.7
    env = TextBanditEnv(model=(model, tokenizer), reward_model=reward, prompts=prompts, max_new_tokens=2)
    enum = enumerate_env(env)
    assert sorted(enum.texts) == sorted(["", "a", "b", "aa", "ab", "ba", "bb"])
    sol = solve(enum, beta)

    def next_probs(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        return torch.softmax(logits, -1).double().numpy()

    values = []
    for x, prompt in enumerate(prompts):
        ids = tokenizer(prompt)["input_ids"]
        probs = {}
        for response in ["", "a", "b", "aa", "ab", "ba", "bb"]:
            p, seen = 1.0, list(ids)
            for token in tokenizer(response)["input_ids"]:
                p *= next_probs(seen)[token]
                seen.append(token)
            if len(response) < 2:
                p *= next_probs(seen)[2]  # the EOS that ends a short response
            probs[response] = p
        assert math.isclose(sum(probs.values()), 1.0, rel_tol=1e-6)
        r = {y: float(reward([prompt], [y])[0]) for y in probs}
        z = sum(probs[y] * math.exp(r[y] / beta) for y in probs)
        values.append(beta * math.log(z))
        for y, p in probs.items():
            m = enum.texts.index(y)
            assert math.isclose(math.exp(enum.ref_logprobs[x, m]), p, rel_tol=1e-5)
            assert math.isclose(sol.pi_star[x, m], p * math.exp(r[y] / beta) / z, rel_tol=1e-5)
    assert math.isclose(sol.optimal_value, float(np.mean(values)), rel_tol=1e-6)


def test_optimum_scores_its_own_value_and_reference_has_zero_kl(exact_env, enum):
    from rlhf_envs.lm import load_causal_lm

    for beta in (0.3, 1.0):
        sol = solve(enum, beta)
        best = objective(enum, sol.pi_star, beta)
        assert best.value == pytest.approx(sol.optimal_value, abs=1e-9)
        assert best.kl_to_optimum == pytest.approx(0.0, abs=1e-9)
        assert best.gain_closed == pytest.approx(1.0, abs=1e-9)
        assert sol.optimal_value > sol.reference_value
    ref = objective(enum, load_causal_lm(REFERENCE_DIR)[0], 0.5)
    assert ref.kl_ref == pytest.approx(0.0, abs=1e-5)
    assert ref.gain_closed == pytest.approx(0.0, abs=1e-4)
    assert ref.probability_mass == pytest.approx(1.0, abs=1e-5)
    rows = frontier(enum, [0.3, 0.5, 1.0])
    assert [r["kl"] for r in rows] == sorted((r["kl"] for r in rows), reverse=True)  # less KL as beta grows


def test_kl_to_optimum_is_the_value_gap_over_beta(enum):
    policy = _perturbed_policy()
    for beta in (0.3, 1.0):
        obj = objective(enum, policy, beta)
        assert obj.kl_to_optimum == pytest.approx((obj.optimal_value - obj.value) / beta, rel=1e-5, abs=1e-6)
        assert obj.kl_ref > 0.05 and obj.probability_mass == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("estimator", ["exact", "k1"])
def test_env_kl_estimator_averages_to_the_enumerated_kl(enum, estimator):
    """Scoring every response through the env's own step code, weighted by pi(y), gives KL(pi || pi_ref)."""
    env = TextBanditExactEnv(kl_estimator=estimator)
    task = env.unwrapped.task
    policy = _perturbed_policy()
    x = 1
    full = token_logprobs(policy, enum.prompt_ids[x], enum.tokens, task.sampling)
    logp = full.gather(-1, enum.tokens.unsqueeze(-1)).squeeze(-1).masked_fill(~enum.mask, 0.0)
    handed = (logp, full if estimator == "exact" else None)
    _, info = score_responses(task, np.full(len(enum.texts), x), enum.tokens.numpy(), handed)
    weights = sequence_logprobs(full, enum.tokens, enum.mask).exp().numpy()
    seq_logp = np.log(weights)
    enumerated = float((weights * (seq_logp - enum.ref_logprobs[x])).sum())
    assert float((weights * info["kl"]).sum()) == pytest.approx(enumerated, rel=1e-4)
    assert list(info["response"]) == enum.texts


def test_env_passes_checkers_and_vector_form():
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make("TextBanditExact-v0")
    with pytest.warns(RuntimeWarning, match="no policy log-probs"):
        check_env(env.unwrapped, skip_render_check=True)
    with pytest.warns(RuntimeWarning, match="no policy log-probs"):
        sb3_check_env(TextBanditExactEnv(), warn=True)
    obs, info = env.reset(seed=0, options={"prompt_index": 2})
    assert info["prompt"] == "fed" and obs.shape == (3,)
    envs = gym.make_vec("TextBanditExact-v0", num_envs=4, beta=1.0)
    obs, _ = envs.reset(seed=0)
    envs.unwrapped.set_policy_logprobs(np.full((4, MAX_NEW_TOKENS), -1.0, dtype=np.float32))
    tokens = np.array([[1, 2, 3, 6, 6]] * 4)
    _, _, terminated, _, info = envs.step(tokens)
    assert terminated.all() and list(info["response"]) == ["bcd"] * 4
    assert set(info) >= {"score", "kl", "kl_per_token", "logprobs", "ref_logprobs", "beta", "prompt", "response"}


def test_true_and_learned_rewards():
    assert [target(p) for p in PROMPTS] == ["bcd", "afe", "def", "cba"]
    assert true_score(["a", "a", "a"], ["bcd", "", "bcdaa"]).tolist() == [3.0, -1.5, 2.0]
    rm = learned_reward_model()
    assert rm.accuracy > 0.8  # agreement with the true rule on fresh reference pairs
    env = TextBanditExactEnv(reward="learned")
    score = env.unwrapped.task.score([0, 0], ["bcd", ""])
    assert score[0] > score[1]


def test_a_few_ppo_iterations_close_part_of_the_gain(tmp_path, enum):
    from agents.lm_ppo import LMPPOConfig, train_lm_ppo
    from rlhf_envs.lm import load_causal_lm

    beta = 1.0
    config = LMPPOConfig(model_path=str(REFERENCE_DIR), reward_model=true_score, prompts=PROMPTS,
                         max_new_tokens=MAX_NEW_TOKENS, beta=beta, output_dir=str(tmp_path), total_episodes=256 * 12,
                         batch_size=256, learning_rate=2e-3, seed=0, progress=False, torch_threads=1)
    train_lm_ppo(config)
    trained = objective(enum, load_causal_lm(tmp_path / "policy")[0], beta)
    assert trained.gain_closed > 0.5, trained


def test_estimator_moments_k1_k3_exact_unbiased_k2_biased(exact_env):
    from rlhf_envs.text_solver import estimator_moments

    moments = estimator_moments(exact_env, _perturbed_policy(0.2))
    kl = moments["true_kl"]["mean"]
    assert kl > 0.1
    for name in ("k1", "k3", "exact"):
        assert moments[name]["bias"] == pytest.approx(0.0, abs=1e-4 * kl)
    assert moments["k2"]["bias"] > 0.01 and moments["exact"]["std"] < moments["k1"]["std"]
