"""Stable-Baselines3 on the rlhf_envs environments, through SB3's standard API.

Nothing here changes how SB3 trains: ``PPO("MlpPolicy", gym.make("CatGrid-v0"))`` works as it
is. These helpers add what a comparison needs: SB3 settings that match a :class:`PPOConfig`,
the policy's action probabilities for exact evaluation with the CatGrid solver, and a callback
that stops training once a target is reached.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from stable_baselines3 import DQN, PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

from agents.ppo import PPOConfig


def sb3_ppo_from_config(config: PPOConfig, verbose: int = 0) -> PPO:
    """An SB3 ``PPO`` with the same hyper-parameters as our :class:`PPOConfig` (same env count,
    rollout length, minibatch size, epochs, learning-rate schedule, losses and network)."""
    envs = make_vec_env(config.env_id, n_envs=config.num_envs, seed=config.seed, env_kwargs=config.env_kwargs)
    lr = config.learning_rate
    return PPO(
        "MlpPolicy", envs, seed=config.seed, verbose=verbose, device="cpu",
        learning_rate=(lambda progress: progress * lr) if config.anneal_lr else lr,
        n_steps=config.num_steps, batch_size=config.minibatch_size, n_epochs=config.update_epochs,
        gamma=config.gamma, gae_lambda=config.gae_lambda, clip_range=config.clip_coef,
        clip_range_vf=config.clip_coef if config.clip_vloss else None, normalize_advantage=config.norm_adv,
        ent_coef=config.ent_coef, vf_coef=config.vf_coef, max_grad_norm=config.max_grad_norm,
        target_kl=config.max_approx_kl,
        policy_kwargs={"net_arch": [config.hidden_size, config.hidden_size], "activation_fn": torch.nn.Tanh},
    )


def sb3_dqn(env_id: str, seed: int = 0, verbose: int = 0, **kwargs) -> DQN:
    """An SB3 ``DQN`` on a Gymnasium id, with settings that suit small gridworlds (override any)."""
    params = dict(learning_rate=1e-3, buffer_size=20_000, learning_starts=500, batch_size=64,
                  train_freq=1, target_update_interval=250, exploration_fraction=0.3,
                  exploration_final_eps=0.02, gamma=0.99)
    params.update(kwargs)
    return DQN("MlpPolicy", env_id, seed=seed, verbose=verbose, device="cpu", **params)


def sb3_action_probs(model: BaseAlgorithm, observations: np.ndarray) -> np.ndarray:
    """``[B, n_actions]`` action probabilities of an SB3 model (DQN: greedy one-hot)."""
    obs_tensor, _ = model.policy.obs_to_tensor(observations)
    with torch.no_grad():
        if isinstance(model, DQN):
            q = model.q_net(obs_tensor)
            return torch.nn.functional.one_hot(q.argmax(-1), q.shape[-1]).double().cpu().numpy()
        return model.policy.get_distribution(obs_tensor).distribution.probs.double().cpu().numpy()


class EntropySchedule(BaseCallback):
    """Anneals SB3 PPO's ``ent_coef`` linearly from ``start`` to ``end`` over ``total_timesteps``, as
    :class:`agents.ppo.PPOConfig`'s ``ent_coef_final`` does (SB3 takes only a constant coefficient)."""

    def __init__(self, start: float, end: float, total_timesteps: int):
        super().__init__()
        self.start, self.end, self.total = start, end, total_timesteps

    def _on_rollout_start(self) -> None:
        progress = min(1.0, self.num_timesteps / self.total)
        self.model.ent_coef = self.start + progress * (self.end - self.start)

    def _on_step(self) -> bool:
        return True


class StopWhen(BaseCallback):
    """Stops SB3 training once ``check(model, num_timesteps)`` returns True.

    For on-policy algorithms it checks at the start of each rollout, right after the update (the
    same point at which :func:`agents.ppo.train_ppo` calls its callback); with ``every`` set, it
    checks every ``every`` calls instead (for off-policy algorithms such as DQN).
    """

    def __init__(self, check: Callable[[BaseAlgorithm, int], bool], every: int = 0):
        super().__init__()
        self.check, self.every = check, every
        self.reached = False
        self.reached_at: int | None = None

    def _test(self) -> None:
        if not self.reached and self.check(self.model, self.num_timesteps):
            self.reached, self.reached_at = True, self.num_timesteps

    def _on_rollout_start(self) -> None:
        if not self.every and self.num_timesteps > 0:
            self._test()

    def _on_step(self) -> bool:
        if self.every and self.n_calls % self.every == 0:
            self._test()
        return not self.reached
