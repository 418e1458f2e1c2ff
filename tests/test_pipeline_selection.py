"""The pipeline's KL-guarded choice of the reported PPO and DPO models, on made-up validation KLs
(the sampling itself is stubbed out; `tests/test_pipeline.py` runs it for real, marked slow)."""

from __future__ import annotations

import json

import pytest

import agents.evaluate
from agents.pipeline import PipelineConfig
from agents.pipeline_selection import select_within_budget

# (KL to SFT, standard error) per candidate on the validation prompts, oldest first, final last
MEASURED = {
    "ppo": {"iter-00008": (0.5, 0.05), "iter-00016": (2.0, 0.2), "iter-00024": (3.5, 0.4), "final": (3.0, 0.6)},
    "dpo": {"checkpoint-00000023": (0.2, 0.01), "checkpoint-00000046": (27.0, 4.9), "final": (19.0, 4.3)},
    "never": {"a": (9.0, 1.0), "b": (5.0, 0.5), "final": (6.0, 0.1)},
}


@pytest.fixture
def stub_evaluation(monkeypatch):
    seen = {}

    def evaluate_models(config):
        seen["models"] = dict(config.models)
        rows = [{"model": "sft", "kl_to_sft": 0.0, "kl_to_sft_stderr": 0.0}]
        for name in config.models:
            if name != "sft":
                algorithm, candidate = name.split(":")
                kl, stderr = MEASURED[algorithm][candidate]
                rows.append({"model": name, "kl_to_sft": kl, "kl_to_sft_stderr": stderr})
        return {"rows": rows}

    monkeypatch.setattr(agents.evaluate, "evaluate_models", evaluate_models)
    return seen


def _candidates(algorithms):
    return {a: {name: f"/models/{a}/{name}" for name in MEASURED[a]} for a in algorithms}


def test_latest_candidate_within_budget_with_two_standard_errors_to_spare(tmp_path, stub_evaluation):
    config = PipelineConfig(output_dir=str(tmp_path), kl_budget=4.0)
    selections = select_within_budget(tmp_path, "/models/sft", config, ["a prompt"], _candidates(["ppo", "dpo"]))
    # ppo: final's bound is 3.0 + 2 * 0.6 = 4.2 > 4, iter-00024's 4.3 > 4, so iter-00016 (2.4) is the latest within
    assert selections["ppo"]["selected"] == "iter-00016" and selections["ppo"]["path"] == "/models/ppo/iter-00016"
    # dpo: the collapsed later checkpoints are out of budget; the early one is reported
    assert selections["dpo"]["selected"] == "checkpoint-00000023"
    for algorithm in ("ppo", "dpo"):
        written = json.loads((tmp_path / f"{algorithm}_selection.json").read_text())
        assert written == selections[algorithm]
        assert written["kl_upper_bound_on_validation"]["final"] == pytest.approx(
            MEASURED[algorithm]["final"][0] + 2 * MEASURED[algorithm]["final"][1])
    # one sampling pass serves both algorithms, with SFT as the reference
    assert set(stub_evaluation["models"]) == {"sft"} | {f"{a}:{n}" for a in ("ppo", "dpo") for n in MEASURED[a]}


def test_nothing_within_budget_reports_the_lowest_bound(tmp_path, stub_evaluation):
    config = PipelineConfig(output_dir=str(tmp_path), kl_budget=4.0)
    selections = select_within_budget(tmp_path, "/models/sft", config, ["a prompt"], _candidates(["never"]))
    assert selections["never"]["selected"] == "b"  # bounds 11.0, 6.0, 6.2


def test_no_budget_reports_the_final_models_without_sampling(tmp_path, stub_evaluation):
    config = PipelineConfig(output_dir=str(tmp_path), kl_budget=None)
    selections = select_within_budget(tmp_path, "/models/sft", config, ["a prompt"], _candidates(["ppo", "dpo"]))
    assert {a: s["selected"] for a, s in selections.items()} == {"ppo": "final", "dpo": "final"}
    assert selections["dpo"]["path"] == "/models/dpo/final"
    assert not stub_evaluation and not list(tmp_path.glob("*_selection.json"))
