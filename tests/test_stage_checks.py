"""The pipeline's learning checks on made-up stage results: the thresholds, the figures, and who ran against whom."""

from __future__ import annotations

import pytest

from agents.stage_checks import (
    FAILED,
    NOT_RUN,
    OK,
    RAN_AGAINST,
    check_preferences,
    check_rm,
    check_sft,
    stage_status,
    warnings_of,
)


@pytest.mark.parametrize("accuracy, pairs, status", [
    (0.51, 270, FAILED),   # the run: chance
    (0.56, 270, FAILED),   # 0.5 + 2 * 0.0304 = 0.561: still within noise
    (0.57, 270, OK),
    (0.80, 30, OK),        # 0.5 + 2 * 0.0913 = 0.683
    (0.65, 30, FAILED),
])
def test_reward_model_within_two_binomial_standard_errors_of_chance_failed(accuracy, pairs, status):
    finding = check_rm({"eval/accuracy": accuracy, "eval/pairs": float(pairs)})
    assert finding["status"] == status
    assert f"held-out accuracy {accuracy:.3f} on {pairs} pairs" in finding["figure"]


def test_sft_no_better_than_unigram_and_a_gold_reward_that_ties_most_rankings():
    failed = check_sft({"eval/loss": 5.9, "eval/unigram_loss": 5.8})
    assert failed["status"] == FAILED and "held-out loss 5.900 nats/token, unigram model 5.800" in failed["message"]
    assert check_sft({"eval/loss": 3.9, "eval/unigram_loss": 5.8})["status"] == OK
    assert check_preferences({"prompts": 100, "rankings_kept": 40})["status"] == FAILED  # 60% of prompts all tied
    assert check_preferences({"prompts": 100, "rankings_kept": 76})["status"] == OK


def test_dependent_stages_say_they_ran_against_a_failed_one():
    statuses = {}
    for stage, info in [("pretrain", {"eval/loss": 4.0, "eval/unigram_loss": 5.8}),
                        ("sft", {"eval/loss": 6.0, "eval/unigram_loss": 5.8}),
                        ("preferences", {"prompts": 100, "rankings_kept": 90}),
                        ("rm", {"eval/accuracy": 0.9, "eval/pairs": 300.0}), ("ppo", {}), ("dpo", None)]:
        statuses[stage] = stage_status(stage, info, statuses)
    assert [s["status"] for s in statuses.values()] == [OK, FAILED, RAN_AGAINST, RAN_AGAINST, RAN_AGAINST, NOT_RUN]
    assert statuses["ppo"]["ran_against"] == ["sft"] and statuses["rm"]["ran_against"] == ["sft"]
    lines = warnings_of(statuses)
    assert lines[0].startswith("sft: the held-out loss is no better than a unigram") and "To change:" in lines[0]
    assert "ppo: ran against sft, which did not learn" in lines[-1]
