"""Evaluation on tasks with an exact checker: pass@1 and pass@k on held-out problems, response length, KL.

:func:`evaluate_verifiable` samples ``k`` responses per problem from a model with the shared sampler and
scores them with the task's verifier; pass@k is the unbiased estimator of Chen et al. (2021),
``1 - C(n - c, k) / C(n, k)`` with ``c`` right answers among ``n`` samples.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from rlhf_envs.lm.sampling import SamplingConfig, generate, response_logprobs

__all__ = ["evaluate_verifiable", "pass_at_k"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of ``k`` of the ``n`` samples (``c`` of them right) is right."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n samples, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _encode(tokenizer: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = True
    return ids, mask


@torch.no_grad()
def evaluate_verifiable(model: Any, tokenizer: Any, prompts: Sequence[str], reward: Any, k: int = 8,
                        max_new_tokens: int = 6, temperature: float = 1.0, seed: int = 0, batch_size: int = 512,
                        ref_model: Any = None) -> dict[str, float]:
    """``pass@1`` and ``pass@k`` (``k`` samples per prompt at ``temperature``), ``greedy_accuracy``,
    ``response_length`` (mean tokens, EOS included) and, with ``ref_model``, ``kl`` (mean sequence k1 KL
    ``log pi - log pi_ref`` over the samples, nats). A response is right when ``reward.score`` gives it >= 1.
    """
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, greedy=True)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    right, greedy_right, lengths, kls = [], [], [], []
    per_batch = max(1, batch_size // k)
    for start in range(0, len(prompts), per_batch):
        batch = list(prompts[start:start + per_batch])
        ids, mask = _encode(tokenizer, batch)
        rep_ids, rep_mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
        gen = generate(model, rep_ids, rep_mask, cfg, eos_token_id=eos, pad_token_id=pad, generator=generator)
        texts = _decode(tokenizer, gen.response_ids, gen.response_mask, eos)
        scores = np.asarray(reward.score([p for p in batch for _ in range(k)], texts))
        right.append((scores >= 1).reshape(len(batch), k))
        lengths.append(gen.response_mask.sum(-1).float().numpy())
        if ref_model is not None:
            ref = response_logprobs(ref_model, rep_ids, rep_mask, gen.response_ids, gen.response_mask, cfg)
            kls.append(((gen.logprobs - ref) * gen.response_mask).sum(-1).numpy())
        g = generate(model, ids, mask, greedy, eos_token_id=eos, pad_token_id=pad)
        greedy_texts = _decode(tokenizer, g.response_ids, g.response_mask, eos)
        greedy_right.append(np.asarray(reward.score(batch, greedy_texts)) >= 1)
    right = np.concatenate(right)
    counts = right.sum(-1)
    out = {"pass@1": float(np.mean([pass_at_k(k, int(c), 1) for c in counts])),
           f"pass@{k}": float(np.mean([pass_at_k(k, int(c), k) for c in counts])),
           "greedy_accuracy": float(np.concatenate(greedy_right).mean()),
           "response_length": float(np.concatenate(lengths).mean()), "n_prompts": len(prompts), "k": k}
    if kls:
        out["kl"] = float(np.concatenate(kls).mean())
    return out


def _decode(tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, eos: int) -> list[str]:
    keep = mask & (ids != eos)
    return tokenizer.batch_decode([row[k].tolist() for row, k in zip(ids, keep)], skip_special_tokens=True)
