"""Data-parallel training under ``torchrun``: two CPU processes (gloo) train the same model as one.

Each trainer is launched the way a user would (``python -m torch.distributed.run --nproc_per_node 2
-m agents.cli ...``) and compared with the same command in one process: the same global batch,
so the final weights and every logged training loss must agree to float rounding. Only rank 0
writes, and the commands that do not split their work refuse to start.

RLHF PPO's rollouts differ with the number of processes (each samples its own share), so its
update is compared on a fixed rollout (``tests/_torchrun_ppo.py``), and a two-process run must
learn, agree with itself across ranks and resume exactly. ``rlhf pipeline`` runs every training
stage data parallel and evaluates on rank 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _torchrun_ppo import fixed_rollout, run_update
from safetensors.torch import load_file
from test_data import make_tiny_lm, write_jsonl
from test_dpo import _pairs
from test_pipeline import TINY
from test_reward_model import _toy_preferences
from test_sft import _demonstrations

from agents.distributed import shard

COMMON = ["--num-epochs", "2", "--batch-size", "8", "--learning-rate", "3e-3", "--eval-fraction", "0.125",
          "--log-every", "1", "--torch-threads", "1", "--no-progress", "--seed", "3"]


def _env() -> dict[str, str]:
    # the launched scripts import tests.tiny_models: the repository root goes on their path, as pytest's pythonpath does
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [root,
                                                                                         os.environ.get("PYTHONPATH")])))
    env.pop("WORLD_SIZE", None)
    return env


def _cli(args: list[str], processes: int) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable]
    return subprocess.run([*launch, "-m", "agents.cli", *args], env=_env(), capture_output=True, text=True, timeout=300)


def _losses(run: Path) -> list[float]:
    return [
        json.loads(line)["loss"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]


def _train_both_ways(tmp_path: Path, command: str, data: Path, extra: list[str] = ()) -> tuple[Path, Path]:
    lm = make_tiny_lm(tmp_path / "lm")
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"{command}-{processes}"
        done = _cli(
            [command, "--model-path", str(lm), "--data-path", str(data), "--output-dir", str(out), *COMMON, *extra],
            processes,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs[processes] = out
    return runs[1], runs[2]


def _assert_same_training(alone: Path, together: Path) -> None:
    losses_a, losses_b = _losses(alone), _losses(together)
    assert len(losses_a) == len(losses_b) > 1
    assert losses_b == pytest.approx(losses_a, abs=1e-5)
    # the held-out metrics come from rank 0 alone, over the whole held-out set: the same numbers
    alone_eval, together_eval = (
        json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]) for run in (alone, together)
    )
    assert together_eval["eval/loss"] == pytest.approx(alone_eval["eval/loss"], abs=1e-5)
    # Weights agree to float rounding, except where the true gradient is 0 (a reward model's final
    # norm bias shifts every score alike, an attention key bias every score of a query alike): there
    # Adam turns rounding noise into steps of up to the learning rate, in either run.
    a, b = load_file(alone / "model.safetensors"), load_file(together / "model.safetensors")
    assert a.keys() == b.keys()
    moved = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved < 1e-3, f"two processes ended {moved} away from one"
    timing = json.loads((together / "timing.json").read_text())
    assert timing["processes"] == 2
    assert not list(together.glob("*.tmp*"))


@pytest.mark.slow
def test_dpo_on_two_processes_trains_exactly_like_one(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(40, seed=0))  # 35 train pairs: a last batch of 3
    alone, together = _train_both_ways(tmp_path, "dpo", data, ["--beta", "0.5"])
    _assert_same_training(alone, together)


@pytest.mark.slow
def test_reward_model_and_sft_on_two_processes_train_exactly_like_one(tmp_path):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", _toy_preferences(40, seed=0))
    alone, together = _train_both_ways(tmp_path / "rm", "rm", prefs)
    _assert_same_training(alone, together)
    assert (together / "reward_normalization.json").exists()
    demos = write_jsonl(tmp_path / "demos.jsonl", _demonstrations(40))
    _assert_same_training(*_train_both_ways(tmp_path / "sft", "sft", demos))


def test_shard_deals_out_the_batch_and_weighs_each_share():
    batch = list(range(10, 17))  # 7 examples on 2 processes: 4 and 3
    shares = [shard(batch, rank, 2) for rank in (0, 1)]
    assert sorted(i for mine, _ in shares for i in mine) == batch
    assert [scale for _, scale in shares] == [pytest.approx(8 / 7), pytest.approx(6 / 7)]
    # the mean of the scaled per-share means is the mean over the whole batch
    values = {i: float(i * i) for i in batch}
    mean = sum(scale * sum(values[i] for i in mine) / len(mine) for mine, scale in shares) / 2
    assert mean == pytest.approx(sum(values.values()) / len(batch))
    # a loss averaged over targets: shares weighed by each example's number of targets
    weights = {i: i - 9 for i in batch}
    shares = [shard(batch, rank, 2, weights) for rank in (0, 1)]
    per_target = {i: torch.arange(float(weights[i])) + i for i in batch}
    mean = sum(scale * torch.cat([per_target[i] for i in mine]).mean() for mine, scale in shares) / 2
    assert float(mean) == pytest.approx(float(torch.cat(list(per_target.values())).mean()))
    # fewer examples than processes: everyone takes the whole batch, unscaled
    assert shard([5], 1, 2) == ([5], 1.0)
    assert shard(batch, 0, 1) == (batch, 1.0)


@pytest.mark.parametrize("command", [["catgrid"], ["eval", "--model", "a=b"]])
def test_commands_that_do_not_split_their_work_refuse_several_processes(command):
    env = dict(_env(), WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    done = subprocess.run(
        [sys.executable, "-m", "agents.cli", *command], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "does not run data parallel yet" in done.stderr and "torchrun" in done.stderr


def _torchrun_ppo(args: list[str]) -> None:
    script = Path(__file__).with_name("_torchrun_ppo.py")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_ppo_update_on_two_processes_equals_one_on_the_whole_rollout(tmp_path):
    # 12 responses of uneven lengths, 3 minibatches of 4 dealt out 2 + 2, PPO-ptx batches of 4 with uneven targets
    _torchrun_ppo(["update", str(tmp_path)])
    alone, stats, stopped = run_update(0, 1)
    together = load_file(str(tmp_path / "update.safetensors"))
    start = fixed_rollout()[0].state_dict()
    moved = max(float((alone.state_dict()[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-2  # the update did something to compare
    gap = max(float((alone.state_dict()[k] - together[k]).abs().max()) for k in start)
    assert gap < 1e-5, f"two processes ended {gap} away from one"
    logged = json.loads((tmp_path / "update.json").read_text())
    assert logged["stopped"] is stopped is False
    assert logged["stats"].keys() == stats.keys()
    for key in stats:  # each minibatch's figures are the whole minibatch's, not rank 0's share
        assert logged["stats"][key] == pytest.approx(stats[key], abs=1e-5), key


@pytest.mark.slow
def test_ppo_on_two_processes_learns_and_resumes_exactly(tmp_path, save_tiny_lm):
    lm = save_tiny_lm(tmp_path / "lm")

    def run(out: Path, iterations: int, batch: int, **extra) -> list[dict]:
        out.mkdir(exist_ok=True)
        config = dict(
            model_path=str(lm),
            prompts=["hello", "the cat", "once upon"],
            output_dir=str(out),
            batch_size=batch,
            total_episodes=batch * iterations,
            max_new_tokens=8,
            learning_rate=3e-3,
            beta=0.01,
            progress=False,
            torch_threads=1,
            **extra,
        )
        (out / "config-in.json").write_text(json.dumps(config))
        _torchrun_ppo(["train", str(out / "config-in.json"), str(out)])
        histories = [json.loads((out / f"history-{rank}.json").read_text()) for rank in (0, 1)]
        assert histories[0] == histories[1]  # every rank holds the whole batch's figures
        return histories[0]

    history = run(tmp_path / "learn", 12, 32)
    scores = [row["objective/scores"] for row in history]
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert np.mean(scores[-3:]) > 3 * np.mean(scores[:3]), scores
    assert max(row["objective/kl"] for row in history) < 15.0
    assert len((tmp_path / "learn" / "metrics.jsonl").read_text().splitlines()) == 12  # rank 0 alone writes

    full = run(tmp_path / "full", 3, 16, save_every=1, kl_setpoint=0.5)
    run(tmp_path / "cut", 2, 16, save_every=1, kl_setpoint=0.5)
    resumed = run(tmp_path / "cut", 3, 16, save_every=1, kl_setpoint=0.5, resume=True)
    assert resumed[-1] == full[-1]
    a, b = (load_file(str(tmp_path / run_dir / "policy" / "model.safetensors")) for run_dir in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_pipeline_on_two_processes_trains_every_stage_data_parallel(tmp_path):
    from agents.cli import main

    together, alone = tmp_path / "together", tmp_path / "alone"
    done = _cli(["pipeline", "--output-dir", str(together), *TINY], 2)
    # rank 0's exit 3 means a stage of this tiny run did not learn (reported in summary.json), not a crash
    assert done.returncode == 0 or "(exitcode: 3)" in done.stderr, done.stderr[-3000:]
    assert done.stdout.count("report:") == 1  # rank 0 alone speaks for the run
    for stage in ("sft", "rm", "dpo"):
        assert json.loads((together / stage / "timing.json").read_text())["processes"] == 2, stage
    assert len((together / "ppo" / "metrics.jsonl").read_text().splitlines()) == 4  # one writer: 128 episodes / 32
    report = (together / "report.md").read_text()
    for model in ("base", "sft", "ppo", "dpo"):
        assert f"| {model} |" in report
    summary = json.loads((together / "summary.json").read_text())
    assert 0.0 <= summary["ppo_win_rate_vs_sft"] <= 1.0 and 0.0 <= summary["dpo_win_rate_vs_sft"] <= 1.0
    # SFT, the first stage, trains exactly as in one process (later stages sample, and PPO splits its rollouts)
    assert main(["pipeline", "--output-dir", str(alone), *TINY]) in (0, 3)
    assert _losses(together / "sft") == pytest.approx(_losses(alone / "sft"), abs=1e-5)


def test_ppo_batch_that_does_not_divide_among_the_processes_fails_before_joining(monkeypatch, tmp_path):
    from agents.lm_ppo import LMPPOConfig, train_lm_ppo
    from agents.pipeline import PipelineConfig, run_pipeline

    monkeypatch.setenv("WORLD_SIZE", "3")  # no process group is set up: the check comes first, nothing waits
    with pytest.raises(ValueError, match="batch_size 32 does not divide among 3 processes"):
        train_lm_ppo(LMPPOConfig(batch_size=32, output_dir=str(tmp_path / "ppo")))
    with pytest.raises(ValueError, match="ppo_batch_size 64 does not divide among 3 processes"):
        run_pipeline(PipelineConfig(output_dir=str(tmp_path / "pipeline")))
    assert not (tmp_path / "pipeline").exists()
