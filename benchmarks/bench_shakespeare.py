"""The whole RLHF pipeline on real text: tinyshakespeare, "continue this line positively".

1. Base model: the project's own build script (:mod:`rlhf_envs.lm.build_embedded`, ``corpus
   shakespeare``) trains the tokenizer and a small GPT-2 on the speeches of
   ``../shared/data/tinyshakespeare.txt`` (read from there, never copied into the repository).
2. Data: the speeches are split in two by the seed. Demonstrations come from one half: the prompt
   is the speaker's name and the first 3 to 6 words of the speech's first line, the completion the
   rest of that line (plus the next line when both together stay short). Prompts for preferences,
   PPO and evaluation come the same way from the other half (the pipeline splits them three ways
   by seed), so no evaluation prompt was seen in SFT.
3. The pipeline (:func:`agents.pipeline.run_pipeline`): SFT, K samples per prompt ranked by the
   gold reward (VADER sentiment of the response), reward model, PPO against it with KL to SFT,
   DPO on the same preferences, evaluation on held-out prompts.

Everything generated goes to ``--out`` (default ``runs/bench_shakespeare``, which git ignores);
the table and the timings go to ``benchmarks/results/shakespeare.json``.

    python -m benchmarks.bench_shakespeare            # 10 to 13 minutes on one thread of a shared 2-core CPU
    python -m benchmarks.bench_shakespeare --quick    # a smoke run of a few minutes, not for the README
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from agents.pipeline import PipelineConfig, run_pipeline
from agents.data import write_jsonl
from benchmarks.common import print_table, write_json
from rlhf_envs.lm.build_embedded import BuildConfig, build

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
DEFAULT_OUT = REPO / "runs" / "bench_shakespeare"
MAX_COMPLETION_WORDS = 14

# Full budgets: 5 to 8 minutes of base-model training on one thread, then about 5 of pipeline.
# The reward model gets 4 epochs at 1e-3 (not the pipeline's 2 at 5e-4): on this run's SFT samples,
# its accuracy on gold-ordered pairs of fresh prompts went from 0.56 to 0.71, and PPO's gold win
# rate against SFT from 0.46 (PPO exploiting a chance-level proxy) to 0.74.
BUDGETS = {
    "full": {
        "build": {"max_steps": 600, "warmup_steps": 60},
        "pipeline": {"n_demonstrations": 2000, "sft_epochs": 2, "n_preference_prompts": 1200, "k_responses": 4,
                     "rm_epochs": 4, "rm_learning_rate": 1e-3, "ppo_episodes": 2048, "ppo_batch_size": 64,
                     "kl_horizon": 500.0, "dpo_epochs": 4, "n_eval_prompts": 256, "dpo_checkpoints": 4},
    },
    "quick": {
        "build": {"max_steps": 60, "warmup_steps": 10},
        "pipeline": {"n_demonstrations": 200, "sft_epochs": 1, "n_preference_prompts": 64, "k_responses": 4,
                     "rm_epochs": 1, "ppo_episodes": 128, "ppo_batch_size": 32, "kl_horizon": 100.0,
                     "dpo_epochs": 1, "n_eval_prompts": 32, "dpo_checkpoints": 1},
    },
}


def find_data(path: Path | None) -> Path:
    """The tinyshakespeare text: ``path`` or ``<repo>/../shared/data/tinyshakespeare.txt``."""
    path = Path(path) if path is not None else DEFAULT_DATA
    if not path.is_file():
        raise FileNotFoundError(f"tinyshakespeare not found at {path}: this benchmark reads the real text from "
                                f"{DEFAULT_DATA} (never from the repository); put it there or pass --data PATH.")
    return path


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """``(speaker, lines)`` per speech; speeches are blocks separated by a blank line, headed ``Name:``."""
    out = []
    for block in text.split("\n\n"):
        lines = [line.strip() for line in block.strip().splitlines() if line.strip()]
        if len(lines) >= 2 and lines[0].endswith(":"):
            out.append((lines[0], lines[1:]))
    return out


def line_examples(text: str, seed: int, min_words: int = 5) -> tuple[list[dict], list[dict]]:
    """Demonstrations ``{prompt, completion}`` and prompts ``{prompt}`` from disjoint halves of the speeches.

    Every speech whose first line has at least ``min_words`` words gives one example: the prompt is
    ``"Speaker:\\n"`` and the first n words of that line (n uniform in 3..6, leaving at least two
    words), the completion ``" "`` and the rest of the line, plus ``"\\n"`` and the next line when the
    completion stays within ``MAX_COMPLETION_WORDS`` words (about 20 tokens, under the 24-token limit).
    """
    if min_words < 5:
        raise ValueError(f"min_words={min_words}; expected >= 5 (a 3-word prompt and a 2-word completion).")
    rng = np.random.default_rng(seed)
    examples = []
    for speaker, lines in speeches(text):
        words = lines[0].split()
        if len(words) < min_words:
            continue
        n = int(rng.integers(3, min(6, len(words) - 2) + 1))
        completion = " " + " ".join(words[n:])
        if len(lines) > 1 and len(words) - n + len(lines[1].split()) <= MAX_COMPLETION_WORDS:
            completion += "\n" + lines[1]
        examples.append({"prompt": f"{speaker}\n{' '.join(words[:n])}", "completion": completion})
    order = rng.permutation(len(examples))
    half = len(examples) // 2
    demonstrations = [examples[i] for i in order[:half]]
    prompts = [{"prompt": examples[i]["prompt"]} for i in order[half:]]
    return demonstrations, prompts


def main(argv: list[str] | None = None) -> dict:
    """Entry point of ``python -m benchmarks.bench_shakespeare``; returns what it writes to the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help=f"tinyshakespeare.txt (default {DEFAULT_DATA})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the base model, data and run (not the repo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the build, the data split and every stage")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: one core, kind to a shared machine)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run, not for the README")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads {args.threads}; expected a positive integer.")
    data = find_data(args.data)
    if not args.progress:
        hf_logging.disable_progress_bar()
    budget = BUDGETS["quick" if args.quick else "full"]
    out = args.out.resolve()
    wall: dict[str, float] = {}

    start = time.perf_counter()
    build_config = BuildConfig(out=out / "base", seed=args.seed, corpus="shakespeare", data=data,
                               threads=args.threads, progress=args.progress, **budget["build"])
    build_info = build(build_config)
    wall["build_base"] = time.perf_counter() - start
    print(f"base model: {build_info['n_parameters']:,} parameters, eval loss {build_info['eval_loss']} nats/token, "
          f"{wall['build_base']:.0f} s")

    start = time.perf_counter()
    demonstrations, prompts = line_examples(data.read_text(encoding="utf-8"), seed=args.seed)
    write_jsonl(out / "demonstrations.jsonl", demonstrations)
    write_jsonl(out / "prompts.jsonl", prompts)
    wall["data"] = time.perf_counter() - start

    config = PipelineConfig(output_dir=str(out / "pipeline"), model_path=str(out / "base"), seed=args.seed,
                            demonstrations_path=str(out / "demonstrations.jsonl"), prompts_path=str(out / "prompts.jsonl"),
                            max_new_tokens=24, torch_threads=args.threads, progress=args.progress, **budget["pipeline"])
    threads = torch.get_num_threads()
    try:
        summary = run_pipeline(config)
    finally:
        torch.set_num_threads(threads)
    wall.update(summary["seconds"])
    wall = {k: round(v, 1) for k, v in wall.items()}

    evaluation = json.loads((out / "pipeline" / "eval.json").read_text())
    rows = evaluation["rows"]
    print_table(f"tinyshakespeare: {evaluation['n_prompts']} held-out prompts, gold = VADER sentiment of the response",
                rows)
    print(f"\nreward model held-out pairwise accuracy: {summary['rm_heldout_accuracy']}")
    examples = evaluation["examples"][:3]
    for example in examples:
        print(f"\n{example['prompt']!r}")
        for name in ("base", "sft", "ppo", "dpo"):
            print(f"  {name}: {example[name]!r}")
    print_table("wall seconds per stage", [wall])

    results = {
        "task": "continue a line of tinyshakespeare positively (gold reward: VADER compound of the response)",
        "quick": args.quick,
        "data": {"n_demonstrations_available": len(demonstrations), "n_prompts_available": len(prompts)},
        "base_model": {k: v for k, v in build_info.items() if k != "config"},
        "settings": {"build": build_info["config"],
                     "pipeline": {k: v for k, v in vars(config).items()
                                  if k not in ("output_dir", "model_path", "demonstrations_path", "prompts_path")}},
        "summary": summary,
        "rows": rows,
        "examples": examples,
        "wall_seconds": wall,
        "total_wall_seconds": round(sum(wall.values()), 1),
    }
    write_json("shakespeare", results)
    return results


if __name__ == "__main__":
    main()
