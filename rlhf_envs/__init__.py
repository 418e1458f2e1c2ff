"""rlhf_envs: RLHF as Gymnasium environments.

Importing this package registers every environment with Gymnasium. Without the
import, ``gym.make("rlhf_envs:CatGrid-v0")`` imports it first (Gymnasium's
``module:id`` form), so both spellings work.

Registration is lazy: entry points are ``"module:Class"`` strings, so importing
``rlhf_envs`` does not import torch or transformers.
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

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
    dict(id="TextToken-v0", entry_point="rlhf_envs.text_token:TextTokenEnv",
         vector_entry_point="rlhf_envs.text_token:TextTokenVectorEnv"),
]


def _register_all() -> None:
    for spec in _ENVS + _TEXT_ENVS:
        if spec["id"] not in registry:
            register(**spec)


_register_all()
