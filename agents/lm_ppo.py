"""RLHF PPO for language models against ``TextBandit-v0`` (InstructGPT's recipe).

One iteration reads top to bottom in :func:`train_lm_ppo`:

1. **Rollout.** The vector env hands out ``batch_size`` prompts; the policy samples a response to
   each with the shared KV-cached sampler.
2. **Old log-probs and values** in one teacher-forced pass of the policy (and its value head).
   These log-probs are handed to the env *before* ``step`` (the env's only KL mechanism), so the
   KL the env computes and the PPO ratio use the very same numbers.
3. **Scoring** is the env's ``step``: one batched reference pass and one batched reward call. It
   returns the score and the per-token KL; the per-token reward is ``-beta * kl_t`` with the score
   added on the last token. With ``target_kl`` set, the env's adaptive controller moves beta.
4. **GAE** per token, advantages whitened over the batch.
5. **Update**: ``ppo_epochs`` passes over minibatches: clipped surrogate, clipped value loss,
   optionally the pretraining loss mixed in (PPO-ptx, coefficient ``ptx_coef``).

Logged names follow TRL's PPO trainer (``objective/kl``, ``objective/scores``, ``policy/approxkl_avg``...).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

import rlhf_envs  # noqa: F401  (registers the envs)
from agents.lm_ppo_losses import gae, masked_mean, masked_whiten, policy_loss, token_rewards, value_loss
from rlhf_envs.sampling import SamplingConfig, generate, positions_from_mask, processed_logprobs


@dataclass
class LMPPOConfig:
    """Hyper-parameters of RLHF PPO (InstructGPT / Ziegler et al. names where they exist)."""

    model_path: str | None = field(default=None, metadata={"help": "policy initialisation, a local causal-LM directory (the SFT model); None = embedded default"})
    ref_model_path: str | None = field(default=None, metadata={"help": "frozen reference model for the KL term; None = the same as model_path"})
    reward_model: str = field(default="sentiment", metadata={"help": "reward plugin name (sentiment, learned, or a registered plugin)"})
    reward_model_path: str | None = field(default=None, metadata={"help": "checkpoint directory for the 'learned' reward plugin"})
    prompts: list | None = field(default=None, metadata={"help": "training prompts; None = the env's default (corpus prompts)"})
    output_dir: str = field(default="runs/ppo", metadata={"help": "policy, value head, metrics.jsonl and checkpoints go here"})
    seed: int = field(default=0, metadata={"help": "seed of torch, numpy, the env and the sampler"})
    total_episodes: int = field(default=2048, metadata={"help": "responses sampled over the whole run"})
    batch_size: int = field(default=64, metadata={"help": "responses per rollout (the vector env's num_envs)"})
    num_minibatches: int = field(default=4, metadata={"help": "minibatches per PPO epoch"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout"})
    learning_rate: float = field(default=3e-5, metadata={"help": "Adam learning rate of policy and value head"})
    max_new_tokens: int = field(default=24, metadata={"help": "longest response, EOS included"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (the KL and ratio use the same distribution)"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling; 0 = off"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass; 1.0 = off"})
    beta: float = field(default=0.05, metadata={"help": "KL coefficient (initial value when target_kl is set)"})
    target_kl: float | None = field(default=None, metadata={"help": "sequence-level KL target of the adaptive controller; None = fixed beta"})
    kl_estimator: str = field(default="k1", metadata={"help": "per-token KL estimator of the env: k1, k2, k3 or exact"})
    gamma: float = field(default=1.0, metadata={"help": "discount over tokens"})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE lambda over tokens"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value prediction clip"})
    vf_coef: float = field(default=0.1, metadata={"help": "value loss coefficient"})
    whiten_advantages: bool = field(default=True, metadata={"help": "whiten advantages over the rollout"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "global gradient-norm clip"})
    ptx_coef: float = field(default=0.0, metadata={"help": "PPO-ptx: weight of the pretraining LM loss mixed into each update (gamma in InstructGPT)"})
    ptx_texts: list | None = field(default=None, metadata={"help": "pretraining texts for PPO-ptx; None = corpus reviews"})
    save_every: int = field(default=0, metadata={"help": "write a resumable checkpoint every this many iterations (0 = only at the end)"})
    snapshot_every: int = field(default=0, metadata={"help": "also keep the policy every this many iterations as snapshots/iter-N (for reward-vs-KL curves)"})
    resume: bool = field(default=False, metadata={"help": "continue from output_dir/checkpoint"})
    torch_threads: int | None = field(default=None, metadata={"help": "torch intra-op threads; None = torch's default"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        for name in ("total_episodes", "batch_size", "num_minibatches", "ppo_epochs", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LMPPOConfig.{name} must be a positive integer, got {value!r}")
        if self.batch_size % self.num_minibatches:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by num_minibatches {self.num_minibatches}")
        if self.beta < 0:
            raise ValueError(f"LMPPOConfig.beta must be >= 0, got {self.beta!r}; 0 turns the KL penalty off")
        if self.target_kl is not None and not self.target_kl > 0:
            raise ValueError(f"LMPPOConfig.target_kl must be > 0 or None, got {self.target_kl!r}")
        for name in ("learning_rate", "cliprange", "cliprange_value", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LMPPOConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"LMPPOConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.ptx_coef < 0:
            raise ValueError(f"LMPPOConfig.ptx_coef must be >= 0, got {self.ptx_coef!r}")
        if self.reward_model == "learned" and not self.reward_model_path:
            raise ValueError("reward_model='learned' needs reward_model_path= (a directory written by `rlhf rm`)")
        SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    @property
    def num_iterations(self) -> int:
        return max(1, self.total_episodes // self.batch_size)


class ValueHead(nn.Module):
    """A scalar value per position from the policy's last hidden state (zero-initialised)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden).squeeze(-1)


def policy_forward(policy: nn.Module, v_head: ValueHead, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   response_ids: torch.Tensor, response_mask: torch.Tensor, cfg: SamplingConfig):
    """One teacher-forced pass: ``(logprobs [B, T], values [B, T], entropy [B, T])`` of the responses
    under the processed (sampled-from) distribution; the value at t is that of the state before token t."""
    prompt_len = prompt_ids.shape[1]
    mask = torch.cat([prompt_mask.bool(), response_mask.bool()], dim=1)
    out = policy(input_ids=torch.cat([prompt_ids, response_ids], dim=1), attention_mask=mask.long(),
                 position_ids=positions_from_mask(mask), output_hidden_states=True, use_cache=False)
    full = processed_logprobs(out.logits[:, prompt_len - 1:-1], cfg)
    logprobs = full.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    probs = full.exp()
    entropy = -(probs * full.masked_fill(probs == 0, 0.0)).sum(-1)
    values = v_head(out.hidden_states[-1][:, prompt_len - 1:-1])
    keep = response_mask.bool()
    return logprobs.masked_fill(~keep, 0.0), values.masked_fill(~keep, 0.0), entropy.masked_fill(~keep, 0.0)
