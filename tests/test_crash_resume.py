"""Nothing is lost on a crash: SIGKILL a training run at random points, resume, and end where an
uninterrupted run with the same seed ends (same weights, same metrics)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEPS = 24


def _sft_command(model_dir, data, out, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "agents.cli", "sft", "--model-path", str(model_dir), "--data-path", str(data),
           "--output-dir", str(out), "--max-steps", str(STEPS), "--batch-size", "8", "--log-every", "1",
           "--checkpoint-every", "1", "--eval-fraction", "0", "--learning-rate", "1e-3", "--no-progress",
           "--torch-threads", "1"]
    return cmd + (["--resume"] if resume else [])


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _lines(out) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory, save_tiny_lm):
    root = tmp_path_factory.mktemp("crash")
    save_tiny_lm(root / "tiny")
    rng = np.random.default_rng(0)
    with open(root / "sft.jsonl", "w") as f:
        for i in range(120):
            word = ["cat", "dog", "sun", "tea"][rng.integers(4)]
            f.write(json.dumps({"prompt": f"say {word}:", "completion": f" {word} {word}."}) + "\n")
    return root


def test_sigkill_at_random_points_then_resume_matches_uninterrupted(setup):
    root = setup
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    reference = root / "reference"
    subprocess.run(_sft_command(root / "tiny", root / "sft.jsonl", reference, resume=False), check=True, env=env,
                   timeout=600)

    crashed = root / "crashed"
    rng = np.random.default_rng(1)
    kill_points = sorted(rng.choice(np.arange(2, STEPS - 1), size=3, replace=False).tolist())
    survived = 0
    for i, point in enumerate(kill_points):
        proc = subprocess.Popen(_sft_command(root / "tiny", root / "sft.jsonl", crashed, resume=i > 0), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while _lines(crashed) < point and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            survived += 1
    assert survived >= 2, "the runs finished before they could be killed"
    subprocess.run(_sft_command(root / "tiny", root / "sft.jsonl", crashed, resume=True), check=True, env=env,
                   timeout=600)

    a = load_file(str(reference / "model.safetensors"))
    b = load_file(str(crashed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(reference) == _metrics(crashed)
