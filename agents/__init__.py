"""agents: the algorithms that train against rlhf_envs, and the ``rlhf`` command.

One flat module per algorithm, each with one config dataclass and one ``train_*`` function:

- :mod:`agents.ppo`: PPO for discrete Gymnasium envs (:class:`PPOConfig`, :func:`train_ppo`);
- :mod:`agents.pretrain`: pretraining on plain text (:class:`PretrainConfig`, :func:`train_pretrain`);
- :mod:`agents.sft`: supervised fine-tuning (:class:`SFTConfig`, :func:`train_sft`);
- :mod:`agents.reward_model`: Bradley-Terry reward model (:class:`RewardModelConfig`, :func:`train_reward_model`);
- :mod:`agents.lm_ppo`: RLHF PPO for language models (:class:`LMPPOConfig`, :func:`train_lm_ppo`);
- :mod:`agents.dialogue_ppo`: RLHF PPO on multi-turn TextDialogue episodes (:class:`DialoguePPOConfig`,
  :func:`train_dialogue_ppo`);
- :mod:`agents.dpo`: DPO, IPO and cDPO (:class:`DPOConfig`, :func:`train_dpo`);
- :mod:`agents.grpo`: GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++ (:class:`GRPOConfig`, :func:`train_grpo`);
- :mod:`agents.evaluate`: gold reward, KL, win rates, Elo (:class:`EvalConfig`, :func:`evaluate_models`);
- :mod:`agents.pipeline`: the whole recipe (:class:`PipelineConfig`, :func:`run_pipeline`).

The names are imported on first use, so ``import agents`` (and ``import rlhf_envs``) stay light.
The name ``agents`` is also taken by the ``openai-agents`` distribution: the ``rlhf`` command checks
:data:`__rlhf_gym__` and says what to do when another package answers to ``import agents``.
"""

from __future__ import annotations

import importlib
from typing import Any

__rlhf_gym__ = True
"""Marks this package as rlhf-gym's (see :mod:`rlhf_envs.launcher`)."""

_EXPORTS = {
    "PPOConfig": "ppo", "train_ppo": "ppo",
    "PretrainConfig": "pretrain", "train_pretrain": "pretrain",
    "SFTConfig": "sft", "train_sft": "sft",
    "RewardModelConfig": "reward_model", "train_reward_model": "reward_model",
    "LMPPOConfig": "lm_ppo", "train_lm_ppo": "lm_ppo",
    "DPOConfig": "dpo", "train_dpo": "dpo",
    "DialoguePPOConfig": "dialogue_ppo", "train_dialogue_ppo": "dialogue_ppo",
    "GRPOConfig": "grpo", "train_grpo": "grpo",
    "EvalConfig": "evaluate", "evaluate_models": "evaluate",
    "PipelineConfig": "pipeline", "run_pipeline": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
