"""Checkpoints round-trip exactly, are written atomically, and torn ones are never picked."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import agents.checkpoint as checkpoint
from agents.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint


def _trained(seed: int):
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    for _ in range(3):
        ids = torch.randint(0, 20, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    model, optimizer, scheduler = _trained(seed=0)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path / "checkpoint-00000003", model=model, optimizer=optimizer, scheduler=scheduler,
                    state={"epoch": 1, "step": 3, "note": "hi"})
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(())))

    other, other_opt, other_sched = _trained(seed=1)
    other_sched.step()
    state = load_checkpoint(latest_checkpoint(tmp_path), model=other, optimizer=other_opt, scheduler=other_sched)

    assert state == {"epoch": 1, "step": 3, "note": "hi"}
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected_draws
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert other.lm_head.weight.data_ptr() == other.transformer.wte.weight.data_ptr()
    saved, loaded = optimizer.state_dict(), other_opt.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]
    assert other_opt.param_groups[0]["betas"] == (0.8, 0.95)
    for index, values in saved["state"].items():
        for key, value in values.items():
            assert torch.equal(loaded["state"][index][key], value), (index, key)
    assert other_sched.state_dict() == scheduler.state_dict()
    assert sorted(p.name for p in (tmp_path / "checkpoint-00000003").iterdir()) == [
        "checkpoint.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors"]


def test_model_only_checkpoint_and_overwrite(tmp_path):
    model, _, _ = _trained(seed=0)
    target = tmp_path / "checkpoint-00000001"
    save_checkpoint(target, model=model, state={"step": 1})
    save_checkpoint(target, model=model, state={"step": 2})
    assert load_checkpoint(target, model=_trained(seed=1)[0]) == {"step": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-00000001"]
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(target, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_torn_checkpoints_are_ignored(tmp_path, monkeypatch):
    model, optimizer, scheduler = _trained(seed=0)
    save_checkpoint(tmp_path / "checkpoint-00000005", model=model, optimizer=optimizer, scheduler=scheduler,
                    state={"step": 5})
    # a crash while writing step 10 leaves no checkpoint-00000010 and no temporary directory
    def crash(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "_fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "checkpoint-00000010", model=model, optimizer=optimizer, state={"step": 10})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-00000005"]
    # directories torn by other means: a leftover temporary, a file missing, an unreadable JSON
    save_checkpoint(tmp_path / "checkpoint-00000020", model=model, state={"step": 20})
    (tmp_path / "checkpoint-00000020").rename(tmp_path / ".checkpoint-00000020.abc.tmp")
    save_checkpoint(tmp_path / "checkpoint-00000030", model=model, state={"step": 30})
    (tmp_path / "checkpoint-00000030" / "checkpoint.json").unlink()
    save_checkpoint(tmp_path / "checkpoint-00000040", model=model, state={"step": 40})
    (tmp_path / "checkpoint-00000040" / "checkpoint.json").write_text('{"format": 1, "sta')
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000005"
    assert latest_checkpoint(tmp_path / "absent") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "checkpoint-00000030", model=model)


def test_state_must_be_json_and_pruning_keeps_newest(tmp_path):
    model, _, _ = _trained(seed=0)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "checkpoint-00000001", model=model, state={"tensor": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == []
    for step in (1, 2, 3):
        save_checkpoint(tmp_path / f"checkpoint-{step:08d}", model=model, state={"step": step})
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-00000002", "checkpoint-00000003"]
    assert json.loads((tmp_path / "checkpoint-00000003" / "checkpoint.json").read_text())["state"] == {"step": 3}
