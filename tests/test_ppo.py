"""Our PPO and SB3 on CatGrid: they learn (a fraction of the exact optimum), and the config checks itself."""

from __future__ import annotations

import csv

import gymnasium as gym
import numpy as np
import pytest

import rlhf_envs  # noqa: F401
from agents.ppo import PPOConfig, train_ppo
from agents.sb3 import StopWhen, sb3_action_probs, sb3_dqn, sb3_ppo_from_config
from rlhf_envs.catgrid_solver import policy_return, solve


def _reached(env_id: str, fraction: float):
    env = gym.make(env_id)
    optimum = solve(env).optimal_return
    return lambda probs: policy_return(env, probs) >= fraction * optimum


@pytest.mark.parametrize("env_id", ["CatGrid-v0", "CatGridDrunk-v0"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_our_ppo_reaches_95_percent_of_optimum(env_id, seed):
    ok = _reached(env_id, 0.95)
    states = np.arange(gym.make(env_id).observation_space.n)
    result = train_ppo(PPOConfig(env_id=env_id, seed=seed, total_timesteps=60_000, progress=False),
                       callback=lambda agent, step: ok(agent.action_probs(states)))
    assert result.stopped_early, f"PPO did not reach 95% of the optimum on {env_id} in {result.global_step} steps"


@pytest.mark.slow
@pytest.mark.parametrize("env_id", ["CatGrid8x8-v0", "CatGrid8x8Drunk-v0"])
def test_our_ppo_solves_the_8x8_maps(env_id):
    """A random cat finds the 8x8 meat in under 2% of episodes: many envs and an annealed entropy bonus do it."""
    ok = _reached(env_id, 0.95)
    states = np.arange(gym.make(env_id).observation_space.n)
    config = PPOConfig(env_id=env_id, seed=1, total_timesteps=4_000_000, num_envs=1024, num_steps=32,
                       num_minibatches=8, learning_rate=1e-3, ent_coef=0.1, ent_coef_final=0.0, progress=False)
    result = train_ppo(config, callback=lambda agent, step: ok(agent.action_probs(states)))
    assert result.stopped_early, f"PPO did not reach 95% of the optimum on {env_id} in {result.global_step} steps"


def test_entropy_schedule_anneals_the_coefficient():
    rows = train_ppo(PPOConfig(total_timesteps=64 * 8 * 4, ent_coef=0.1, ent_coef_final=0.0, progress=False)).history
    assert [row["charts/ent_coef"] for row in rows] == pytest.approx([0.1, 0.075, 0.05, 0.025])


@pytest.mark.parametrize("env_id", ["CatGrid-v0", "CatGridDrunk-v0"])
def test_sb3_ppo_reaches_95_percent_of_optimum(env_id):
    ok = _reached(env_id, 0.95)
    states = np.arange(gym.make(env_id).observation_space.n)
    model = sb3_ppo_from_config(PPOConfig(env_id=env_id, seed=1))
    stop = StopWhen(lambda m, step: ok(sb3_action_probs(m, states)))
    model.learn(total_timesteps=60_000, callback=stop)
    assert stop.reached


def test_sb3_dqn_trains_through_the_standard_api():
    ok = _reached("CatGrid-v0", 0.95)
    model = sb3_dqn("CatGrid-v0", seed=1)
    stop = StopWhen(lambda m, step: ok(sb3_action_probs(m, np.arange(16))), every=500)
    model.learn(total_timesteps=20_000, callback=stop)
    assert stop.reached


def test_ppo_logs_cleanrl_names_and_is_deterministic(tmp_path):
    config = PPOConfig(env_id="CatGridDrunk-v0", seed=4, total_timesteps=2048, progress=False, log_dir=str(tmp_path))
    first = train_ppo(config)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert len(rows) == config.num_iterations
    for name in [
        "charts/episodic_return",
        "losses/approx_kl",
        "losses/clipfrac",
        "losses/explained_variance",
        "charts/SPS",
    ]:
        assert name in rows[0]
    second = train_ppo(PPOConfig(env_id="CatGridDrunk-v0", seed=4, total_timesteps=2048, progress=False))
    for a, b in zip(first.history, second.history):
        assert (
            a["losses/approx_kl"] == b["losses/approx_kl"]
            and a["charts/episodic_return"] == b["charts/episodic_return"]
        )


def test_max_approx_kl_stops_the_update_early():
    result = train_ppo(
        PPOConfig(
            env_id="CatGrid-v0", seed=1, total_timesteps=4096, max_approx_kl=1e-6, learning_rate=0.05, progress=False
        )
    )
    assert all(row["losses/approx_kl"] > 1e-6 or row["losses/approx_kl"] == 0.0 for row in result.history[1:])


def test_ppo_trains_on_a_gymnasium_env_without_a_vector_entry_point():
    result = train_ppo(
        PPOConfig(env_id="CartPole-v1", seed=1, num_envs=4, num_steps=32, total_timesteps=1024, progress=False)
    )
    assert result.global_step == 1024


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_envs": 0}, "num_envs must be a positive integer"),
        ({"num_envs": 3, "num_steps": 5, "num_minibatches": 4}, "not divisible"),
        ({"gamma": 1.5}, "gamma must be in"),
        ({"learning_rate": -1.0}, "learning_rate must be > 0"),
        ({"max_approx_kl": 0.0}, "max_approx_kl must be > 0"),
        ({"ent_coef_final": -0.1}, "ent_coef_final must be >= 0"),
    ],
)
def test_bad_ppo_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PPOConfig(**kwargs)


def test_ppo_rejects_continuous_actions():
    with pytest.raises(TypeError, match="Discrete actions"):
        train_ppo(
            PPOConfig(
                env_id="Pendulum-v1", num_envs=2, num_steps=4, num_minibatches=2, total_timesteps=8, progress=False
            )
        )
