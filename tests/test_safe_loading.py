"""Safe loading: model code shipped in a directory never runs unless asked for, and nothing we load
is ever unpickled with arbitrary globals (safetensors, or ``torch.load(weights_only=True)``)."""

from __future__ import annotations

import ast
import json
import os
import pickle
import sys
from pathlib import Path

import gymnasium as gym
import pytest
import torch

import rlhf_envs  # noqa: F401
from tests.tiny_models import tiny_causal_lm

ROOT = Path(__file__).resolve().parent.parent
AUTO_MAP = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel", "AutoModelForCausalLM": "evil.EvilModel",
            "AutoModelForSequenceClassification": "evil.EvilModel"}


def count_a(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(r.count("a")) for r in responses]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, save_tiny_lm):
    return save_tiny_lm(tmp_path_factory.mktemp("safe") / "tiny")


@pytest.fixture
def remote_code_dir(saved, tmp_path):
    """A valid tiny GPT-2 directory plus ``auto_map`` and an ``evil.py`` that leaves a mark when imported."""
    path = tmp_path / "remote"
    path.mkdir()
    for item in saved.iterdir():
        (path / item.name).write_bytes(item.read_bytes())
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "auto_map": AUTO_MAP}))
    mark = tmp_path / "REMOTE_CODE_RAN"
    (path / "evil.py").write_text(
        f"open({str(mark)!r}, 'w').write('pwned')\n"
        "from transformers import GPT2Config as EvilConfig, GPT2LMHeadModel as EvilModel\n")
    return path, mark


class Payload:
    """Unpickling this object runs ``os.system`` (a classic malicious-checkpoint payload)."""

    def __init__(self, mark: Path):
        self.mark = mark

    def __reduce__(self):
        return os.system, (f"touch {self.mark}",)


@pytest.fixture
def pickle_dir(saved, tmp_path):
    """A tiny GPT-2 directory whose only weights are a ``pytorch_model.bin`` carrying a payload."""
    path = tmp_path / "pickled"
    path.mkdir()
    for item in saved.iterdir():
        if item.name != "model.safetensors":
            (path / item.name).write_bytes(item.read_bytes())
    mark = tmp_path / "PICKLE_RAN"
    weights = dict(tiny_causal_lm(seed=0)[0].state_dict())
    torch.save({**weights, "payload": Payload(mark)}, path / "pytorch_model.bin")
    return path, mark


def _loaders(path: Path, out: Path) -> dict:
    """Every way the product loads a model directory, as zero-argument calls."""
    from agents.dpo import DPOConfig, train_dpo
    from agents.lm_ppo import LMPPOConfig, train_lm_ppo
    from agents.reward_model import RewardModelConfig, train_reward_model
    from agents.sft import SFTConfig, train_sft
    from rlhf_envs.lm.loading import load_causal_lm
    from rlhf_envs.rewards import make_reward_model

    data = out.parent / "data.jsonl"
    data.write_text(json.dumps({"prompt": "p", "completion": " a", "chosen": " a", "rejected": " b"}) + "\n")
    common = {"model_path": str(path), "data_path": str(data), "output_dir": str(out), "progress": False,
              "device": "cpu"}
    return {
        "load_causal_lm": lambda: load_causal_lm(path),
        "learned-reward-plugin": lambda: make_reward_model("learned", path=str(path)),
        "TextBandit-model-path": lambda: gym.make("TextBandit-v0", model=str(path), reward_model=count_a,
                                                  prompts=["hi"]),
        "TextToken-model-path": lambda: gym.make("TextToken-v0", model=str(path), reward_model=count_a, prompts=["hi"]),
        "TextBandit-learned-reward": lambda: gym.make("TextBandit-v0", model=tiny_causal_lm(seed=0), prompts=["hi"],
                                                      reward_model="learned", reward_kwargs={"path": str(path)}),
        "train_sft": lambda: train_sft(SFTConfig(**common)),
        "train_dpo": lambda: train_dpo(DPOConfig(**common)),
        "train_reward_model": lambda: train_reward_model(RewardModelConfig(**common)),
        "train_lm_ppo": lambda: train_lm_ppo(LMPPOConfig(model_path=str(path), output_dir=str(out), total_episodes=4,
                                                         batch_size=4, num_minibatches=1, progress=False)),
    }


LOADERS = ["load_causal_lm", "learned-reward-plugin", "TextBandit-model-path", "TextToken-model-path",
           "TextBandit-learned-reward", "train_sft", "train_dpo", "train_reward_model", "train_lm_ppo"]


@pytest.mark.parametrize("loader", LOADERS)
def test_remote_code_is_refused_by_every_loader(loader, remote_code_dir, tmp_path):
    path, mark = remote_code_dir
    modules = set(sys.modules)
    with pytest.raises(ValueError, match=r"has auto_map .*evil\.EvilModel.*pass trust_remote_code=True"):
        _loaders(path, tmp_path / "out")[loader]()
    assert not mark.exists(), "the model directory's code ran"
    assert not any("evil" in name for name in set(sys.modules) - modules)
    assert not (tmp_path / "out").exists()


def test_remote_code_refused_by_the_cli(remote_code_dir, tmp_path, capsys):
    from agents.cli import main

    path, mark = remote_code_dir
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "completion": " a"}\n')
    code = main(["sft", "--model-path", str(path), "--data-path", str(tmp_path / "d.jsonl"), "--output-dir",
                 str(tmp_path / "out"), "--no-progress"])
    assert code == 2 and not mark.exists() and not (tmp_path / "out").exists()
    err = capsys.readouterr().err
    assert err.startswith("rlhf sft: error: ") and "auto_map" in err and "--trust-remote-code" in err


@pytest.mark.parametrize("loader", ["load_causal_lm", "TextBandit-model-path", "train_sft"])
def test_pickled_weights_with_a_payload_are_never_unpickled(loader, pickle_dir, tmp_path):
    path, mark = pickle_dir
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _loaders(path, tmp_path / "out")[loader]()
    assert not mark.exists(), "a pickle payload ran"


def test_pickled_reward_model_weights_are_never_unpickled(pickle_dir, tmp_path):
    from rlhf_envs.rewards import make_reward_model

    path, mark = pickle_dir
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        make_reward_model("learned", path=str(path))
    assert not mark.exists()


def test_checkpoint_with_a_pickle_in_place_of_safetensors_is_refused(tmp_path):
    from agents.checkpoint import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(2, 2)
    directory = save_checkpoint(tmp_path / "checkpoint-00000001", model=model, state={"step": 1})
    mark = tmp_path / "CHECKPOINT_PICKLE_RAN"
    torch.save({"weight": Payload(mark)}, directory / "model.safetensors")
    with pytest.raises(Exception) as info:
        load_checkpoint(directory, model=model)
    assert "safetensors" in type(info.value).__module__ or "header" in str(info.value).lower()
    assert not mark.exists()


# ---- the code base never unpickles ---------------------------------------------------------------------

_UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("cPickle", "load"),
               ("cPickle", "loads"), ("dill", "load"), ("dill", "loads"), ("cloudpickle", "load"),
               ("cloudpickle", "loads"), ("joblib", "load"), ("marshal", "load"), ("marshal", "loads"),
               ("pd", "read_pickle"), ("pandas", "read_pickle"), ("shelve", "open")}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _unsafe_calls(source: str) -> list[str]:
    """``torch.load`` without ``weights_only=True``, pickle-family loads, ``np.load(allow_pickle=True)``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in {"pickle", "cPickle", "dill", "cloudpickle"}:
            found += [f"line {node.lineno}: from {node.module} import {a.name}" for a in node.names
                      if a.name in {"load", "loads", "Unpickler"}]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        parts = tuple(name.rsplit(".", 1)) if "." in name else ("", name)
        if name.endswith("torch.load"):
            weights_only = _keyword(node, "weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"line {node.lineno}: {name}(...) without weights_only=True")
        elif parts in _UNPICKLERS:
            found.append(f"line {node.lineno}: {name}(...)")
        elif name in {"np.load", "numpy.load"}:
            allow = _keyword(node, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"line {node.lineno}: {name}(..., allow_pickle=...)")
    return found


def test_the_scanner_finds_what_it_looks_for():
    bad = ("import torch, pickle, numpy as np\nfrom pickle import loads\n"
           "torch.load('a')\ntorch.load('a', weights_only=False)\npickle.load(f)\nnp.load('x', allow_pickle=True)\n")
    assert len(_unsafe_calls(bad)) == 5
    assert _unsafe_calls("import torch\ntorch.load('a', weights_only=True, map_location='cpu')\n") == []


def test_code_base_never_unpickles():
    files = [p for folder in ("rlhf_envs", "agents", "benchmarks",
                              "tests") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 20
    problems = {str(p.relative_to(ROOT)): found for p in files if (found := _unsafe_calls(p.read_text()))}
    assert problems == {}, f"unsafe deserialisation: {problems}"
