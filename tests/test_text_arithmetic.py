"""TextArithmetic-v0: generated problems with a held-out split, answer extraction, the verifier plugin, check_env."""

import warnings

import gymnasium as gym
import numpy as np
import pytest

import rlhf_envs  # noqa: F401
from agents.verifiable import pass_at_k
from rlhf_envs.rewards import make_reward_model
from rlhf_envs.text_arithmetic import (
    OPERATIONS,
    extract_answer,
    is_well_formed,
    make_arithmetic_tokenizer,
    make_problems,
    solve,
    split_of,
)


def test_problems_cover_every_operation_and_the_splits_are_disjoint():
    train, test = make_problems(3000, 0, "train"), make_problems(600, 0, "test")
    assert len(set(train)) == 3000 and not set(train) & set(test)
    assert all(split_of(p) == "train" for p in train) and all(split_of(p) == "test" for p in test)
    assert {op for op in OPERATIONS if any(op in p for p in train)} == set(OPERATIONS)
    assert make_problems(50, 3) == make_problems(50, 3)
    with pytest.raises(ValueError, match="split must be one of"):
        make_problems(5, 0, "validation")


def test_solve_and_extract():
    assert solve("37+45=") == "82" and solve("12-12=") == "0" and solve("23*7=") == "161"
    assert extract_answer("82") == "82" and extract_answer("82-1") == "82" and extract_answer("082") == "82"
    assert extract_answer("") is None and extract_answer("+5") is None
    assert is_well_formed("82") and not is_well_formed("82-1") and not is_well_formed("")
    with pytest.raises(ValueError, match="not an arithmetic problem"):
        solve("hello")


def test_the_tokenizer_splits_digits():
    tokenizer = make_arithmetic_tokenizer()
    ids = tokenizer("123+45=")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 8
    assert tokenizer.decode(ids, skip_special_tokens=True) == "123+45="


def test_verifier_plugin_scores_exactly_with_an_optional_format_reward():
    verifier = make_reward_model("verifier")
    scores = verifier.score(["37+45=", "37+45=", "37+45=", "9*9="], ["82", "82-1", "83", ""])
    assert scores.tolist() == [1.0, 1.0, 0.0, 0.0]
    shaped = make_reward_model("verifier", format_reward=0.1)
    assert shaped.score(["37+45="] * 3, ["82", "82-1", "83"]).tolist() == pytest.approx([1.1, 1.0, 0.1])
    # a user's own checker plugs in the same way
    upper = make_reward_model("verifier", answer=str.upper, extract=lambda r: r)
    assert upper.score(["ab", "ab"], ["AB", "ab"]).tolist() == [1.0, 0.0]


def test_pass_at_k():
    assert pass_at_k(8, 0, 1) == 0.0 and pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(8, 2, 1) == pytest.approx(0.25)
    assert pass_at_k(8, 2, 8) == 1.0 and pass_at_k(4, 1, 2) == pytest.approx(0.5)


def test_env_scores_the_right_answer():
    env = gym.make("TextArithmetic-v0", prompts=["37+45="], max_new_tokens=4)
    task = env.unwrapped.task
    obs, _ = env.reset(seed=0)
    ids = task.tokenizer("82", add_special_tokens=False)["input_ids"] + [task.eos_token_id, task.pad_token_id]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, reward, terminated, _, info = env.step(np.array(ids))
    assert reward == 1.0 and terminated and info["response"] == "82"


def test_held_out_split_and_groups_in_the_vector_env():
    envs = gym.make_vec("TextArithmetic-v0", num_envs=8, group_size=4, split="test", n_prompts=50)
    assert all(split_of(p) == "test" for p in envs.unwrapped.task.prompts)
    obs, info = envs.reset(seed=1)
    assert info["group"].tolist() == [0] * 4 + [1] * 4 and (obs[:4] == obs[0]).all()


def test_check_env_gymnasium_and_sb3():
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(gym.make("TextArithmetic-v0", n_prompts=20).unwrapped, skip_render_check=True)
        sb3_check_env(gym.make("TextArithmetic-v0", n_prompts=20), warn=False)
