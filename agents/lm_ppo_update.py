"""Phase 5 of RLHF PPO (:mod:`agents.lm_ppo`): minibatch epochs over a rollout, with PPO-ptx's pretraining loss.

``config`` below is an :class:`agents.lm_ppo.LMPPOConfig`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from agents.distributed import shard
from agents.lm_policy import PolicyWithValueHead
from agents.lm_ppo_losses import masked_mean, policy_loss, value_loss
from rlhf_envs.lm.sampling import SamplingConfig

__all__ = ["STAT_KEYS", "minibatch_loss", "ppo_update", "ptx_batches", "ptx_loss"]


def ptx_batches(config: Any, tokenizer, generator: torch.Generator):
    """Endless minibatches of pretraining text (input ids, attention mask) for PPO-ptx."""
    from rlhf_envs.corpus import make_reviews

    texts = config.ptx_texts or make_reviews(4096, seed=config.seed + 7)
    eos = tokenizer.eos_token
    enc = tokenizer([eos + t + eos for t in texts], return_tensors="pt", padding=True, truncation=True, max_length=64)
    size = config.batch_size // config.num_minibatches
    while True:
        for idx in torch.randperm(len(texts), generator=generator).split(size):
            yield enc["input_ids"][idx], enc["attention_mask"][idx]


def ptx_loss(lm: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


STAT_KEYS = ("approxkl", "pg_loss", "vf_loss", "clipfrac", "vf_clipfrac", "entropy", "ptx_loss")


def minibatch_loss(model: PolicyWithValueHead, batch: dict[str, Any], config: Any, cfg: SamplingConfig,
                    truncated: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One minibatch (this process's share of it): the scaled PPO loss (+ PPO-ptx) and its stats, unscaled.
    ``truncated``: the sampler removes tokens (top-k/top-p), see :func:`agents.lm_ppo_losses.policy_loss`."""
    m = batch["response_mask"]
    logprobs, values, entropy = model(batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], m, cfg)
    pg, pg_stats = policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], m, config.cliprange,
                               truncated=truncated)
    vf, vf_stats = value_loss(values, batch["old_values"], batch["returns"], m, config.cliprange_value)
    loss = batch["scale"] * (pg + config.vf_coef * vf)
    stats = {"approxkl": pg_stats["approx_kl"], "pg_loss": pg.detach(), "vf_loss": vf.detach(),
             "clipfrac": pg_stats["clipfrac"], "vf_clipfrac": vf_stats["clipfrac"],
             "entropy": masked_mean(entropy.detach(), m)}
    if "ptx_ids" in batch:
        ptx = ptx_loss(model.lm, batch["ptx_ids"], batch["ptx_mask"])
        loss = loss + config.ptx_coef * batch["ptx_scale"] * ptx
        stats["ptx_loss"] = ptx.detach()
    return loss, stats


def ppo_update(step_loss: Any, model: nn.Module, optimizer: torch.optim.Optimizer, rollout: dict[str, torch.Tensor],
                config: Any, generator: torch.Generator, ptx: Any, rank: int = 0, world: int = 1
                ) -> tuple[dict[str, list[float]], bool]:
    """``ppo_epochs`` passes of minibatches over the whole batch ``rollout``; returns the stats and whether
    the approx-KL stop ended it early.

    Every process draws the same minibatches from ``generator`` and back-propagates its share of each
    (:func:`agents.lm_common.shard`, weighed by response tokens, as the losses are means over tokens);
    the stats are the whole minibatch's (scaled shares summed over the processes).
    """
    mb_size = config.batch_size // config.num_minibatches
    tokens = rollout["response_mask"].sum(-1).tolist()

    stats: dict[str, list[float]] = {k: [] for k in STAT_KEYS}
    for _epoch in range(config.ppo_epochs):
        perm = torch.randperm(config.batch_size, generator=generator)
        for mb in perm.split(mb_size):
            mine, scale = shard(mb.tolist(), rank, world, tokens)
            batch = {key: value[mine] for key, value in rollout.items()}
            batch["scale"] = scale
            ptx_scale = 1.0
            if ptx is not None:
                ids, mask = next(ptx)
                rows, ptx_scale = shard(list(range(len(ids))), rank, world, mask[:, 1:].sum(-1).tolist())
                batch.update(ptx_ids=ids[rows], ptx_mask=mask[rows], ptx_scale=ptx_scale)
            loss, mb_stats = step_loss(batch)
            keys = [k for k in STAT_KEYS if k in mb_stats]
            values = torch.stack([mb_stats[k].float() * (ptx_scale if k == "ptx_loss" else scale) for k in keys])
            if world > 1:
                # every process receives the same sum (as DDP's averaged gradients), so all take the same decision below
                dist.all_reduce(values)
                values /= world
            figures = dict(zip(keys, values.tolist()))
            # checked per minibatch, before its step: one bad step can wreck a small LM
            if config.max_approx_kl is not None and figures["approxkl"] > config.max_approx_kl:
                stats["approxkl"].append(figures["approxkl"])
                return stats, True
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm, foreach=True)
            optimizer.step()
            for key, value in figures.items():
                stats[key].append(value)
    return stats, False
