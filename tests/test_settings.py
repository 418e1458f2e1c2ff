"""Every config and env setting: NaN, inf and wrong types refused before anything runs; NumPy integers accepted."""

from __future__ import annotations

import json
from dataclasses import asdict

import gymnasium as gym
import numpy as np
import pytest

import rlhf_envs  # noqa: F401
from rlhf_envs.validation import check_number
from tests.tiny_models import tiny_causal_lm


def test_numpy_integers_are_accepted_for_integer_settings_and_stored_as_int():
    from agents.lm_ppo import LMPPOConfig
    from rlhf_envs.lm.sampling import SamplingConfig

    env = gym.make("TextBandit-v0", model=tiny_causal_lm(), prompts=["hi"], max_new_tokens=np.int64(4),
                   top_k=np.int32(5),
                   beta=np.float32(0.1))
    sampling = env.unwrapped.task.sampling
    assert (sampling.max_new_tokens, sampling.top_k) == (4, 5) and type(sampling.top_k) is int
    assert env.action_space.shape == (4,)
    config = LMPPOConfig(batch_size=np.int64(8), num_minibatches=np.int8(2), beta=np.float32(0.5))
    assert type(config.batch_size) is int and type(config.beta) is float
    json.dumps(asdict(config), default=str)
    assert SamplingConfig(top_k=np.uint8(3)).top_k == 3


@pytest.mark.parametrize("value, kind, error, message", [
    (float("nan"), float, ValueError, "x must be a finite number, got nan"),
    (float("-inf"), float, ValueError, "x must be a finite number, got -inf"),
    ("0.1", float, TypeError, "x must be a finite number, got str '0.1'; pass x=0.1, not a string"),
    (True, float, TypeError, "x must be a finite number, got bool True"),
    (2.0, int, TypeError, "x must be an integer, got float 2.0"),
    (None, float, TypeError, "x must be a finite number, got NoneType None"),
])
def test_check_number_refuses(value, kind, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_number(value, "x", kind)


def test_every_config_dataclass_checks_its_fields():
    """Every *Config of the project runs the shared check (a NaN float field is refused, naming the class)."""
    import dataclasses
    import importlib

    configs = {"agents.lm_ppo:LMPPOConfig": {}, "agents.ppo:PPOConfig": {}, "agents.sft:SFTConfig": {"data_path": "d"},
               "agents.reward_model:RewardModelConfig": {"data_path": "d"}, "agents.dpo:DPOConfig": {"data_path": "d"},
               "agents.evaluate:EvalConfig": {"models": {"sft": "x"}}, "agents.pipeline:PipelineConfig": {},
               "rlhf_envs.lm.sampling:SamplingConfig": {}, "rlhf_envs.lm.build_embedded:BuildConfig": {}}
    for path, required in configs.items():
        module, name = path.split(":")
        cls = getattr(importlib.import_module(module), name)
        floats = [f.name for f in dataclasses.fields(cls) if f.type in ("float", "float | None")]
        assert floats, name
        for field_name in floats:
            with pytest.raises(ValueError, match=rf"^{name}\.{field_name} must be a finite number"):
                cls(**required, **{field_name: float("nan")})
