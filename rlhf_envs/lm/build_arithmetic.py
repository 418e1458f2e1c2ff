"""Build the arithmetic task's model: a character tokenizer (one token per digit) and a small GPT-2.

Run ``python -m rlhf_envs.lm.build_arithmetic`` to regenerate ``rlhf_envs/assets/arithmetic`` from
scratch (nothing is downloaded). The corpus is ``<|endoftext|> problem=answer <|endoftext|>`` over
problems of the **training** split of :mod:`rlhf_envs.text_arithmetic` (the held-out problems are
never seen); the loss covers the answer and its EOS (the operands are random digits: predicting them
teaches nothing). The training is deliberately short: the model is right on some problems, so that
SFT lands in the middle and RL has room to raise it.

Seeded, on one thread: the same seed gives the same weights on the same machine. Written atomically
with :func:`rlhf_envs.lm.build_embedded.write_atomically`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

BUILD = dict(n_texts=10_000, n_layer=2, n_embd=96, n_head=4, n_positions=32, batch_size=256, max_steps=1200, lr=3e-3)
"""The committed model's settings."""


def encode_examples(tokenizer, problems: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [N, L], labels [N, L])``: ``BOS problem answer EOS`` right-padded; labels on answer and EOS only."""
    from rlhf_envs.text_arithmetic import solve

    rows = [(tokenizer(p)["input_ids"], tokenizer(solve(p), add_special_tokens=False)["input_ids"]) for p in problems]
    width = max(len(p) + len(a) + 1 for p, a in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, (p, a) in enumerate(rows):
        seq = p + a + [tokenizer.eos_token_id]
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(p):len(seq)] = torch.tensor(a + [tokenizer.eos_token_id])
    return ids, labels


def train(tokenizer, seed: int, settings: dict, progress: bool = False):
    """A GPT-2 trained with AdamW (cosine decay to a tenth) on the answers of training-split problems."""
    from tqdm import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_envs.text_arithmetic import make_problems

    torch.manual_seed(seed)
    ids, labels = encode_examples(tokenizer, make_problems(settings["n_texts"], seed + 1, "train"))
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=settings["n_positions"], n_embd=settings["n_embd"],
        n_layer=settings["n_layer"], n_head=settings["n_head"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    steps = settings["max_steps"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(s / steps * torch.pi)).item()))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in tqdm(range(steps), disable=not progress, desc="arithmetic GPT-2"):
        batch = torch.randint(len(ids), (settings["batch_size"],), generator=generator)
        attention = (ids[batch] != tokenizer.pad_token_id).long()
        attention[:, 0] = 1
        loss = model(input_ids=ids[batch], attention_mask=attention, labels=labels[batch]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return model, {"steps": steps, "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4)}


def build(out: Path, seed: int = 0, progress: bool = True, **overrides) -> dict:
    """Tokenizer and model per :data:`BUILD` (with ``overrides``) written to ``out``; returns the build info."""
    from rlhf_envs.lm.build_embedded import write_atomically
    from rlhf_envs.text_arithmetic import make_arithmetic_tokenizer

    start = time.perf_counter()
    settings = {**BUILD, **overrides}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer = make_arithmetic_tokenizer()
        tokenizer.model_max_length = settings["n_positions"]
        model, stats = train(tokenizer, seed, settings, progress)
    finally:
        torch.set_num_threads(threads)
    info = {"seed": seed, "corpus": "arithmetic train split, loss on answers", **stats,
            "n_parameters": sum(p.numel() for p in model.parameters()), "config": settings,
            "train_seconds": round(time.perf_counter() - start, 1), "torch_version": torch.__version__}
    write_atomically(Path(out), model, tokenizer, info, start)
    return info


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m rlhf_envs.lm.build_arithmetic``."""
    from rlhf_envs.text_arithmetic import ASSET_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSET_DIR, help="output directory (replaced atomically)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corpus, the init and the batch order")
    parser.add_argument("--max-steps", type=int, default=BUILD["max_steps"], help="optimizer steps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    info = build(args.out, args.seed, not args.no_progress, max_steps=args.max_steps)
    print(json.dumps({k: v for k, v in info.items() if k != "config"}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
