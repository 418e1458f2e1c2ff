"""The packages' public names, the old option names that keep working, and the foreign-``agents`` check."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest


def test_public_names_import_from_the_top_level():
    import agents
    import rlhf_envs

    for package in (rlhf_envs, agents):
        assert package.__all__, package
        for name in package.__all__:
            assert getattr(package, name) is not None, (package.__name__, name)
    from agents import (  # noqa: F401  # noqa: F401
        DPOConfig,
        LMPPOConfig,
        PipelineConfig,
        PPOConfig,
        RewardModelConfig,
        SFTConfig,
        train_dpo,
        train_lm_ppo,
        train_ppo,
        train_reward_model,
        train_sft,
    )
    from rlhf_envs import (  # noqa: F401
        CatGridEnv,
        TextBanditEnv,
        TextTokenEnv,
        catgrid_solver,
        make_reward_model,
        register_reward_model,  # noqa: F401
    )


def test_rlhf_envs_does_not_leak_gymnasium_registration():
    import rlhf_envs

    assert not hasattr(rlhf_envs, "registry")
    assert rlhf_envs.register_reward_model.__module__ == "rlhf_envs.rewards"
    with pytest.raises(AttributeError):
        rlhf_envs.register  # noqa: B018


def test_importing_the_packages_loads_no_torch():
    code = "import sys, rlhf_envs, agents; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("cls, old, new, value", [
    ("agents.ppo:PPOConfig", "target_kl", "max_approx_kl", 0.02),
    ("agents.lm_ppo:LMPPOConfig", "target_kl", "kl_setpoint", 2.0),
    ("agents.pipeline:PipelineConfig", "target_kl", "kl_budget", 3.0),
    ("agents.pipeline:PipelineConfig", "beta", "ppo_beta", 0.2),
    ("agents.pipeline:PipelineConfig", "curve_points", "dpo_checkpoints", 2),
])
def test_old_config_names_warn_and_name_the_new_one(cls, old, new, value):
    import importlib

    module, name = cls.split(":")
    config_cls = getattr(importlib.import_module(module), name)
    with pytest.warns(FutureWarning, match=rf"{name}\.{old} was renamed to '{new}'"):
        config = config_cls(**{old: value})
    assert getattr(config, new) == value
    with pytest.raises(TypeError, match=rf"got both '{old}' and '{new}'"):
        config_cls(**{old: value, new: value})


def test_old_env_option_name_warns():
    import gymnasium as gym

    import rlhf_envs  # noqa: F401

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = gym.make("TextBandit-v0", target_kl=3.0, n_prompts=4, max_new_tokens=4)
    assert any("renamed to 'kl_setpoint'" in str(w.message) for w in caught)
    assert env.unwrapped.task.kl_controller.target == 3.0
    env.close()


def test_old_cli_flag_is_accepted_with_a_warning(capsys):
    from agents.cli import build_parser

    args = build_parser().parse_args(["pipeline", "--beta", "0.3", "--curve-points", "2"])
    assert args.ppo_beta == 0.3 and args.dpo_checkpoints == 2
    err = capsys.readouterr().err
    assert "--beta was renamed to --ppo-beta" in err and "--curve-points was renamed to --dpo-checkpoints" in err


def test_rlhf_refuses_a_foreign_agents_package(tmp_path):
    fake = tmp_path / "agents"
    fake.mkdir()
    (fake / "__init__.py").write_text("class Agent:\n    pass\n")  # what openai-agents' package looks like from here
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", "import sys; from rlhf_envs.launcher import main; sys.exit(main())",
                           "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert "is not rlhf-gym's" in proc.stderr and "pip uninstall openai-agents" in proc.stderr
    assert str(fake) in proc.stderr
    assert "Traceback" not in proc.stderr
