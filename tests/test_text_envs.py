"""TextBandit and TextToken: checkers, the KL hand-over, rewards, seeds and bad input."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.error import InvalidAction
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import rlhf_envs  # noqa: F401
from rlhf_envs.lm.sampling import generate, positions_from_mask, processed_logprobs
from rlhf_envs.rewards import RewardModelError
from rlhf_envs.text_common import attention_mask_from_obs
from tests.tiny_models import tiny_causal_lm

EOS, PAD = 256, 257
PROMPTS = ["hello there", "the cat sat", "a b"]


@pytest.fixture(scope="module")
def lm():
    return tiny_causal_lm(seed=0)


def count_a(prompts, responses):
    return [float(r.count("a")) for r in responses]


def _bandit(lm, **kw):
    kw = {"prompts": PROMPTS, "max_new_tokens": 6, "reward_model": count_a, **kw}
    return gym.make("TextBandit-v0", model=lm, **kw)


@pytest.mark.parametrize("env_id", ["TextBandit-v0", "TextToken-v0"])
def test_env_checkers(lm, env_id):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        env = gym.make(env_id, model=lm, prompts=PROMPTS, max_new_tokens=4)
        check_env(env.unwrapped, skip_render_check=True)
        sb3_check_env(env.unwrapped)


def _ref_sample(lm, envs, obs, seed):
    """Sample responses with the reference model itself, at the env's temperature, untruncated."""
    model, _ = lm
    ids = torch.as_tensor(obs)
    gen = generate(model, ids, attention_mask_from_obs(ids, PAD), envs.task.ref_sampling, eos_token_id=EOS,
                   pad_token_id=PAD, generator=torch.Generator().manual_seed(seed))
    actions = np.full((len(obs), envs.task.max_new_tokens), PAD)
    logprobs = np.zeros(actions.shape, dtype=np.float32)
    actions[:, : gen.response_ids.shape[1]] = gen.response_ids.numpy()
    logprobs[:, : gen.logprobs.shape[1]] = gen.logprobs.numpy()
    return actions, logprobs


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_bandit_kl_zero_for_reference_logprobs_and_reward_formula(lm, estimator):
    envs = gym.make_vec("TextBandit-v0", num_envs=8, model=lm, prompts=PROMPTS, max_new_tokens=6,
                        reward_model=count_a, kl_estimator=estimator, temperature=0.7, beta=0.1)
    obs, _ = envs.reset(seed=0)
    actions, logprobs = _ref_sample(lm, envs, obs, seed=0)
    envs.set_policy_logprobs(logprobs)
    _, rewards, terminated, _, info = envs.step(actions)
    assert terminated.all()
    np.testing.assert_allclose(info["kl"], 0.0, atol=1e-5)
    np.testing.assert_allclose(info["logprobs"], info["ref_logprobs"], atol=1e-5)
    np.testing.assert_allclose(rewards, info["score"] - 0.1 * info["kl"], atol=1e-6)
    assert list(info["score"]) == [float(r.count("a")) for r in info["response"]]
    envs.set_policy_logprobs(logprobs - 0.5 * (logprobs != 0))
    _, _, _, _, info = envs.step(actions)
    assert (info["kl"] != 0).any()


@pytest.mark.parametrize("lean", [True, False], ids=["lean-forward", "hf-forward"])
def test_token_env_kl_zero_when_policy_is_reference(lm, lean):
    model, _ = lm
    envs = gym.make_vec("TextToken-v0", num_envs=3, model=lm, prompts=PROMPTS, max_new_tokens=5,
                        reward_model=count_a, kl_estimator="exact", temperature=0.8)
    if not lean:  # a no-op hook makes the reference ineligible for the lean forward: Hugging Face's runs
        envs.task.ref_model.register_forward_pre_hook(lambda module, args: None)
    assert (envs.task.reference_view() is not None) == lean
    obs, _ = envs.reset(seed=0)
    finished = 0
    for step in range(30):
        ids = torch.as_tensor(obs)
        mask = attention_mask_from_obs(ids, PAD)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask.long(),
                           position_ids=positions_from_mask(mask)).logits[:, -1]
        logprobs = processed_logprobs(logits, envs.task.ref_sampling)
        actions = torch.multinomial(logprobs.exp(), 1, generator=torch.Generator().manual_seed(step)).squeeze(-1)
        envs.set_policy_logprobs(logprobs)
        obs, rewards, terminated, _, info = envs.step(actions.numpy())
        assert np.abs(info["kl"]).max() < 1e-5
        finished += terminated.sum()
        if terminated.any():
            np.testing.assert_allclose(rewards[terminated], info["score"][terminated], atol=1e-5)
            np.testing.assert_array_equal(info["_score"], terminated)
    assert finished >= 15, "episodes ended and auto-reset, exercising the KV-cache bookkeeping"


def test_bandit_uniform_assumption_warns_once(lm):
    env = _bandit(lm).unwrapped
    env.reset(seed=0)
    with pytest.warns(RuntimeWarning, match="uniform"):
        _, _, _, _, info = env.step(np.array([97, 98, EOS, PAD, PAD, PAD]))
    np.testing.assert_allclose(info["logprobs"][:3], -np.log(258), rtol=1e-6)
    assert (info["logprobs"][3:] == 0).all() and info["response"] == "ab"
    env.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env.step(np.array([97, EOS, PAD, PAD, PAD, PAD]))


def test_bandit_empty_response_and_tokens_after_eos_ignored(lm):
    env = _bandit(lm, beta=1.0).unwrapped
    env.reset(seed=0)
    env.set_policy_logprobs(np.array([-1.0, 0, 0, 0, 0, 0], dtype=np.float32))
    _, reward, _, _, info = env.step(np.array([EOS, 97, 97, 97, 97, 97]))
    assert info["response"] == "" and info["score"] == 0.0
    assert info["kl_per_token"][0] != 0 and (info["kl_per_token"][1:] == 0).all()
    assert reward == pytest.approx(-info["kl"])


def test_same_seed_same_responses_and_rewards(lm):
    def run():
        envs = gym.make_vec("TextBandit-v0", num_envs=4, model=lm, prompts=PROMPTS, max_new_tokens=6,
                            reward_model="sentiment", top_k=20)
        obs, _ = envs.reset(seed=7)
        out = []
        for step in range(2):
            actions, logprobs = _ref_sample(lm, envs, obs, seed=step)
            envs.set_policy_logprobs(logprobs)
            obs, rewards, _, _, info = envs.step(actions)
            out.append((list(info["prompt"]), list(info["response"]), rewards.tolist()))
        return out

    assert run() == run()


def test_vector_env_makes_one_reward_call_and_matches_single_env(lm):
    calls = []

    def counting(prompts, responses):
        calls.append(len(responses))
        return count_a(prompts, responses)

    envs = gym.make_vec("TextBandit-v0", num_envs=5, model=lm, prompts=PROMPTS, max_new_tokens=6, reward_model=counting)
    obs, _ = envs.reset(seed=0)
    actions, logprobs = _ref_sample(lm, envs, obs, seed=0)
    envs.set_policy_logprobs(logprobs - 0.1 * (logprobs != 0))
    _, rewards, _, _, info = envs.step(actions)
    assert calls == [5]
    single = _bandit(lm, reward_model=count_a).unwrapped
    for i in range(5):
        single.reset(options={"prompt_index": PROMPTS.index(info["prompt"][i])})
        single.set_policy_logprobs(logprobs[i] - 0.1 * (logprobs[i] != 0))
        _, reward, _, _, one = single.step(actions[i])
        assert reward == pytest.approx(rewards[i], abs=1e-5) and one["response"] == info["response"][i]


def test_adaptive_beta_moves_toward_target(lm):
    envs = gym.make_vec("TextBandit-v0", num_envs=4, model=lm, prompts=PROMPTS, max_new_tokens=6,
                        reward_model=count_a, beta=0.1, kl_setpoint=0.01)
    obs, _ = envs.reset(seed=0)
    actions, logprobs = _ref_sample(lm, envs, obs, seed=0)
    envs.set_policy_logprobs(np.where(logprobs != 0, logprobs + 1.0, 0.0).clip(max=0).astype(np.float32))
    _, _, _, _, info = envs.step(actions)
    assert info["beta"][0] == pytest.approx(0.1) and envs.task.beta > 0.1


@pytest.mark.parametrize("action, match", [
    (np.array([97, 98, 300, 0, 0, 0]), "out of range"),
    (np.array([97, -1, 0, 0, 0, 0]), "out of range"),
    (np.array([97, 98]), "shape"),
    (np.zeros(0, dtype=np.int64), "shape"),
    (np.full(6, 97.0), "integer"),
])
def test_bandit_bad_actions_are_clear_errors_and_env_stays_usable(lm, action, match):
    env = _bandit(lm).unwrapped
    env.reset(seed=0)
    with pytest.raises(InvalidAction, match=match):
        env.step(action)
    env.set_policy_logprobs(np.full(6, -1.0, dtype=np.float32))
    _, _, terminated, _, _ = env.step(np.array([97, 97, 97, 97, 97, 97]))
    assert terminated


def test_bad_setup_and_handover_errors(lm):
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        _bandit(lm, prompts=["x" * 40], max_prompt_tokens=10)
    with pytest.raises(ValueError, match="context"):
        _bandit(lm, prompts=["x" * 60], max_new_tokens=10)
    with pytest.raises(ValueError, match=r"unknown reward model 'nope'.*sentiment"):
        _bandit(lm, reward_model="nope")
    env = _bandit(lm).unwrapped
    with pytest.raises(ValueError, match="shape"):
        env.set_policy_logprobs(np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match="float"):
        env.set_policy_logprobs(np.zeros(6, dtype=np.int64))
    exact = _bandit(lm, kl_estimator="exact").unwrapped
    with pytest.raises(ValueError, match="full_logprobs"):
        exact.set_policy_logprobs(np.zeros(6, dtype=np.float32))
    token = gym.make("TextToken-v0", model=lm, prompts=PROMPTS, max_new_tokens=4).unwrapped
    token.reset(seed=0)
    with pytest.raises(ValueError, match="log-distribution"):
        token.set_policy_logprobs(np.zeros(258, dtype=np.float32))
    with pytest.raises(InvalidAction, match="out of range"):
        token.step(258)


@pytest.mark.parametrize("bad", [lambda p, r: 1 / 0, lambda p, r: [float("nan")] * len(r), lambda p,
                                 r: [0.0] * (len(r) + 1)])
def test_failing_reward_plugin_names_it_and_env_stays_usable(lm, bad):
    state = {"fail": True}

    def flaky(prompts, responses):
        return bad(prompts, responses) if state["fail"] else [1.0] * len(responses)

    env = _bandit(lm, reward_model=flaky).unwrapped
    env.reset(seed=0)
    env.set_policy_logprobs(np.full(6, -1.0, dtype=np.float32))
    with pytest.raises(RewardModelError, match="'flaky'"):
        env.step(np.array([97] * 6))
    assert env.task.beta == 0.05
    state["fail"] = False
    _, reward, _, _, info = env.step(np.array([97] * 6))
    assert info["score"] == 1.0

    token = gym.make("TextToken-v0", model=lm, prompts=PROMPTS, max_new_tokens=2, reward_model=flaky).unwrapped
    state["fail"] = True
    token.reset(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        token.step(97)
        with pytest.raises(RewardModelError, match="'flaky'"):
            token.step(97)
        state["fail"] = False
        token.reset(seed=0)
        token.step(97)
        assert token.step(97)[4]["score"] == 1.0


def test_token_env_episode_ends_at_eos_or_length(lm):
    env = gym.make("TextToken-v0", model=lm, prompts=["hi"], max_new_tokens=3, reward_model=count_a, beta=0.0).unwrapped
    obs, _ = env.reset(seed=0)
    assert obs.shape == (5,) and list(obs[-2:]) == [104, 105] and (obs[:3] == PAD).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        obs, r, term, _, info = env.step(97)
        assert not term and r == 0.0 and list(obs[-3:]) == [104, 105, 97] and "score" not in info
        obs, r, term, _, info = env.step(97)
        obs, r, term, _, info = env.step(97)
        assert term and r == info["score"] == 3.0 and info["response"] == "aaa"
        env.reset(seed=0)
        _, r, term, _, info = env.step(EOS)
        assert term and info["response"] == "" and info["score"] == 0.0


def test_decoding_equals_the_tokenizers_batch_decode():
    from rlhf_envs.lm.loading import load_causal_lm
    from rlhf_envs.text_common import TextTask

    model, tokenizer = load_causal_lm(None)
    task = TextTask(model=(model, tokenizer), max_new_tokens=20)
    assert task._backend_decode  # the embedded tokenizer takes the backend's decode_batch
    ids = torch.randint(0, tokenizer.vocab_size, (16, 20), generator=torch.Generator().manual_seed(0))
    ids[3, 5] = tokenizer.eos_token_id
    mask = task.response_mask(ids)
    rows = [row[keep & (row != tokenizer.eos_token_id)].tolist() for row, keep in zip(ids, mask)]
    expected = tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert task.decode(ids, mask) == expected
    task._backend_decode = False
    assert task.decode(ids, mask) == expected


def test_token_env_step_is_retried_after_the_reward_model_fails(lm):
    calls = []

    def flaky(prompts, responses):
        calls.append(len(responses))
        if len(calls) == 1:
            raise RuntimeError("service down")
        return [float(r.count("a")) for r in responses]

    from rlhf_envs.rewards import RewardModelError

    env = gym.make("TextToken-v0", model=lm, prompts=PROMPTS, max_new_tokens=4, reward_model=flaky, beta=0.1)
    env.reset(seed=0)
    env.unwrapped.set_policy_logprobs(np.full(258, -np.log(258), np.float32))
    env.step(97)
    env.unwrapped.set_policy_logprobs(np.full(258, -np.log(258), np.float32))
    with pytest.raises(RewardModelError, match="service down"):
        env.step(256)  # EOS: the episode ends and is scored
    _, _, terminated, _, info = env.step(256)  # the same step again, the hand-over kept
    assert terminated and info["score"] == 1.0 and info["response"] == "a"
    assert info["kl_per_token"][1] != 0.0  # the retried step used the handed-over (uniform) distribution
