"""rlhf_envs: RLHF as Gymnasium environments.

Importing this package registers every environment with Gymnasium. Without the
import, ``gym.make("rlhf_envs:CatGrid-v0")`` imports it first (Gymnasium's
``module:id`` form), so both spellings work.

Registration is lazy: entry points are ``"module:Class"`` strings, and the public names below are
imported on first use, so importing ``rlhf_envs`` does not import torch or transformers.

Public names: the env classes, :mod:`~rlhf_envs.catgrid_solver`, the reward-model plugin interface
(:func:`make_reward_model`, :func:`register_reward_model`, :func:`available_reward_models`), and the model
loaders (:func:`load_causal_lm`, :func:`load_tokenizer`). Model-level code lives in :mod:`rlhf_envs.lm`.
"""

from __future__ import annotations

import importlib
from typing import Any

from gymnasium.envs.registration import register as _gym_register
from gymnasium.envs.registration import registry as _gym_registry

__version__ = "0.1.0"

# One place for every registration (ids, maps and max_episode_steps).
_CATGRID = "rlhf_envs.catgrid:CatGridEnv"
_CATGRID_VEC = "rlhf_envs.catgrid_vector:CatGridVectorEnv"

_ENVS: list[dict] = [
    dict(id="CatGrid-v0", entry_point=_CATGRID, vector_entry_point=_CATGRID_VEC,
         max_episode_steps=100, kwargs={"map_name": "4x4", "slip": 0.0}),
    dict(id="CatGridDrunk-v0", entry_point=_CATGRID, vector_entry_point=_CATGRID_VEC,
         max_episode_steps=100, kwargs={"map_name": "4x4", "slip": 0.2}),
    dict(id="CatGrid8x8-v0", entry_point=_CATGRID, vector_entry_point=_CATGRID_VEC,
         max_episode_steps=200, kwargs={"map_name": "8x8", "slip": 0.0}),
    dict(id="CatGrid8x8Drunk-v0", entry_point=_CATGRID, vector_entry_point=_CATGRID_VEC,
         max_episode_steps=200, kwargs={"map_name": "8x8", "slip": 0.2}),
]

_TEXT_ENVS: list[dict] = [
    dict(id="TextBandit-v0", entry_point="rlhf_envs.text_bandit:TextBanditEnv",
         vector_entry_point="rlhf_envs.text_bandit:TextBanditVectorEnv"),
    dict(id="TextBanditExact-v0", entry_point="rlhf_envs.text_bandit_exact:TextBanditExactEnv",
         vector_entry_point="rlhf_envs.text_bandit_exact:TextBanditExactVectorEnv"),
    dict(id="TextArithmetic-v0", entry_point="rlhf_envs.text_arithmetic:TextArithmeticEnv",
         vector_entry_point="rlhf_envs.text_arithmetic:TextArithmeticVectorEnv"),
    dict(id="TextToken-v0", entry_point="rlhf_envs.text_token:TextTokenEnv",
         vector_entry_point="rlhf_envs.text_token:TextTokenVectorEnv"),
    dict(id="TextDialogue-v0", entry_point="rlhf_envs.text_dialogue:TextDialogueEnv",
         vector_entry_point="rlhf_envs.text_dialogue:TextDialogueVectorEnv", kwargs={"game": "guess"}),
    dict(id="TextDialogueTool-v0", entry_point="rlhf_envs.text_dialogue:TextDialogueEnv",
         vector_entry_point="rlhf_envs.text_dialogue:TextDialogueVectorEnv", kwargs={"game": "calc"}),
]


def _register_all() -> None:
    for spec in _ENVS + _TEXT_ENVS:
        if spec["id"] not in _gym_registry:
            _gym_register(**spec)


_register_all()


# public name -> (module, attribute); attribute None means the module itself.
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "CatGridEnv": ("rlhf_envs.catgrid", "CatGridEnv"),
    "CatGridVectorEnv": ("rlhf_envs.catgrid_vector", "CatGridVectorEnv"),
    "TextBanditEnv": ("rlhf_envs.text_bandit", "TextBanditEnv"),
    "TextBanditVectorEnv": ("rlhf_envs.text_bandit", "TextBanditVectorEnv"),
    "TextArithmeticEnv": ("rlhf_envs.text_arithmetic", "TextArithmeticEnv"),
    "TextArithmeticVectorEnv": ("rlhf_envs.text_arithmetic", "TextArithmeticVectorEnv"),
    "TextTokenEnv": ("rlhf_envs.text_token", "TextTokenEnv"),
    "TextTokenVectorEnv": ("rlhf_envs.text_token", "TextTokenVectorEnv"),
    "TextDialogueEnv": ("rlhf_envs.text_dialogue", "TextDialogueEnv"),
    "TextDialogueVectorEnv": ("rlhf_envs.text_dialogue", "TextDialogueVectorEnv"),
    "TextBanditExactEnv": ("rlhf_envs.text_bandit_exact", "TextBanditExactEnv"),
    "TextBanditExactVectorEnv": ("rlhf_envs.text_bandit_exact", "TextBanditExactVectorEnv"),
    "catgrid_solver": ("rlhf_envs.catgrid_solver", None),
    "text_solver": ("rlhf_envs.text_solver", None),
    "RewardModel": ("rlhf_envs.rewards", "RewardModel"),
    "RewardModelError": ("rlhf_envs.rewards", "RewardModelError"),
    "available_reward_models": ("rlhf_envs.rewards", "available_reward_models"),
    "make_reward_model": ("rlhf_envs.rewards", "make_reward_model"),
    "register_reward_model": ("rlhf_envs.rewards", "register"),
    "load_causal_lm": ("rlhf_envs.lm.loading", "load_causal_lm"),
    "load_tokenizer": ("rlhf_envs.lm.loading", "load_tokenizer"),
    "SamplingConfig": ("rlhf_envs.lm.sampling", "SamplingConfig"),
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        loaded = importlib.import_module(module)
        return loaded if attribute is None else getattr(loaded, attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
