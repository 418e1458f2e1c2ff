"""Data-parallel training under ``torchrun``: throughput of two processes against one.

Our SFT, reward-model and DPO trainers run through the ``rlhf`` command on the trainer benchmark's
model and data (``benchmarks.bench_trainers``: the embedded model's shape, corpus examples, batch
32, max length 128, 40 optimizer steps), three ways, interleaved, ``--repeats`` times each:

- one process on one torch thread (the baseline);
- one process on two torch threads (the other way to use a second core);
- two processes on one thread each (``python -m torch.distributed.run --nproc_per_node 2``, gloo):
  the same global batch of 32, 16 examples a process, gradients averaged by DDP.

RLHF PPO (``rlhf ppo``) runs the same three ways on the embedded model against the sentiment reward:
``--ppo-iterations`` iterations of 64 responses (24 new tokens, 4 epochs of 4 minibatches, no
approx-KL stop so that every run makes the same number of updates); two processes each sample and
score 32 responses, exchange the rollouts and back-propagate half of every minibatch.

The figure is each trainer's own ``samples_per_second`` (its ``timing.json``: the training loop,
and DPO's reference pass; for PPO episodes per second over its iterations, rollout, scoring and
update; process start, imports, loading and the process group's set-up are outside it). The table
reports medians and the ratios of two processes over the other two. PPO's responses are sampled,
so their lengths, and with them the work, differ a little between the runs.

    python -m benchmarks.bench_data_parallel [--repeats 3] [--steps 40] [--ppo-iterations 8]

Writes ``benchmarks/results/data_parallel.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_trainers import ALGORITHMS, UNITS, Settings, write_inputs
from benchmarks.common import RESULTS_DIR, print_table, write_json

WAYS = {
    "1 process x 1 thread": (1, 1),
    "1 process x 2 threads": (1, 2),
    "2 processes x 1 thread": (2, 1),
}
DATA = {"sft": "sft.jsonl", "rm": "pairs.jsonl", "dpo": "pairs.jsonl"}
PPO_BATCH = 64


def run(algorithm: str, workdir: Path, processes: int, threads: int, s: Settings, ppo_iterations: int = 8) -> float:
    """One training run through the ``rlhf`` command; returns the trainer's samples (pairs, episodes) per second."""
    with tempfile.TemporaryDirectory(dir=workdir) as out:
        if algorithm == "ppo":
            args = ["ppo", "--output-dir", out, "--seed", str(s.seed), "--batch-size", str(PPO_BATCH),
                    "--total-episodes", str(PPO_BATCH * ppo_iterations), "--max-approx-kl", "1e9",
                    "--torch-threads", str(threads), "--no-progress"]
            return _launch(algorithm, args, out, processes, threads)
        args = [algorithm, "--model-path", str(workdir / "model"), "--data-path", str(workdir / DATA[algorithm]),
                "--output-dir", out, "--seed", str(s.seed), "--max-steps", str(s.steps), "--batch-size",
                str(s.batch_size),
                "--max-length", str(s.max_length), "--learning-rate", str(s.learning_rate), "--lr-schedule", "linear",
                "--warmup-ratio", "0", "--weight-decay", "0", "--max-grad-norm", "1.0", "--eval-fraction", "0",
                "--log-every", str(s.steps), "--checkpoint-every", "0", "--torch-threads", str(threads),
                "--no-progress",
                "--device", "cpu"]
        if algorithm == "dpo":
            args += ["--beta", str(s.beta)]
        return _launch(algorithm, args, out, processes, threads)


def _launch(algorithm: str, args: list[str], out: str, processes: int, threads: int) -> float:
    """Run ``rlhf ARGS`` as ``processes`` processes of ``threads`` threads; the ``samples_per_second`` of its
    timing.json."""
    launch = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([*launch, "-m", "agents.cli", *args], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"{algorithm} on {processes} x {threads} failed (exit "
                           f"{proc.returncode}):\n{proc.stderr[-4000:]}")
    timing = json.loads((Path(out) / "timing.json").read_text())
    if timing.get("processes", 1) != processes:
        raise RuntimeError(f"{algorithm}: launched {processes} processes, the trainer saw {timing.get('processes', 1)}")
    return timing["samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--ppo-iterations", type=int, default=8)
    parser.add_argument("--algorithms", nargs="+", choices=(*ALGORITHMS, "ppo"), default=[*ALGORITHMS, "ppo"])
    parser.add_argument("--out", default=str(RESULTS_DIR / "data_parallel.json"))
    args = parser.parse_args()
    settings = Settings(steps=args.steps)
    units = {**UNITS, "ppo": "episodes/s"}
    results, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        inputs = write_inputs(workdir, settings)
        for algorithm in args.algorithms:
            runs: dict[str, list[float]] = {way: [] for way in WAYS}
            names = list(WAYS)
            for repeat in range(args.repeats):
                for way in names[repeat % len(names):] + names[:repeat % len(names)]:
                    runs[way].append(run(algorithm, workdir, *WAYS[way], settings, args.ppo_iterations))
                    print(f"{algorithm} {way} run {repeat + 1}/{args.repeats}: {runs[way][-1]:.1f} {units[algorithm]}",
                          flush=True)
            median = {way: statistics.median(values) for way, values in runs.items()}
            two = median["2 processes x 1 thread"]
            results[algorithm] = {"unit": units[algorithm], "median_per_second": median, "runs": runs,
                                  "two_processes_over_one_thread": two / median["1 process x 1 thread"],
                                  "two_processes_over_two_threads": two / median["1 process x 2 threads"]}
            rows.append({"algorithm": algorithm, "unit": units[algorithm], **{way: median[way] for way in WAYS},
                         "2p / 1p1t": results[algorithm]["two_processes_over_one_thread"],
                         "2p / 1p2t": results[algorithm]["two_processes_over_two_threads"]})
    print_table(f"Data-parallel training on {os.cpu_count()} CPU cores ({args.steps} steps of {settings.batch_size}, "
                f"median of {args.repeats})", rows)
    out = Path(args.out)
    write_json(out.stem, {
        "command": "python -m benchmarks.bench_data_parallel " + " ".join(sys.argv[1:]),
        "settings": {"steps": settings.steps, "batch_size": settings.batch_size, "max_length": settings.max_length,
                     "learning_rate": settings.learning_rate, "beta": settings.beta},
        "ppo_settings": {"model": "embedded", "reward_model": "sentiment", "batch_size": PPO_BATCH,
                         "iterations": args.ppo_iterations, "max_approx_kl": 1e9, "other": "LMPPOConfig defaults"},
        "repeats": args.repeats, **inputs,
        "timed": "the trainer's own timing.json: its training loop (and DPO's reference pass; PPO's iterations), per "
                 "process group",
        "results": results,
    }, out.parent)


if __name__ == "__main__":
    main()
