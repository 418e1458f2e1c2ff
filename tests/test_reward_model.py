"""Reward model: Bradley-Terry and K-ranking losses by hand, learning a toy preference, scores the
``learned`` plugin reproduces."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from test_data import WORDS, make_tiny_lm, write_jsonl
from transformers import AutoModelForSequenceClassification

from agents.lm_common import held_out_split
from agents.reward_model import RewardModelConfig, bradley_terry_loss, ranking_loss, ranking_pairs, train_reward_model
from rlhf_envs.rewards import LearnedReward


def test_bradley_terry_loss_by_hand():
    # -log sigmoid(1) = 0.313262, -log sigmoid(-2) = 2.126928; mean 1.220095
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]))
    assert loss.item() == pytest.approx(1.2200952, abs=1e-6)


def test_ranking_loss_is_the_mean_over_explicit_pairs():
    scores = torch.tensor([2.0, 0.5, -1.0, 0.3, 0.7])  # a prompt with K = 3 (best first), one with K = 2
    better, worse, weight = ranking_pairs([3, 2])
    assert better.tolist() == [0, 0, 1, 3] and worse.tolist() == [1, 2, 2, 4]
    first = np.mean([-math.log(1 / (1 + math.exp(-d))) for d in (2.0 - 0.5, 2.0 + 1.0, 0.5 + 1.0)])
    second = -math.log(1 / (1 + math.exp(-(0.3 - 0.7))))
    expected = (first + second) / 2
    # by hand: pairs of the first prompt 0.201413, 0.048587, 0.201413 -> 0.150471; second 0.913015
    assert expected == pytest.approx((0.150471 + 0.913015) / 2, abs=1e-6)
    assert ranking_loss(scores, better, worse, weight).item() == pytest.approx(expected, abs=1e-6)
    pair = ranking_pairs([2])
    assert ranking_loss(scores[:2], *pair).item() == pytest.approx(bradley_terry_loss(scores[:1], scores[1:2]).item())


def _toy_preferences(n: int, seed: int) -> list[dict]:
    """The preferred response contains "great"; K = 2 pairs and K = 3 rankings (more "great" ranks higher)."""
    rng = random.Random(seed)
    plain = [w for w in WORDS if w != "great"]
    rows = []
    for i in range(n):
        words = [rng.choice(plain) for _ in range(4)]
        prompt = " ".join(rng.choice(plain) for _ in range(3))
        with_great = list(words)
        with_great[rng.randrange(4)] = "great"
        if i % 2:
            rows.append({"prompt": prompt, "chosen": " " + " ".join(with_great), "rejected": " " + " ".join(words)})
        else:
            two = list(with_great)
            two[(with_great.index("great") + 1) % 4] = "great"
            rows.append({"prompt": prompt, "responses": [" " + " ".join(r) for r in (two, with_great, words)]})
    return rows


def test_reward_model_learns_a_toy_preference(tmp_path):
    lm = make_tiny_lm(tmp_path / "lm")
    rows = _toy_preferences(320, seed=0)
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    config = RewardModelConfig(model_path=str(lm), data_path=str(data), output_dir=str(tmp_path / "rm"), num_epochs=4,
                               batch_size=16, learning_rate=3e-3, eval_fraction=0.2, torch_threads=1, progress=False)
    result = train_reward_model(config)
    assert result.metrics["eval/accuracy"] >= 0.9
    # training pads on the left (rlhf_envs.lm's tokenizers do); the learned plugin pads on the right
    # and must rank held-out texts the same way and score a text alone as in a batch
    reward = LearnedReward(tmp_path / "rm", batch_size=7)
    held_out = _toy_preferences(40, seed=1)
    prompts = [r["prompt"] for r in held_out]
    better = reward.score(prompts, [r.get("chosen") or r["responses"][0] for r in held_out])
    worse = reward.score(prompts, [r.get("rejected") or r["responses"][-1] for r in held_out])
    assert (better > worse).mean() >= 0.9
    # exactly the score training computes: the model's logits[:, 0] on the unpadded text, normalised by
    # the mean and spread over the training responses (InstructGPT's normalisation), or raw if asked
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", local_files_only=True).eval()
    ids = reward.tokenizer(prompts[0] + " great story", return_tensors="pt")["input_ids"]
    logit = model(input_ids=ids).logits[0, 0].item()
    stats = json.loads((tmp_path / "rm" / "reward_normalization.json").read_text())
    responses = [(r["prompt"], y) for r in rows for y in (r["responses"] if "responses" in r else (r["chosen"],
                                                                                                   r["rejected"]))]
    assert stats["n"] == len(responses) and stats["std"] > 0
    assert reward.score(prompts[:1], [" great story"])[0] == pytest.approx((logit - stats["mean"]) / stats["std"],
                                                                           abs=1e-5)
    raw = LearnedReward(tmp_path / "rm", normalize=False)
    assert raw.score(prompts[:1], [" great story"])[0] == pytest.approx(logit, abs=1e-5)
    train_scores = reward.score([p for p, _ in responses], [y for _, y in responses])
    assert abs(train_scores.mean()) < 0.05 and train_scores.std() == pytest.approx(1.0, abs=0.05)
    alone = np.concatenate(
        [reward.score([p], [r]) for p, r in zip(prompts[:5], [" great"] * 2 + [" the very long story was good"] * 3)]
    )
    batched = reward.score(prompts[:5], [" great"] * 2 + [" the very long story was good"] * 3)
    np.testing.assert_allclose(alone, batched, atol=1e-5)


def test_held_out_split_by_prompt_keeps_each_prompt_on_one_side():
    prompts = [f"prompt {i % 7}" for i in range(60)]  # 7 prompts, each asked 8 or 9 times
    train, held = held_out_split(len(prompts), 0.2, seed=3, groups=prompts)
    assert sorted(train + held) == list(range(60)) and len(held) >= 12
    assert not {prompts[i] for i in train} & {prompts[i] for i in held}
    # every key distinct: exactly the split without groups
    assert held_out_split(50, 0.1, seed=3, groups=[f"p{i}" for i in range(50)]) == held_out_split(50, 0.1, seed=3)
    with pytest.raises(ValueError, match="whole groups of 1"):
        held_out_split(10, 0.1, seed=0, groups=["same"] * 10)
