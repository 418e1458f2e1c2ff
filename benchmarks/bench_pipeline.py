"""`rlhf pipeline` on the embedded default for several seeds: the figures the README reports.

    python -m benchmarks.bench_pipeline [--seeds 0 1 2] [--out runs/bench_pipeline] [--model-path embedded-llama]

For each seed it runs the whole recipe (SFT -> RM -> PPO, and DPO) with the default settings and
records the reward model's held-out accuracy, PPO's and DPO's gold-judged win rates against SFT,
their KL to SFT, the Elo ratings and the wall time; then the mean and the worst seed. With
``--model-path`` (e.g. ``embedded-llama``, the Llama twin) it writes ``results/pipeline_<name>.json``
and leaves the README's plots alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from agents.pipeline import PipelineConfig, run_pipeline
from benchmarks.common import RESULTS_DIR, print_table, write_json

TARGETS = {"rm_heldout_accuracy": 0.80, "ppo_win_rate_vs_sft": 0.70, "dpo_win_rate_vs_sft": 0.65}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench_pipeline")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--model-path", default=None,
                        help="base model directory or name (default: the embedded GPT-2)")
    args = parser.parse_args(argv)

    rows = []
    for seed in args.seeds:
        run = Path(args.out) / f"seed{seed}"
        start = time.perf_counter()
        summary = run_pipeline(PipelineConfig(output_dir=str(run), seed=seed, torch_threads=args.threads,
                                              progress=False,
                                              model_path=args.model_path))
        wall = time.perf_counter() - start
        evaluation = json.loads((run / "eval.json").read_text())
        elo = evaluation["elo"]
        rows.append({"seed": seed, **{k: summary[k] for k in TARGETS}, "ppo_kl_to_sft": summary["ppo_kl_to_sft"],
                     "kl_budget": summary["kl_budget"], "ppo_selected": summary.get("ppo_selected"),
                     "dpo_kl_to_sft": summary["dpo_kl_to_sft"],
                     "dpo_selected": summary.get("dpo_selected"),
                     "elo_sft": elo["sft"], "elo_ppo": elo["ppo"], "elo_dpo": elo["dpo"], "wall_seconds": wall,
                     "eval_rows": evaluation["rows"]})
    table = [{k: v for k, v in r.items() if k != "eval_rows"} for r in rows]
    print_table(f"rlhf pipeline on {args.model_path or 'the embedded default'}, per seed", table)
    checks = {name: {"target": target, "worst_seed": min(r[name] for r in rows),
                     "mean": statistics.mean(r[name] for r in rows),
                     "met_by_every_seed": all(r[name] >= target for r in rows)} for name, target in TARGETS.items()}
    checks["ppo_kl_within_target"] = {"met_by_every_seed": all(r["ppo_kl_to_sft"] <= r["kl_budget"] for r in rows),
                                      "worst_seed": max(r["ppo_kl_to_sft"] for r in rows)}
    checks["dpo_kl_within_target"] = {"met_by_every_seed": all(r["dpo_kl_to_sft"] <= r["kl_budget"] for r in rows),
                                      "worst_seed": max(r["dpo_kl_to_sft"] for r in rows)}
    checks["wall_seconds"] = {"max": max(r["wall_seconds"] for r in rows), "target": 600}
    print_table("Targets", [{"figure": k, **v} for k, v in checks.items()])
    data = {"seeds": args.seeds, "runs": rows, "checks": checks,
            "config": {k: v for k, v in vars(PipelineConfig()).items()}}
    if args.model_path is not None:
        write_json(f"pipeline_{Path(args.model_path).name}", {"model_path": args.model_path, **data})
        return data
    write_json("pipeline", data)
    first = Path(args.out) / f"seed{args.seeds[0]}"
    for picture in ("gold_vs_kl.png", "ppo_training.png"):  # the README shows the first seed's plots
        shutil.copyfile(first / picture, RESULTS_DIR / f"pipeline_{picture}")
    return data


if __name__ == "__main__":
    main()
