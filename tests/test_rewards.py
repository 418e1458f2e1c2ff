"""Reward-model plugins: built-ins, register, entry points, validation."""

import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlhf_envs  # noqa: F401
from rlhf_envs import rewards
from rlhf_envs.rewards import RewardModelError, available_reward_models, make_reward_model, register
from tests.tiny_models import tiny_causal_lm


def test_sentiment_ranks_positive_above_negative():
    rm = make_reward_model("sentiment")
    scores = rm.score(["p", "p", "p"], [" wonderful, I love it", " the food", " awful and terrible"])
    assert scores.dtype == np.float32 and scores.shape == (3,)
    assert scores[0] > 0.5 and scores[1] == 0.0 and scores[2] < -0.5


def test_callable_object_and_registered_factory():
    assert make_reward_model(lambda p, r: [len(x) for x in r]).score(["a"], ["abc"]).tolist() == [3.0]

    class Const:
        def score(self, prompts, responses):
            return np.ones(len(responses))

    assert make_reward_model(Const()).score(["a", "b"], ["x", "y"]).tolist() == [1.0, 1.0]
    register("test-scale", lambda scale=1.0: (lambda p, r: [scale * len(x) for x in r]), overwrite=True)
    assert make_reward_model("test-scale", scale=2.0).score(["a"], ["ab"]).tolist() == [4.0]
    assert "test-scale" in available_reward_models()
    with pytest.raises(ValueError, match="already registered"):
        register("test-scale", lambda: None)


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown reward model 'nope'.*'sentiment'"):
        make_reward_model("nope")


@pytest.mark.parametrize("fn, problem", [
    (lambda p, r: 1 / 0, "raised ZeroDivisionError"),
    (lambda p, r: [float("nan")] * len(r), "non-finite"),
    (lambda p, r: [float("inf")] * len(r), "non-finite"),
    (lambda p, r: [1.0], "shape"),
    (lambda p, r: np.zeros((len(r), 2)), "shape"),
    (lambda p, r: ["x"] * len(r), "not numbers"),
])
def test_bad_plugins_raise_naming_the_plugin(fn, problem):
    register("test-bad", lambda: fn, overwrite=True)
    rm = make_reward_model("test-bad")
    with pytest.raises(RewardModelError, match=rf"'test-bad'.*{problem}"):
        rm.score(["a", "b"], ["x", "y"])


def test_timeout():
    rm = make_reward_model(lambda p, r: time.sleep(0.5) or [0.0] * len(r), timeout_s=0.05)
    with pytest.raises(RewardModelError, match="timeout_s"):
        rm.score(["a"], ["b"])


def _install_plugin(tmp_path, name, module, body):
    dist = tmp_path / f"{module}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[rlhf_envs.reward_models]\n{name} = {module}:factory\n")
    (tmp_path / f"{module}.py").write_text(body)


def test_entry_point_plugin_used_by_name_in_gym_make(tmp_path, monkeypatch):
    _install_plugin(tmp_path, "count-a", "rg_plugin_count_a",
                    "def factory(weight=1.0):\n"
                    "    return lambda prompts, responses: [weight * r.count('a') for r in responses]\n")
    _install_plugin(tmp_path, "broken-one", "rg_plugin_broken", "raise ImportError('missing dependency')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert {"count-a", "broken-one"} <= set(available_reward_models())
    env = gym.make("TextBandit-v0", model=tiny_causal_lm(), reward_model="count-a", reward_kwargs={"weight": 2.0},
                   prompts=["hi"], max_new_tokens=4, beta=0.0)
    env.reset(seed=0)
    env.unwrapped.set_policy_logprobs(np.full(4, -1.0, dtype=np.float32))
    _, reward, *_, info = env.step(np.array([97, 97, 98, 97]))
    assert info["response"] == "aaba" and reward == info["score"] == 6.0
    with pytest.raises(ValueError, match="reward model plugin 'broken-one' .* failed to load: ImportError: missing "
                                         "dependency"):
        make_reward_model("broken-one")
    sys.modules.pop("rg_plugin_count_a", None)
    rewards._REGISTERED.pop("count-a", None)


def test_learned_checkpoint_scores_batched_like_single(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    _, tokenizer = tiny_causal_lm()
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=258,
                                                     num_labels=1, pad_token_id=257)).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    rm = make_reward_model("learned", path=str(tmp_path), batch_size=2)
    prompts, responses = ["a", "hello there", "xy"], [" b", " friend", " a much longer response"]
    batched = rm.score(prompts, responses)
    single = np.array([rm.score([p], [r])[0] for p, r in zip(prompts, responses)])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    with torch.no_grad():
        direct = model(tokenizer("hello there friend", return_tensors="pt")["input_ids"]).logits[0, 0].item()
    assert batched[1] == pytest.approx(direct, abs=1e-5)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        make_reward_model("learned", path=str(tmp_path / "missing"))
