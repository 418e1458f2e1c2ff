"""The task models of TextDialogue's games: tiny GPT-2s fine-tuned (SFT) on scripted demonstrations, built in code.

Each is the SFT starting point and the KL reference of its game, committed under ``rlhf_envs/assets/``.
Rebuild both (seeded, one CPU thread, about a minute each)::

    python -m rlhf_envs.dialogue_models            # writes rlhf_envs/assets/dialogue_guess/ and dialogue_calc/

The demonstrators are deliberately imperfect, so that RL has something to improve:

* guess: each turn a uniform draw among the numbers still consistent with the replies, and with
  probability ``0.3`` a uniform draw from all of ``1..16`` (often a wasted turn). Binary search is never shown.
* calc: half the episodes call ``calc(a*b)`` and copy the result, half answer at once (the true product,
  which a model this small cannot compute); a fifth run with the tool off (``=?;``) and then answer.

The loss covers the policy's tokens only (guesses, calls, answers, turn-end markers); the env's are context.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from rlhf_envs.dialogue_games import CalculatorGame, GuessNumberGame, evaluate_expression, make_word_tokenizer

__all__ = ["build_calc_model", "build_guess_model", "calc_demonstrations", "guess_demonstrations"]

Segments = list[tuple[str, bool]]
"""One demonstration: ``(text, written by the policy)`` pieces in order; a policy piece is followed by ``<eot>``."""


def guess_demonstrations(rng: np.random.Generator, n: int, high: int = 16, p_random: float = 0.3) -> list[Segments]:
    """``n`` episodes of the noisy consistent guesser (module docstring), at most ``GuessNumberGame.max_turns``."""
    episodes = []
    for _ in range(n):
        game = GuessNumberGame(high)
        segments: Segments = [(game.reset(rng), False)]
        lo, hi = 1, high
        for _turn in range(GuessNumberGame.max_turns):
            guess = int(rng.integers(1, high + 1)) if rng.random() < p_random else int(rng.integers(lo, hi + 1))
            reply, _, over = game.reply(str(guess))
            segments += [(str(guess), True), (reply, False)]
            if over:
                break
            lo, hi = (max(lo, guess + 1), hi) if reply == "higher" else (lo, min(hi, guess - 1))
        episodes.append(segments)
    return episodes


def calc_demonstrations(rng: np.random.Generator, n: int) -> list[Segments]:
    """``n`` calculator episodes (module docstring)."""
    episodes = []
    for _ in range(n):
        game = CalculatorGame(tool=bool(rng.random() >= 0.2))
        opening = game.reset(rng)
        product = str(evaluate_expression(opening.rstrip("=")))
        segments: Segments = [(opening, False)]
        if not game.tool or rng.random() < 0.5:
            call = f"calc({opening.rstrip('=')})"
            reply, _, _ = game.reply(call)
            segments += [(call, True), (reply, False)]
        segments.append((product, True))
        episodes.append(segments)
    return episodes


def _encode(tokenizer: Any, episodes: list[Segments]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids ``[N, L]`` and SFT labels (-100 outside the policy's tokens)."""
    eot = tokenizer.eos_token_id
    cache: dict[str, list[int]] = {}
    rows, labels = [], []
    for segments in episodes:
        ids: list[int] = []
        label: list[int] = []
        for text, policy in segments:
            if text not in cache:
                cache[text] = tokenizer(text, add_special_tokens=False)["input_ids"]
            piece = cache[text] + ([eot] if policy else [])
            ids += piece
            label += piece if policy else [-100] * len(piece)
        rows.append(ids)
        labels.append(label)
    width = max(map(len, rows))
    out = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, label) in enumerate(zip(rows, labels)):
        out[i, :len(ids)], lab[i, :len(label)] = torch.tensor(ids), torch.tensor(label)
    return out, lab


def _train(tokenizer: Any, episodes: list[Segments], n_positions: int, seed: int, steps: int,
           out_dir: Path, n_embd: int = 64, n_layer: int = 2) -> tuple[Any, Any]:
    """Fit a GPT-2 on ``episodes`` (loss on the policy's tokens), seeded on one thread; save it with its tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ids, labels = _encode(tokenizer, episodes)
        if ids.shape[1] > n_positions:
            raise ValueError(f"demonstrations of {ids.shape[1]} tokens exceed n_positions={n_positions}")
        torch.manual_seed(seed)
        eot, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                            n_head=4, bos_token_id=eot, eos_token_id=eot, pad_token_id=pad, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(steps):
            batch = torch.randint(len(ids), (128,), generator=generator)
            mask = (ids[batch] != pad).long()
            loss = model(input_ids=ids[batch], attention_mask=mask, labels=labels[batch]).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model, tokenizer


def build_guess_model(out_dir: str | Path = GuessNumberGame.model_dir, seed: int = 0,
                      steps: int = 1500) -> tuple[Any, Any]:
    """The guess game's task model from 20,000 noisy-guesser episodes; returns ``(model, tokenizer)``."""
    episodes = guess_demonstrations(np.random.default_rng(seed), 20000)
    return _train(make_word_tokenizer(GuessNumberGame.words()), episodes, GuessNumberGame.max_context_tokens + 1,
                  seed, steps, Path(out_dir))


def build_calc_model(out_dir: str | Path = CalculatorGame.model_dir, seed: int = 0,
                     steps: int = 1500) -> tuple[Any, Any]:
    """The calculator game's task model from 20,000 demonstrations; returns ``(model, tokenizer)``."""
    episodes = calc_demonstrations(np.random.default_rng(seed), 20000)
    return _train(make_word_tokenizer(CalculatorGame.words()), episodes, CalculatorGame.max_context_tokens + 1,
                  seed, steps, Path(out_dir))


BUILDERS: dict[str, Callable[..., tuple[Any, Any]]] = {"guess": build_guess_model, "calc": build_calc_model}

if __name__ == "__main__":
    import sys

    for name in sys.argv[1:] or list(BUILDERS):
        BUILDERS[name]()
        print(f"wrote the {name} task model")
