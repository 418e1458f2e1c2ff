"""LoRA for every LM trainer: PPO learns with the reference as the same weights with the adapters off (one copy
of the base weights), and SFT and the reward model save the merged model beside its adapters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

import agents.lm_ppo as lm_ppo  # noqa: E402
from agents.data import write_jsonl  # noqa: E402


def test_lora_ppo_learns_and_holds_one_copy_of_the_base_weights(tmp_path, monkeypatch):
    made = {}

    def spy(config, num_envs, reference=None):
        made["env"] = make_env(config, num_envs, reference)
        return made["env"]

    make_env = lm_ppo._make_env
    monkeypatch.setattr(lm_ppo, "_make_env", spy)
    config = lm_ppo.LMPPOConfig(output_dir=str(tmp_path), batch_size=32, max_new_tokens=8, total_episodes=32 * 12,
                                learning_rate=1e-3, beta=0.01, lora_r=8, lora_alpha=16.0, torch_threads=1,
                                progress=False)
    result = lm_ppo.train_lm_ppo(config)  # the embedded model, the sentiment reward: about 5 s
    scores = [row["objective/scores"] for row in result.history]
    kls = [row["objective/kl"] for row in result.history]
    assert kls[0] == pytest.approx(0.0, abs=1e-5)  # adapters start at zero: the policy is the reference
    assert np.mean(scores[:2]) < 0.15 and np.mean(scores[-3:]) > 0.4, scores
    assert max(kls) < 5.0, kls

    task = made["env"].unwrapped.task
    assert task.adapters_off
    policy = task.ref_model  # the env's reference is the policy's peft model itself
    assert hasattr(policy, "disable_adapter")
    base = {p.data_ptr() for name, p in policy.named_parameters() if "lora_" not in name}
    env_tensors = {p.data_ptr() for p in task.ref_model.parameters()}
    assert base <= env_tensors and len(env_tensors - base) == sum("lora_" in n for n, _ in policy.named_parameters())

    from peft import PeftModel

    from rlhf_envs.lm.loading import load_causal_lm

    merged, _ = load_causal_lm(str(tmp_path / "policy"))
    adapted = PeftModel.from_pretrained(load_causal_lm(None)[0], str(tmp_path / "policy" / "adapter")).eval()
    ids = torch.tensor([[0, 5, 9, 30, 41]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_lora_ppo_refuses_a_separate_reference():
    with pytest.raises(ValueError, match="adapters off as the reference"):
        lm_ppo.LMPPOConfig(lora_r=4, ref_model_path="somewhere")


def _adapter_and_merged(out):
    assert (out / "adapter" / "adapter_config.json").is_file() and (
        out / "adapter" / "adapter_model.safetensors"
    ).is_file()
    assert (out / "model.safetensors").is_file()


def test_lora_sft_trains_the_adapters_and_saves_them_merged(tmp_path):
    from peft import PeftModel

    from agents.sft import SFTConfig, train_sft
    from rlhf_envs.corpus import make_demonstrations
    from rlhf_envs.lm.loading import load_causal_lm

    data = write_jsonl(tmp_path / "sft.jsonl", make_demonstrations(64, seed=0))
    out = tmp_path / "sft"
    result = train_sft(
        SFTConfig(
            data_path=str(data),
            output_dir=str(out),
            batch_size=16,
            max_steps=4,
            lora_r=4,
            learning_rate=1e-2,
            eval_fraction=0.0,
            torch_threads=1,
            progress=False,
            device="cpu",
        )
    )
    assert result.global_step == 4
    _adapter_and_merged(out)
    merged, _ = load_causal_lm(str(out))
    base = load_causal_lm(None)[0]
    adapted = PeftModel.from_pretrained(load_causal_lm(None)[0], str(out / "adapter")).eval()
    ids = torch.tensor([[0, 5, 9, 30, 41]])
    with torch.no_grad():
        assert not torch.allclose(merged(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4)
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_lora_reward_model_trains_its_head_and_saves_merged(tmp_path):
    from agents.reward_model import RewardModelConfig, train_reward_model
    from rlhf_envs.rewards import LearnedReward

    good, bad = (
        ["a great film", "wonderful acting", "a lovely story"],
        ["a terrible film", "awful acting", "a dull story"],
    )
    rows = [{"prompt": "review:", "chosen": " " + g, "rejected": " " + b} for g, b in zip(good, bad)] * 16
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    out = tmp_path / "rm"
    train_reward_model(
        RewardModelConfig(
            data_path=str(data),
            output_dir=str(out),
            batch_size=8,
            num_epochs=3,
            lora_r=4,
            learning_rate=3e-3,
            eval_fraction=0.0,
            torch_threads=1,
            progress=False,
            device="cpu",
        )
    )
    _adapter_and_merged(out)
    reward = LearnedReward(str(out))
    scores = reward.score(["review:"] * 6, [" " + t for t in good + bad])
    assert scores[:3].min() > scores[3:].max(), scores
