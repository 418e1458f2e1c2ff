"""--report-to: TensorBoard event files hold the metrics.jsonl names; bad names and missing packages are clear
errors."""

from __future__ import annotations

import importlib.util
import json

import pytest

from agents.data import write_jsonl
from agents.trackers import parse_report_to

pytest.importorskip("tensorboard")


def _scalar_tags(log_dir) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return set(events.Tags()["scalars"])


def _metric_names(path) -> set[str]:
    return {k for line in path.read_text().splitlines() for k, v in json.loads(line).items()
            if k != "step" and isinstance(v, (int, float))}


def test_sft_writes_its_metrics_to_tensorboard(tmp_path):
    from agents.sft import SFTConfig, train_sft
    from rlhf_envs.corpus import make_demonstrations

    data = write_jsonl(tmp_path / "sft.jsonl", make_demonstrations(40, seed=0))
    out = tmp_path / "sft"
    train_sft(SFTConfig(data_path=str(data), output_dir=str(out), batch_size=8, max_steps=4, log_every=2,
                        eval_fraction=0.2, report_to=["tensorboard"], torch_threads=1, progress=False, device="cpu"))
    names = _metric_names(out / "metrics.jsonl")
    assert {"loss", "lr", "grad_norm", "eval/loss", "eval/perplexity"} <= names
    assert _scalar_tags(out / "tensorboard") == names


def test_ppo_writes_its_metrics_to_tensorboard(tmp_path, save_tiny_lm):
    from agents.lm_ppo import LMPPOConfig, train_lm_ppo

    train_lm_ppo(LMPPOConfig(model_path=str(save_tiny_lm(tmp_path / "lm")), reward_model=lambda p,
                             r: [len(x) for x in r],
                             prompts=["hello", "the cat"], output_dir=str(tmp_path / "ppo"), batch_size=8,
                             total_episodes=16, max_new_tokens=4, report_to="tensorboard", progress=False))
    names = _metric_names(tmp_path / "ppo" / "metrics.jsonl")
    assert {"objective/kl", "objective/scores", "policy/approxkl_avg"} <= names
    assert _scalar_tags(tmp_path / "ppo" / "tensorboard") == names


def test_report_to_parsing():
    assert parse_report_to(["none"], "X") == [] and parse_report_to("tensorboard,wandb", "X") == ["tensorboard",
                                                                                                  "wandb"]
    with pytest.raises(ValueError, match=r"unknown tracker 'mlflow'; expected some of \['none', 'tensorboard'"):
        parse_report_to(["mlflow"], "SFTConfig")
    with pytest.raises(ValueError, match="mixes 'none'"):
        parse_report_to(["none", "wandb"], "SFTConfig")


def test_cli_takes_several_trackers():
    from agents.cli import build_parser

    args = build_parser().parse_args(["sft", "--data-path", "d.jsonl", "--report-to", "tensorboard", "trackio"])
    assert args.report_to == ["tensorboard", "trackio"]


@pytest.mark.parametrize("tracker", ["wandb", "trackio"])
def test_a_missing_tracker_package_is_named(tmp_path, tracker):
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed")
    from agents.lm_common import MetricsWriter

    with pytest.raises(ImportError, match=f"needs the {tracker} package: pip install {tracker}"):
        MetricsWriter(tmp_path / "metrics.jsonl", report_to=[tracker])
