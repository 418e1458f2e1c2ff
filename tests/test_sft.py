"""SFT: the loss by hand, completion-only training that learns, exact resume, loadable output."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from test_data import make_tiny_lm, write_jsonl

from agents.lm_common import fuse_gelu
from agents.sft import SFTConfig, sft_loss, train_sft
from rlhf_envs.lm.loading import load_causal_lm
from rlhf_envs.lm.padded import batch_sequences, split_lm_head, target_logits

SUBJECTS = ["food", "film", "hotel", "service", "room", "story"]
VERDICTS = ["very good", "quite bad", "really great", "not fine", "okay and plain", "awful but fine"]


def _demonstrations(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"the {SUBJECTS[i % 6]} was", "completion": VERDICTS[i % 6]} for i in range(n)]


def test_sft_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # -log(1/2) = 0.693147 and -log(3/4) = 0.287682; their mean is 0.490415
    assert sft_loss(logits, torch.tensor([0, 0])).item() == pytest.approx(0.4904146, abs=1e-6)


def test_head_only_on_targets_matches_full_logits(tmp_path):
    model, tokenizer = load_causal_lm(make_tiny_lm(tmp_path / "lm"))
    seqs = [torch.tensor([3, 4, 5, 6, 1]), torch.tensor([7, 8, 1])]
    batch = batch_sequences(seqs, torch.tensor([2, 1]), tokenizer.pad_token_id, torch.device("cpu"))
    split = split_lm_head(model)
    assert split is not None
    fast, targets, rows = target_logits(model, split, *batch)
    full, full_targets, _ = target_logits(model, None, *batch)
    assert torch.allclose(fast, full, atol=1e-5)
    assert targets.tolist() == full_targets.tolist() == [5, 6, 1, 8, 1]
    assert rows.tolist() == [0, 0, 0, 1, 1]
    assert fuse_gelu(model) == 2
    assert not any("NewGELU" in type(m).__name__ for m in model.modules())
    fused, _, _ = target_logits(model, split, *batch)
    assert torch.allclose(fused, full, atol=1e-5)


def test_sft_learns_completions(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", _demonstrations(96))
    config = SFTConfig(model_path=str(make_tiny_lm(tmp_path / "lm")), data_path=str(data),
                       output_dir=str(tmp_path / "out"),
                       num_epochs=12, batch_size=16, learning_rate=1e-2, eval_fraction=0.125, eval_every=5,
                       torch_threads=1, progress=False)
    result = train_sft(config)
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    first_eval = next(line["eval/loss"] for line in lines if "eval/loss" in line)
    # a random 31-word model starts near log(31) = 3.4 nats; the completions are determined by the prompt
    assert first_eval > 2.0
    assert result.metrics["eval/loss"] < 0.3
    assert result.global_step == 12 * 6 and result.samples_seen == 12 * 84
    model, tokenizer = load_causal_lm(tmp_path / "out")
    prompt = tokenizer("the hotel was", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, 3:], skip_special_tokens=True) == "really great"


def test_resume_reaches_the_same_weights(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", _demonstrations(40))
    lm = make_tiny_lm(tmp_path / "lm", dropout=0.1)
    common = dict(model_path=str(lm), data_path=str(data), batch_size=8, max_steps=8, num_epochs=2,
                  checkpoint_every=3, keep_checkpoints=5, eval_fraction=0.0, log_every=1, torch_threads=1,
                  progress=False)
    train_sft(SFTConfig(output_dir=str(tmp_path / "a"), **common))
    # the crashed run: a copy of run "a" as it was right after its step-3 checkpoint
    crashed = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "checkpoint-00000003",
                    crashed / "checkpoints" / "checkpoint-00000003")
    shutil.copy(tmp_path / "a" / "metrics.jsonl", crashed / "metrics.jsonl")
    result = train_sft(SFTConfig(output_dir=str(crashed), resume=True, **common))
    assert result.global_step == 8 and result.samples_seen == 8 * 8
    a, _ = load_causal_lm(tmp_path / "a")
    b, _ = load_causal_lm(crashed)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    steps = [json.loads(line).get("step") for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert steps[:8] == list(range(1, 9))
    assert [p.name for p in sorted((crashed / "checkpoints").iterdir())] == ["checkpoint-00000003",
                                                                             "checkpoint-00000006"]
    with pytest.raises(ValueError, match="batch_size: 8 then, 4 now"):
        train_sft(SFTConfig(output_dir=str(crashed), resume=True, **{**common, "batch_size": 4}))


def test_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match="data_path is empty"):
        SFTConfig()
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        SFTConfig(data_path="x.jsonl", batch_size=0)
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        SFTConfig(data_path="x.jsonl", lr_schedule="step")


@pytest.mark.parametrize("has_bf16", [True, False])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(monkeypatch, has_bf16):
    import warnings

    import agents.lm_common
    from agents.lm_common import start_run

    monkeypatch.setattr(agents.lm_common, "cpu_has_bf16", lambda: has_bf16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start_run(SFTConfig(data_path="d.jsonl", device="cpu", bf16=True))
        start_run(SFTConfig(data_path="d.jsonl", device="cpu"))  # float32: never a word
    emulated = [w for w in caught if "emulated" in str(w.message)]
    assert len(emulated) == (0 if has_bf16 else 1)


def test_bf16_on_cpu_caps_the_onednn_primitive_cache_unless_set(monkeypatch):
    from agents.lm_common import ONEDNN_CACHE_VARIABLE, start_run

    monkeypatch.delenv(ONEDNN_CACHE_VARIABLE, raising=False)
    start_run(SFTConfig(data_path="d.jsonl", device="cpu"))
    assert ONEDNN_CACHE_VARIABLE not in os.environ  # float32 leaves oneDNN alone
    start_run(SFTConfig(data_path="d.jsonl", device="cpu", bf16=True))
    assert os.environ[ONEDNN_CACHE_VARIABLE] == "0"
    monkeypatch.setenv(ONEDNN_CACHE_VARIABLE, "16")
    start_run(SFTConfig(data_path="d.jsonl", device="cpu", bf16=True))
    assert os.environ[ONEDNN_CACHE_VARIABLE] == "16"  # the user's setting wins
