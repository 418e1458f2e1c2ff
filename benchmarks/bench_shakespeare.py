"""The whole RLHF pipeline on real text: tinyshakespeare, "continue this passage positively".

It is the product's own path, `rlhf pipeline --corpus ../shared/data/tinyshakespeare.txt` with the
default settings (:mod:`benchmarks.bench_corpus` runs it and times it): the pipeline pretrains the
tokenizer and a small GPT-2 on the text (:mod:`agents.pretrain`), cuts demonstrations and prompts
out of it (:mod:`agents.text_corpus`: a prompt is a passage's first 4 to 8 words, its completion the
next 14 at most), then runs SFT, the gold-ranked preferences, the reward model, PPO and DPO, and
evaluates on held-out prompts. The text is read from ``../shared/data`` and never copied into the
repository.

    python -m benchmarks.bench_shakespeare --threads 1   # 7.5 minutes on 2 cores at a load of 3.7; 21 at 6.8
    python -m benchmarks.bench_shakespeare --quick    # a smoke run of a few minutes, not for the README

The run folder is ``--out`` (default ``runs/bench_shakespeare``, which git ignores); the table,
the timings and the machine's load go to ``benchmarks/results/shakespeare.json``. On a machine
shared by more processes than it has cores, give one thread: torch's two threads ran pretraining
4.7 times slower than one there (16 against 3.4 s a step at a load of about 11, 2026-12-04).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.bench_corpus import run

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
DEFAULT_OUT = REPO / "runs" / "bench_shakespeare"


def find_data(path: Path | None) -> Path:
    """The tinyshakespeare text: ``path`` or ``<repo>/../shared/data/tinyshakespeare.txt``."""
    path = Path(path) if path is not None else DEFAULT_DATA
    if not path.is_file():
        raise FileNotFoundError(f"tinyshakespeare not found at {path}: this benchmark reads the real text from "
                                f"{DEFAULT_DATA} (never from the repository); put it there or pass --data PATH.")
    return path


def main(argv: list[str] | None = None) -> dict:
    """Entry point of ``python -m benchmarks.bench_shakespeare``; returns what it writes to the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help=f"tinyshakespeare.txt (default {DEFAULT_DATA})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the run folder (not the repo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every stage")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, as the "
                                                                  "product)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run, not for the README")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress bars")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}; expected a positive integer.")
    out = args.out.resolve()
    return run([find_data(args.data)], "shakespeare_quick" if args.quick else "shakespeare", out, seed=args.seed,
               threads=args.threads, quick=args.quick, progress=args.progress)


if __name__ == "__main__":
    main()
