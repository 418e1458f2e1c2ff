"""The pipeline says when a stage did not learn: a reward model at chance, a gold reward that ties every ranking.

Runs on the embedded model with tiny budgets and a gold reward that carries no signal (marked slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agents.cli import FAILED_TO_LEARN_EXIT, main
from rlhf_envs import rewards

pytestmark = pytest.mark.slow

TINY = ["--n-demonstrations", "96", "--n-preference-prompts", "48", "--ppo-episodes", "64", "--ppo-batch-size", "32",
        "--n-eval-prompts", "16", "--dpo-checkpoints", "1", "--ppo-snapshots", "1", "--rm-epochs", "1", "--dpo-epochs",
        "1", "--no-progress", "--torch-threads", "1"]


def _noise():
    """A gold reward that is noise: a seeded uniform draw per answer, unrelated to its text (a hash of the text
    would not do: the embedded model's answers recur, and a reward model learns the recurring ones' values)."""
    rng = np.random.default_rng(0)
    return lambda prompts, responses: rng.random(len(responses)).tolist()


def test_reward_model_at_chance_is_reported_at_the_top(tmp_path, capsys):
    rewards.register("test-noise", _noise, overwrite=True)
    run = tmp_path / "run"
    assert main(["pipeline", "--output-dir", str(run), "--gold-reward", "test-noise", *TINY]) == FAILED_TO_LEARN_EXIT
    summary = json.loads((run / "summary.json").read_text())
    stages = summary["stages"]
    assert summary["status"] == "failed-to-learn" and stages["rm"]["status"] == "failed-to-learn"
    assert stages["sft"]["status"] == "ok" and stages["preferences"]["status"] == "ok"
    assert stages["ppo"]["status"] == "ran-against-failed" and stages["ppo"]["ran_against"] == ["rm"]
    assert stages["dpo"]["status"] == "ok"  # DPO trains on the preferences, not on the reward model
    report = (run / "report.md").read_text()
    head = report.split("Base model")[0]
    assert "## WARNING" in head and "rm: held-out accuracy" in head and "To change:" in head
    assert "ppo: ran against rm" in head
    assert "| rm | failed-to-learn |" in report
    assert "rm: held-out accuracy" in capsys.readouterr().err  # on the console too


def test_constant_gold_reward_stops_after_preferences(tmp_path, capsys):
    rewards.register("test-constant", lambda: (lambda prompts, responses: [0.5] * len(responses)), overwrite=True)
    run = tmp_path / "run"
    assert main(["pipeline", "--output-dir", str(run), "--gold-reward", "test-constant", *TINY]) == FAILED_TO_LEARN_EXIT
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_after"] == "preferences" and summary["status"] == "failed-to-learn"
    assert summary["stages"]["preferences"]["status"] == "failed-to-learn"
    assert {summary["stages"][s]["status"] for s in ("rm", "ppo", "dpo")} == {"not-run"}
    head = (run / "report.md").read_text().split("Base model")[0]
    assert "tied all K answers on 48 of 48 prompts (100%)" in head and "the run stopped after preferences" in head
    assert not (run / "rm").exists()
    assert "tied all K answers" in capsys.readouterr().err
