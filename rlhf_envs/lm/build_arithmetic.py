"""Build the arithmetic task's model: a character tokenizer (one token per digit) and a small GPT-2.

Run ``python -m rlhf_envs.lm.build_arithmetic`` to regenerate ``rlhf_envs/assets/arithmetic`` from
scratch (nothing is downloaded). The corpus is ``<|endoftext|> problem=answer <|endoftext|>`` over
problems of the **training** split of :mod:`rlhf_envs.text_arithmetic` (the held-out problems are
never seen). The training is deliberately short: the model knows the format and is right on some
problems, so that SFT lands in the middle and RL has room to raise it.

Seeded and on one thread (the same seed gives the same weights on the same machine), through the
training loop of :mod:`rlhf_envs.lm.build_embedded`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rlhf_envs.lm.build_embedded import BuildConfig, encode, eval_loss, train_model, write_atomically

DEFAULTS = dict(n_texts=60_000, n_layer=3, n_embd=96, n_head=4, n_positions=32, batch_size=128, max_steps=2000,
                lr=3e-3, warmup_steps=50, weight_decay=0.1)
"""The committed model's settings (:class:`rlhf_envs.lm.build_embedded.BuildConfig` fields)."""


def build(out: Path, seed: int = 0, progress: bool = True, **overrides) -> dict:
    """Train tokenizer and model on the training split's texts and write them to ``out``; returns build info."""
    from rlhf_envs.text_arithmetic import make_arithmetic_tokenizer, make_problems, solve

    start = time.perf_counter()
    config = BuildConfig(out=out, seed=seed, progress=progress, **{**DEFAULTS, **overrides})
    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(config.threads)
    try:
        problems = make_problems(config.n_texts + 1000, seed + 1, "train")
        texts = [p + solve(p) for p in problems]
        tokenizer = make_arithmetic_tokenizer()
        tokenizer.model_max_length = config.n_positions
        model, stats = train_model(encode(texts[1000:], tokenizer, config.n_positions), tokenizer, config)
        held = eval_loss(model, encode(texts[:1000], tokenizer, config.n_positions), tokenizer.pad_token_id)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)
    info = {"seed": seed, "corpus": "arithmetic train split", "n_texts": len(texts) - 1000, **stats,
            "eval_loss": round(held, 4), "n_parameters": sum(p.numel() for p in model.parameters()),
            "config": {k: v for k, v in {**DEFAULTS, **overrides}.items()}, "torch_version": torch.__version__}
    write_atomically(config.out, model, tokenizer, info, start)
    return info


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m rlhf_envs.lm.build_arithmetic``."""
    from rlhf_envs.text_arithmetic import ASSET_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSET_DIR, help="output directory (replaced atomically)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus, the init and the batch order")
    parser.add_argument("--max-steps", type=int, default=DEFAULTS["max_steps"], help="optimizer steps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    info = build(args.out, args.seed, not args.no_progress, max_steps=args.max_steps)
    print(json.dumps({k: v for k, v in info.items() if k != "config"}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
