"""TextDialogue: checkers, the policy-token mask on hand-made dialogues, KL on policy tokens only, truncation,
the vector form, the string view and the user-game adapter."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import rlhf_envs  # noqa: F401
from rlhf_envs.dialogue_games import ArithmeticChecker, evaluate_expression, optimal_guess_turns
from rlhf_envs.dialogue_wrappers import DialogueStrings, register_dialogue_env
from rlhf_envs.lm.sampling import positions_from_mask, processed_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")


def _turn(env, text: str) -> np.ndarray:
    """A turn's action: ``text``'s tokens, the turn-end marker, padding."""
    task, d = env.unwrapped.task, env.unwrapped.dialogues
    ids = task.tokenizer(text, add_special_tokens=False)["input_ids"]
    out = np.full(d.max_turn_tokens, task.pad_token_id, dtype=np.int64)
    out[:len(ids) + 1] = [*ids, task.eos_token_id]
    return out


def _quiet_step(env, action):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no log-probs handed over: uniform policy
        return env.step(action)


@pytest.mark.parametrize("env_id", ["TextDialogue-v0", "TextDialogueTool-v0"])
def test_env_checkers(env_id):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        env = gym.make(env_id)
        check_env(env.unwrapped, skip_render_check=True)
        sb3_check_env(env.unwrapped)


def test_policy_mask_exact_on_hand_made_dialogue():
    env = gym.make("TextDialogue-v0")
    obs, info = env.reset(seed=0)
    assert not info["policy_mask"].any() and info["turn"] == 0
    env.unwrapped.dialogues.games[0].secret = 11
    tok = env.unwrapped.task.tokenizer
    replies = []
    for guess in ["8", "12"]:
        obs, reward, terminated, truncated, info = _quiet_step(env, _turn(env, guess))
        replies.append(info["reply"])
    # a turn without the turn-end marker: both tokens are the policy's
    no_marker = np.array(tok.convert_tokens_to_ids(["3", "9"]))
    obs, _, _, _, info = _quiet_step(env, no_marker)
    obs, reward, terminated, truncated, info = _quiet_step(env, _turn(env, "11"))
    assert replies == ["higher", "lower"] and info["reply"] == "correct" and terminated and not truncated
    assert info["turn"] == 4
    real = obs != env.unwrapped.task.pad_token_id
    tokens = tok.convert_ids_to_tokens(obs[real].tolist())
    assert tokens == ["?", "8", "<eot>", "higher", "12", "<eot>", "lower", "3", "9", "invalid", "11", "<eot>",
                      "correct"]
    expected = [False, True, True, False, True, True, False, True, True, False, True, True, False]
    assert info["policy_mask"][real].tolist() == expected
    assert not info["policy_mask"][~real].any()
    assert reward == pytest.approx(0.9 - env.unwrapped.task.beta * info["kl"], abs=1e-6)


def test_kl_covers_the_turn_only_and_matches_a_plain_reference_forward():
    env = gym.make("TextDialogue-v0", beta=0.1)
    env.reset(seed=3)
    env.unwrapped.dialogues.games[0].secret = 16
    _quiet_step(env, _turn(env, "5"))
    obs_before = env.unwrapped.dialogues.observations()[0][0]
    action = _turn(env, "9")
    handed = np.array([-0.5, -0.25], dtype=np.float32)
    env.unwrapped.set_policy_logprobs(handed)
    obs, reward, _, _, info = env.step(action)
    task = env.unwrapped.task
    real = obs_before != task.pad_token_id
    ids = torch.as_tensor(np.concatenate([obs_before[real], action]))[None]
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        logits = task.ref_model(input_ids=ids, attention_mask=mask.long(),
                                position_ids=positions_from_mask(mask)).logits
    n = int(real.sum())
    ref = processed_logprobs(logits[0, n - 1:-1], task.ref_sampling).gather(-1, ids[0, n:, None])[:, 0]
    assert info["ref_logprobs"] == pytest.approx(ref.numpy(), abs=1e-4)
    assert info["kl_per_token"] == pytest.approx(handed - ref.numpy(), abs=1e-4)
    assert reward == pytest.approx(-0.1 - 0.1 * float(info["kl"]), abs=1e-5)


def test_context_limit_truncates_not_terminates():
    env = gym.make("TextDialogue-v0", max_context_tokens=8)
    env.reset(seed=0)
    env.unwrapped.dialogues.games[0].secret = 16
    _, _, terminated, truncated, _ = _quiet_step(env, _turn(env, "1"))
    assert not terminated and not truncated
    obs, _, terminated, truncated, info = _quiet_step(env, _turn(env, "2"))  # 7 tokens, no room for a 2-token turn
    assert truncated and not terminated and obs.shape == (8,)
    assert (obs != env.unwrapped.task.pad_token_id).sum() == 7
    with pytest.raises(gym.error.ResetNeeded):
        env.step(_turn(env, "3"))


class _Chatty:
    """A user game: replies with a long text, so the reply is cut at the context limit."""

    def reset(self, seed=None):
        return "Say something."

    def step(self, text):
        return " and then the story went on and on and on, longer than any context could hold" * 3, 0.5, False


def test_reply_cut_at_context_limit_and_user_game_adapter():
    register_dialogue_env("TestChatty-v0", _Chatty, max_turn_tokens=4, max_context_tokens=40)
    env = gym.make("TestChatty-v0")
    obs, _ = env.reset(seed=0)
    obs, reward, terminated, truncated, info = _quiet_step(env, _turn(env, "hi"))
    assert truncated and not terminated and obs.shape == (40,)
    assert (obs != env.unwrapped.task.pad_token_id).all()  # the context is exactly full, never more
    assert info["policy_mask"].sum() == len(_turn(env, "hi")[_turn(env, "hi") != env.unwrapped.task.pad_token_id])
    envs = gym.make_vec("TestChatty-v0", num_envs=3)
    envs.reset(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, rewards, terminated, truncated, info = envs.step(np.stack([_turn(env, "hi")] * 3))
    assert truncated.all() and info["final_policy_mask"].shape == (3, 40) and not info["policy_mask"].any()


def test_vector_env_batches_and_autoresets():
    envs = gym.make_vec("TextDialogue-v0", num_envs=64)
    obs, info = envs.reset(seed=0)
    assert obs.shape == (64, 31) and envs.single_action_space.shape == (2,)
    actions = np.stack([_turn(envs, "8")] * 64)
    envs.set_policy_logprobs(np.full((64, 2), -1.0, dtype=np.float32))
    obs, rewards, terminated, truncated, info = envs.step(actions)
    assert rewards.shape == (64,) and (info["turn"] == 1).all()
    secrets_hit = terminated.sum()
    assert (info["reply"][terminated] == "correct").all() and secrets_hit < 64
    assert not info["policy_mask"][terminated].any() and info["final_policy_mask"][terminated].sum() == 2 * secrets_hit


def test_string_view():
    env = DialogueStrings(gym.make("TextDialogueTool-v0", beta=0.0))
    text, info = env.reset(seed=1)
    a, b = map(int, text.rstrip("=").split("*"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        reply, reward, terminated, _, info = env.step(f"calc({a}*{b})")
        assert reply == f"={a * b};" and not terminated and reward == 0.0
        reply, reward, terminated, _, info = env.step(str(a * b))
    assert terminated and reward == 1.0 and info["context"] == f"{text}calc({a}*{b})={a * b};{a * b}"
    with pytest.raises(ValueError, match="max_turn_tokens"):
        env.reset(seed=1)
        env.step("1" * 40)


def test_games_and_checker():
    assert optimal_guess_turns(16) == pytest.approx(3.375) and optimal_guess_turns(7) == pytest.approx(17 / 7)
    assert optimal_guess_turns(1) == 1
    assert evaluate_expression("12*(3+4)") == 84 and evaluate_expression("__import__('os')") is None
    assert ArithmeticChecker().score(["12*7=", "12*7=", "12*7="], ["84", "85", "calc(12*7)"]).tolist() == [1, 0, 0]
    env = gym.make("TextDialogueTool-v0", game_kwargs={"tool": False})
    env.reset(seed=0)
    _, _, _, _, info = _quiet_step(env, _turn(env, "calc(2*3)"))
    assert info["reply"] == "=?;"


@pytest.mark.parametrize("env_id", ["TextDialogue-v0", "TextDialogueTool-v0"])
def test_reference_kv_cache_matches_the_full_forward(env_id):
    cached, plain = (gym.make_vec(env_id, num_envs=16, kl_estimator="exact") for _ in range(2))
    plain.unwrapped.dialogues.reference_kv = None
    assert cached.unwrapped.dialogues.reference_kv is not None
    rng = np.random.default_rng(0)
    cached.reset(seed=5), plain.reset(seed=5)
    vocab = cached.unwrapped.task.vocab_size
    T = cached.unwrapped.dialogues.max_turn_tokens
    for _ in range(6):  # episodes end and restart on the way
        actions = rng.integers(vocab, size=(16, T))
        full = torch.log_softmax(torch.randn(16, T, vocab), -1)
        logprobs = full.gather(-1, torch.as_tensor(actions)[..., None])[..., 0]
        outs = []
        for envs in (cached, plain):
            envs.set_policy_logprobs(logprobs.numpy(), full.numpy())
            outs.append(envs.step(actions))
        assert (outs[0][0] == outs[1][0]).all()
        assert outs[0][4]["ref_logprobs"] == pytest.approx(outs[1][4]["ref_logprobs"], abs=1e-4)
        assert outs[0][4]["kl"] == pytest.approx(outs[1][4]["kl"], abs=1e-3)
