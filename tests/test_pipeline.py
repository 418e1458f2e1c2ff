"""`rlhf pipeline` end to end on the embedded model, with tiny budgets: every artefact is written,
the report is complete, and two runs with one seed write identical metrics files."""

from __future__ import annotations

import json

import pytest

from agents.cli import main
from agents.pipeline import PipelineConfig

pytestmark = pytest.mark.slow

TINY = ["--n-demonstrations", "96", "--n-preference-prompts", "48", "--ppo-episodes", "128", "--ppo-batch-size", "32",
        "--n-eval-prompts", "32", "--dpo-checkpoints", "1", "--rm-epochs", "1", "--dpo-epochs", "1", "--no-progress",
        "--torch-threads", "1"]


def _metrics_files(run) -> dict[str, str]:
    return {str(p.relative_to(run)): p.read_text() for p in sorted(run.rglob("metrics.jsonl"))}


def test_pipeline_twice_same_seed_identical_metrics(tmp_path):
    for name in ("a", "b"):
        # exit 3: a stage of this tiny run did not learn (reported, not an error of the pipeline)
        assert main(["pipeline", "--output-dir", str(tmp_path / name), *TINY]) in (0, 3)
    run = tmp_path / "a"
    for artefact in ["report.md", "eval.json", "curves.json", "summary.json", "gold_vs_kl.png", "ppo_training.png",
                     "dpo_training.png", "sft/model.safetensors", "rm/model.safetensors", "dpo/model.safetensors",
                     "ppo/policy/model.safetensors", "data/rankings.jsonl", "data/preferences.jsonl"]:
        assert (run / artefact).is_file(), artefact
    report = (run / "report.md").read_text()
    for model in ("base", "sft", "ppo", "dpo"):
        assert f"| {model} |" in report
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["ppo_win_rate_vs_sft"] <= 1.0 and summary["rm_heldout_accuracy"] is not None
    for algorithm in ("ppo", "dpo"):
        selection = json.loads((run / f"{algorithm}_selection.json").read_text())
        assert summary[f"{algorithm}_selected"] == selection["selected"] in selection["kl_to_sft_on_validation"]
        bound = selection["kl_upper_bound_on_validation"]
        assert list(bound)[-1] == "final"  # candidates oldest first, the final model last
        within = [name for name in bound if bound[name] <= selection["kl_budget"]]
        assert selection["selected"] == (within[-1] if within else min(bound, key=bound.get))
        assert f"`{algorithm}_selection.json`) | {selection['selected']} |" in report
    # DPO's candidates: its intermediate checkpoint (--dpo-checkpoints 1 saves one, at the last step) is the final
    # model's weights, so only "final" is sampled
    assert list(json.loads((run / "dpo_selection.json").read_text())["kl_to_sft_on_validation"]) == ["final"]
    a, b = _metrics_files(tmp_path / "a"), _metrics_files(tmp_path / "b")
    assert set(a) >= {"sft/metrics.jsonl", "rm/metrics.jsonl", "ppo/metrics.jsonl", "dpo/metrics.jsonl"}
    assert a == b
    assert (tmp_path / "a" / "eval.json").read_text() == (tmp_path / "b" / "eval.json").read_text()


def test_pipeline_resume_keeps_finished_stages(tmp_path):
    run = tmp_path / "run"
    assert main(["pipeline", "--output-dir", str(run), *TINY]) in (0, 3)  # 3: a tiny stage did not learn
    sft_weights = (run / "sft" / "model.safetensors").stat().st_mtime_ns
    (run / "dpo" / "DONE").unlink()  # as if the run died during DPO
    assert main(["pipeline", "--output-dir", str(run), "--resume", *TINY]) in (0, 3)
    assert (run / "sft" / "model.safetensors").stat().st_mtime_ns == sft_weights
    assert (run / "dpo" / "DONE").is_file()


@pytest.mark.parametrize("kwargs, message", [
    ({"k_responses": 1}, "k_responses must be >= 2"),
    ({"ppo_episodes": 8, "ppo_batch_size": 64}, "would not run one iteration"),
    ({"model_path": "/nonexistent"}, "not a Hugging Face model directory"),
])
def test_bad_pipeline_config_fails_before_writing(tmp_path, kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        PipelineConfig(output_dir=str(tmp_path / "run"), **kwargs)
    assert not (tmp_path / "run").exists()
