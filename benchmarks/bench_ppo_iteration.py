"""One RLHF PPO iteration broken down by phase, on the embedded model (issue: make the slowest phase visible).

Phases, as :func:`agents.lm_ppo.train_lm_ppo` times them:
- rollout: sampling the batch's responses (KV-cached sampler) plus the policy's teacher-forced pass
  for old log-probs and values;
- scoring: the env's ``step`` (reference model's teacher-forced pass, reward call, KL);
- update: the PPO epochs (forward, backward, optimizer) over minibatches.

    python -m benchmarks.bench_ppo_iteration [--iterations 6] [--batch-size 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from agents.lm_ppo import LMPPOConfig, train_lm_ppo
from benchmarks.common import print_table, write_json

PHASES = ("time/rollout_s", "time/scoring_s", "time/update_s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as out:
        result = train_lm_ppo(LMPPOConfig(output_dir=out, total_episodes=args.batch_size * args.iterations,
                                          batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                          torch_threads=args.threads, progress=False))
    rows = result.history[1:]  # the first iteration includes one-off warm-up
    medians = {phase: statistics.median(r[phase] for r in rows) for phase in PHASES}
    total = sum(medians.values())
    table = [{"phase": p.removeprefix("time/").removesuffix("_s"), "median_seconds": medians[p],
              "share": medians[p] / total}
             for p in PHASES]
    print_table(f"RLHF PPO iteration on the embedded model (batch {args.batch_size}, "
                f"{args.max_new_tokens} new tokens, sentiment reward, median of {len(rows)} iterations)", table)
    data = {"settings": vars(args), "phases": table, "iteration_seconds": total,
            "responses_per_second": args.batch_size / total,
            "mean_response_tokens": statistics.mean(r["tokens/response_length_mean"] for r in rows)}
    write_json("ppo_iteration", data)
    return data


if __name__ == "__main__":
    main()
