"""DPO: the three losses by hand, padding-free sequence log-probs, and learning the preference."""

from __future__ import annotations

import random

import pytest
import torch
from test_data import WORDS, make_tiny_lm, write_jsonl

from agents.dpo import DPO_LOSSES, DPOConfig, dpo_metrics, sequence_logps, train_dpo
from rlhf_envs.lm.loading import load_causal_lm
from rlhf_envs.lm.padded import batch_sequences, split_lm_head


def test_losses_by_hand():
    h = torch.tensor([1.0, -3.0])
    # sigmoid, beta 0.5: -log sigmoid(0.5) = 0.474077, -log sigmoid(-1.5) = 1.701413
    assert DPO_LOSSES["sigmoid"](h, 0.5, 0.0).tolist() == pytest.approx([0.474077, 1.701413], abs=1e-6)
    # cdpo, eps 0.1: 0.9 * 0.474077 + 0.1 * (-log sigmoid(-0.5) = 0.974077) = 0.524077
    assert DPO_LOSSES["cdpo"](h, 0.5, 0.1)[0].item() == pytest.approx(0.524077, abs=1e-6)
    # ipo, beta 0.25: (1 - 2)^2 = 1 and (-3 - 2)^2 = 25
    assert DPO_LOSSES["ipo"](h, 0.25, 0.0).tolist() == pytest.approx([1.0, 25.0])


def test_metrics_use_trl_names_and_beta_scaled_rewards():
    metrics = dpo_metrics(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -2.0]),
                          torch.tensor([-2.0, -2.0]), beta=0.5)
    # chosen rewards 0.5 * (1, 0), rejected 0.5 * (-1, 1): margins (1, -0.5)
    expected = {"rewards/chosen": 0.25, "rewards/rejected": 0.0, "rewards/accuracies": 0.5,
                "rewards/margins": 0.25, "logps/chosen": -1.5, "logps/rejected": -2.0}
    assert {k: v.item() for k, v in metrics.items()} == pytest.approx(expected)


def test_concatenated_forward_equals_separate_ones(tmp_path):
    model, _ = load_causal_lm(make_tiny_lm(tmp_path / "lm"))
    split = split_lm_head(model)
    seqs = [torch.tensor([3, 4, 5, 1]), torch.tensor([3, 4, 6, 7, 8, 9, 1])]
    prompt_lengths = torch.tensor([2, 2])
    together = sequence_logps(model, split, *batch_sequences(seqs, prompt_lengths, 0, torch.device("cpu")))
    for i in range(2):
        alone = sequence_logps(model, None, *batch_sequences(seqs[i : i + 1], prompt_lengths[i : i + 1], 0,
                                                             torch.device("cpu")))
        logits = model(input_ids=seqs[i][None]).logits[0, :-1].log_softmax(-1)
        by_hand = logits[torch.arange(1, len(seqs[i]) - 1), seqs[i][2:]].sum()
        assert together[i].item() == pytest.approx(alone.item(), abs=1e-5)
        assert together[i].item() == pytest.approx(by_hand.item(), abs=1e-5)


def _pairs(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choice(WORDS) for _ in range(3)),
             "chosen": "it was great", "rejected": "it was awful"} for _ in range(n)]


@pytest.mark.parametrize(("loss_type", "label_smoothing"), [("sigmoid", 0.0), ("cdpo", 0.1), ("ipo", 0.0)])
def test_dpo_learns_the_preference(tmp_path, loss_type, label_smoothing):
    lm = make_tiny_lm(tmp_path / "lm")
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(96, seed=0))
    config = DPOConfig(model_path=str(lm), data_path=str(data), output_dir=str(tmp_path / "dpo"), num_epochs=4,
                       batch_size=16, learning_rate=3e-3, beta=0.5, loss_type=loss_type,
                       label_smoothing=label_smoothing,
                       eval_fraction=0.125, log_every=1, torch_threads=1, progress=False)
    result = train_dpo(config)
    # the reference is the initial policy: the held-out reward margin starts at 0 and grows, for
    # IPO to its fixed point beta * h = beta / (2 beta) = 0.5
    assert result.metrics["eval/rewards/accuracies"] == 1.0
    if loss_type == "ipo":
        assert result.metrics["eval/rewards/margins"] == pytest.approx(0.5, abs=0.1)
    else:
        assert result.metrics["eval/rewards/margins"] > 2.0
    policy, tokenizer = load_causal_lm(tmp_path / "dpo")
    reference, _ = load_causal_lm(lm)
    great, awful = tokenizer.convert_tokens_to_ids(["great", "awful"])

    def log_odds(model: torch.nn.Module) -> float:
        """log pi(great) - log pi(awful) after an unseen prompt and "it was"."""
        logits = model(**tokenizer("the film was it was", return_tensors="pt")).logits[0, -1]
        return (logits[great] - logits[awful]).item()

    assert log_odds(policy) > log_odds(reference) + (0.2 if loss_type == "ipo" else 1.0)


def test_config_validation():
    with pytest.raises(ValueError, match="set loss_type='cdpo' or label_smoothing=0"):
        DPOConfig(data_path="x.jsonl", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \(0, 0.5\)"):
        DPOConfig(data_path="x.jsonl", loss_type="cdpo")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        DPOConfig(data_path="x.jsonl", loss_type="hinge")
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPOConfig(data_path="x.jsonl", beta=0.0)


def test_separate_reference_equals_the_default_reference(tmp_path):
    lm = make_tiny_lm(tmp_path / "lm")
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(32, seed=0))
    common = dict(model_path=str(lm), data_path=str(data), batch_size=8, learning_rate=3e-3, eval_fraction=0.0,
                  torch_threads=1, progress=False)
    own = train_dpo(DPOConfig(output_dir=str(tmp_path / "own"), **common))
    separate = train_dpo(DPOConfig(output_dir=str(tmp_path / "separate"), ref_model_path=str(lm), **common))
    assert separate.metrics["loss"] == pytest.approx(own.metrics["loss"], abs=1e-6)
    assert separate.metrics["rewards/margins"] == pytest.approx(own.metrics["rewards/margins"], abs=1e-6)


def test_reference_logps_equal_the_untrained_policys_in_every_batch(tmp_path):
    """The reference pass (inference, prompts shared by all their pairs, any order) and the training
    forward agree: with a learning rate too small to move a weight, every batch's loss is log 2."""
    import json
    import math

    rng = random.Random(1)
    pairs = []
    for _ in range(12):  # four pairs per prompt, responses of different lengths
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        for _ in range(4):
            pairs.append({"prompt": prompt, "chosen": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))),
                          "rejected": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))})
    rng.shuffle(pairs)
    lm = make_tiny_lm(tmp_path / "lm")
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    train_dpo(DPOConfig(model_path=str(lm), data_path=str(data), output_dir=str(tmp_path / "dpo"), batch_size=8,
                        learning_rate=1e-30, eval_fraction=0.0, log_every=1, torch_threads=1, progress=False))
    logged = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in logged if "loss" in row]
    assert len(losses) == 6
    for row in logged:
        if "loss" in row:
            assert row["loss"] == pytest.approx(math.log(2), abs=1e-6)
            assert abs(row["rewards/margins"]) < 1e-6
