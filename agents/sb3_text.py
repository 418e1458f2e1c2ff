"""Stable-Baselines3 PPO on ``TextToken-v0`` with a causal LM as the policy.

The policy's action logits are the LM's next-token logits at the last position of the
(left-padded) observation, processed exactly like the sampler (temperature, top-k, top-p), and a
linear value head reads the same last hidden state. After every forward the policy writes its
log-distribution ``[N, V]`` into a :class:`LogprobChannel`; :class:`HandOverLogprobs` (a
``VecEnvWrapper``) hands row ``i`` to env ``i`` through ``set_policy_logprobs`` just before
``step``, so the env's KL is that of the policy that chose the action.

:func:`sb3_text_ppo` wires the four objects (vector env, hand-over wrapper, channel, policy):

    model = sb3_text_ppo("TextToken-v0", model=None, n_envs=4, env_kwargs={"max_new_tokens": 8, "beta": 0.05},
                         n_steps=64, batch_size=64)
    model.learn(10_000)          # trains the LM (a trainable copy of the env's reference) and the value head

The policy's LM must be trainable: a copy of the env's frozen ``ref_model`` has ``requires_grad``
off, and SB3 would then update only the value head; :class:`LMActorCriticPolicy` refuses it.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.distributions import CategoricalDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper

from rlhf_envs.lm.sampling import SamplingConfig, positions_from_mask, processed_logprobs
from rlhf_envs.text_common import attention_mask_from_obs

__all__ = ["HandOverLogprobs", "LMActorCriticPolicy", "LogprobChannel", "sb3_text_ppo"]


class LogprobChannel:
    """Holds the policy's latest log-distributions ``[N, V]`` until the env wrapper hands them over."""

    def __init__(self) -> None:
        self.logprobs: torch.Tensor | None = None


class LMActorCriticPolicy(ActorCriticPolicy):
    """An SB3 actor-critic whose actor is a causal LM and whose critic is a linear head on it.

    Extra keyword arguments (pass them in ``policy_kwargs``): ``lm`` (the causal LM to train, with
    ``requires_grad`` on: a copy of the env's ``ref_model`` needs ``.requires_grad_(True)``, else
    this raises), ``pad_token_id``, ``sampling`` (the env's
    :class:`~rlhf_envs.lm.sampling.SamplingConfig`, ``env.unwrapped.task.sampling``) and ``channel``.
    """

    def __init__(self, observation_space, action_space, lr_schedule, *, lm: torch.nn.Module, pad_token_id: int,
                 sampling: SamplingConfig, channel: LogprobChannel | None = None, **kwargs: Any):
        self._lm_parts = (lm, pad_token_id, sampling, channel)
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build(self, lr_schedule) -> None:
        lm, self.pad_token_id, self.sampling, self.channel = self._lm_parts
        frozen = [name for name, p in lm.named_parameters() if not p.requires_grad]
        if frozen:
            raise ValueError(
                f"{len(frozen)} of the LM's {len(list(lm.parameters()))} parameter tensors have requires_grad=False "
                f"(e.g. {frozen[0]!r}; a copy of the env's frozen ref_model is), so PPO would train only the value "
                "head; pass lm=copy.deepcopy(ref).requires_grad_(True), or use sb3_text_ppo(...)")
        if not isinstance(self.action_space, spaces.Discrete):
            raise ValueError(f"the LM policy acts one token at a time (a Discrete action space, TextToken-v0); "
                             f"got {self.action_space}")
        self.lm = lm
        vocab = int(lm.get_output_embeddings().weight.shape[0])
        if vocab != self.action_space.n:
            raise ValueError(f"the LM has {vocab} output tokens but the action space has {self.action_space.n}; "
                             "use the env's model family")
        hidden = int(lm.get_output_embeddings().weight.shape[1])
        self.value_net = torch.nn.Linear(hidden, 1)
        torch.nn.init.orthogonal_(self.value_net.weight, gain=1.0)
        torch.nn.init.zeros_(self.value_net.bias)
        self.action_dist = CategoricalDistribution(vocab)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _lm_forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(processed log-distribution [N, V], value [N, 1])`` for observations ``[N, L]``."""
        ids = obs.long()
        mask = attention_mask_from_obs(ids, self.pad_token_id)
        out = self.lm(input_ids=ids, attention_mask=mask.long(), position_ids=positions_from_mask(mask),
                      output_hidden_states=True)
        logprobs = processed_logprobs(out.logits[:, -1], self.sampling)
        return logprobs, self.value_net(out.hidden_states[-1][:, -1].float())

    def _distribution(self, logprobs: torch.Tensor) -> CategoricalDistribution:
        return self.action_dist.proba_distribution(action_logits=logprobs)

    def _publish(self, logprobs: torch.Tensor) -> None:
        if self.channel is not None:
            self.channel.logprobs = logprobs.detach().cpu()

    def forward(self, obs: torch.Tensor, deterministic: bool = False):
        logprobs, values = self._lm_forward(obs)
        self._publish(logprobs)
        dist = self._distribution(logprobs)
        actions = dist.get_actions(deterministic=deterministic)
        return actions, values, dist.log_prob(actions)

    def evaluate_actions(self, obs: torch.Tensor, actions: torch.Tensor):
        logprobs, values = self._lm_forward(obs)
        dist = self._distribution(logprobs)
        return values, dist.log_prob(actions), dist.entropy()

    def get_distribution(self, obs: torch.Tensor) -> CategoricalDistribution:
        logprobs, _ = self._lm_forward(obs)
        self._publish(logprobs)
        return self._distribution(logprobs)

    def predict_values(self, obs: torch.Tensor) -> torch.Tensor:
        return self._lm_forward(obs)[1]

    def _predict(self, observation: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        return self.get_distribution(observation).get_actions(deterministic=deterministic)


class HandOverLogprobs(VecEnvWrapper):
    """Before each ``step``, hands env ``i`` row ``i`` of the channel's log-distributions.

    The channel is emptied after the hand-over, so a step without a fresh policy forward falls
    back to the env's uniform assumption (and its warning) instead of reusing stale log-probs.
    """

    def __init__(self, venv: VecEnv, channel: LogprobChannel):
        super().__init__(venv)
        self.channel = channel

    def reset(self) -> np.ndarray:
        return self.venv.reset()

    def step_async(self, actions: np.ndarray) -> None:
        logprobs = self.channel.logprobs
        if logprobs is not None:
            if logprobs.shape[0] != self.num_envs:
                raise ValueError(f"the channel holds log-probs for {logprobs.shape[0]} envs, expected {self.num_envs}")
            for i in range(self.num_envs):
                self.venv.env_method("set_policy_logprobs", logprobs[i], indices=[i])
            self.channel.logprobs = None
        self.venv.step_async(actions)

    def step_wait(self):
        return self.venv.step_wait()


def sb3_text_ppo(env_id: str = "TextToken-v0", model: Any = None, *, n_envs: int = 4, env_kwargs: dict | None = None,
                 seed: int = 0, device: str = "cpu", **ppo_kwargs: Any):
    """SB3 ``PPO`` training a causal LM on ``env_id`` (a token-level text env such as ``TextToken-v0``).

    ``model`` is the env's reference: ``None`` (embedded default), a local HF causal-LM directory
    or a ``(model, tokenizer)`` pair. The policy starts as a trainable copy of it without dropout (so
    the KL starts at 0) plus a linear value head. Builds ``n_envs`` envs with ``env_kwargs`` (SB3's
    ``make_vec_env``), the :class:`HandOverLogprobs` wrapper and the :class:`LMActorCriticPolicy`;
    ``ppo_kwargs`` go to ``PPO`` (``n_steps``, ``batch_size``, ``learning_rate``, ...). The vector
    env is ``model.get_env()``.
    """
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    if isinstance(model, tuple):
        lm, tokenizer = model
    else:
        from rlhf_envs.lm.loading import load_causal_lm

        lm, tokenizer = load_causal_lm(model)
    kwargs = {**(env_kwargs or {}), "model": (lm, tokenizer), "render_mode": None}
    channel = LogprobChannel()
    venv = HandOverLogprobs(make_vec_env(env_id, n_envs=n_envs, seed=seed, env_kwargs=kwargs), channel)
    if not isinstance(venv.action_space, spaces.Discrete):
        raise ValueError(f"sb3_text_ppo needs a token-level env (Discrete actions, e.g. TextToken-v0); {env_id!r} has "
                         f"{venv.action_space}")
    task = venv.get_attr("task")[0]
    policy_lm = copy.deepcopy(lm).requires_grad_(True).train()
    for module in policy_lm.modules():  # as in agents.lm_ppo: without dropout the ratio is 1 before the first step
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    policy_kwargs = {"lm": policy_lm, "pad_token_id": task.pad_token_id, "sampling": task.sampling, "channel": channel}
    return PPO(LMActorCriticPolicy, venv, policy_kwargs=policy_kwargs, seed=seed, device=device, **ppo_kwargs)
