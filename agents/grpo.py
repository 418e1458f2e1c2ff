"""Critic-free group methods for language models: GRPO, Dr. GRPO, DAPO, RLOO and REINFORCE++, one trainer.

One iteration reads top to bottom in :func:`train_grpo`:

1. **Rollout.** The vector env hands out ``batch_size / group_size`` prompts, each ``group_size``
   times (``gym.make_vec(env_id, num_envs=batch_size, group_size=G)``); the policy samples a response
   to each with the shared KV-cached sampler; one teacher-forced pass of the policy
   (:func:`agents.lm_policy.policy_forward`, the packed path) gives the old log-probs, handed to the env.
   With one gradient step per rollout and ``beta == 0`` that pass is skipped: the old log-probs are the
   training pass's own, detached (the ratio is exactly 1, as in TRL).
2. **Scoring** is the env's ``step``: the reward plugin (``verifier`` on ``TextArithmetic-v0``) and,
   unless ``beta == 0``, one reference pass. ``kl_in="reward"``: the env's reward is ``score - beta *
   KL`` (k1, InstructGPT's); ``kl_in="loss"``: the env runs the reference with beta 0 and the trainer
   adds ``beta * k3`` (or ``k2``) per token to the loss. ``beta == 0`` skips the reference pass.
3. **Dynamic sampling** (DAPO): groups whose scores are all equal carry no signal; they are dropped
   and more groups are sampled (up to ``max_refills`` rollouts) until ``batch_size / G`` groups remain.
4. **Advantages** per response from its group (:data:`agents.grpo_losses.ADVANTAGES`), after DAPO's
   optional overlong shaping of the reward.
5. **Update**: ``ppo_epochs`` passes of ``num_minibatches`` minibatches with the clipped ratio
   (``[1 - cliprange, 1 + cliprange_high]``), the per-token loss aggregated by ``loss_type``
   (:data:`agents.grpo_losses.AGGREGATIONS`).

Logged names: ``objective/scores`` (mean score of every response sampled, refills included: accuracy on a
verifier task), ``objective/trained_scores`` (of the responses trained on), ``objective/kl``,
``groups/zero_variance_frac`` (of the groups sampled), ``groups/trained_zero_variance_frac`` (of the
sequences the update spent compute on; 0 under dynamic sampling), ``policy/clipfrac_avg``,
``policy/ratio_avg``, ``loss/policy_avg``, ``tokens/response_length_mean``.

Every iteration's prompts and samples come from seeds derived from ``(seed, iteration, refill)``, so a
resumed run makes the same rollouts as an uninterrupted one and ends with the same weights.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import rlhf_envs  # noqa: F401  (registers the envs)
from agents.grpo_losses import (
    ADVANTAGES,
    AGGREGATIONS,
    KL_LOSSES,
    clipped_token_loss,
    overlong_penalty,
    zero_variance_groups,
)
from agents.lm_policy import policy_forward
from rlhf_envs.lm.sampling import SamplingConfig, generate
from rlhf_envs.validation import check_config_fields

__all__ = ["GRPOConfig", "GRPOResult", "train_grpo"]

KL_PLACES = ("reward", "loss")


@dataclass
class GRPOConfig:
    """Hyper-parameters of the critic-free group trainer (TRL's names where they exist)."""

    model_path: str | None = field(default=None, metadata={"help": "policy initialisation, a local causal-LM "
                                                                   "directory (the SFT model); None = the env's "
                                                                   "default model"})
    ref_model_path: str | None = field(default=None, metadata={"help": "frozen reference for the KL term; None = the "
                                                                       "same as model_path"})
    env_id: str = field(default="TextArithmetic-v0", metadata={"help": "a registered text bandit env with group "
                                                                       "sampling (TextArithmetic-v0, TextBandit-v0)"})
    env_kwargs: dict = field(default_factory=dict, metadata={"help": "extra arguments of the env (e.g. "
                                                                     "{\"format_reward\": 0.1})"})
    prompts: list | None = field(default=None, metadata={"help": "training prompts; None = the env's default"})
    output_dir: str = field(default="runs/grpo", metadata={"help": "policy, metrics.jsonl and checkpoints go here"})
    seed: int = field(default=0, metadata={"help": "seed of torch, the env's prompt draws and the sampler"})
    total_episodes: int = field(default=4096, metadata={"help": "responses trained on over the whole run"})
    batch_size: int = field(default=64, metadata={"help": "responses per rollout (the vector env's num_envs)"})
    group_size: int = field(default=8, metadata={"help": "responses per prompt (G); must divide batch_size"})
    num_minibatches: int = field(default=1, metadata={"help": "minibatches per pass over a rollout"})
    ppo_epochs: int = field(default=1, metadata={"help": "passes over each rollout (several: the clipped ratio "
                                                         "matters)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "Adam learning rate"})
    warmup_iterations: int = field(default=0, metadata={"help": "linear learning-rate warm-up over this many "
                                                                "iterations (Adam's first steps are full-size in "
                                                                "every direction, noise included)"})
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "Adam's (beta1, beta2)"})
    max_new_tokens: int = field(default=6, metadata={"help": "longest response, EOS included"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (the ratio and the KL use the "
                                                              "same distribution)"})
    top_k: int = field(default=0, metadata={"help": "top-k sampling; 0 = off"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass; 1.0 = off"})
    advantage: str = field(default="grpo", metadata={"help": "grpo (group mean, / std with scale_rewards), rloo "
                                                             "(leave-one-out) or reinforce_pp (batch-normalised)"})
    scale_rewards: bool = field(default=True, metadata={"help": "divide grpo's and reinforce_pp's advantages by the "
                                                                "std; dr_grpo turns it off"})
    loss_type: str = field(default="grpo", metadata={"help": "grpo (mean per sequence, then over sequences), dr_grpo "
                                                             "(token sum / constant) or dapo (token-level mean)"})
    cliprange: float = field(default=0.2, metadata={"help": "lower ratio clip: the ratio is kept above 1 - cliprange"})
    cliprange_high: float | None = field(default=None, metadata={"help": "upper ratio clip (DAPO's clip-higher); None "
                                                                         "= 0.28 under dapo, cliprange otherwise"})
    dynamic_sampling: bool | None = field(default=None, metadata={"help": "drop zero-variance groups and sample more "
                                                                          "(DAPO); None = on under dapo"})
    max_refills: int = field(default=4, metadata={"help": "most extra rollouts dynamic sampling draws per iteration"})
    overlong_buffer: int = field(default=0, metadata={"help": "DAPO's soft overlong punishment over the last this "
                                                              "many tokens (0 = off)"})
    overlong_penalty: float = field(default=1.0, metadata={"help": "reward lost by a response of max_new_tokens "
                                                                   "tokens or a truncated one"})
    beta: float = field(default=0.0, metadata={"help": "KL coefficient; 0 = no KL and no reference pass"})
    kl_in: str = field(default="loss", metadata={"help": "reward (k1 through the env, InstructGPT-style) or loss "
                                                         "(kl_loss per token)"})
    kl_loss: str = field(default="k3", metadata={"help": "per-token KL in the loss: k3 (its gradient is the reverse "
                                                         "KL's) or k2 (the KL's, per token)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "global gradient-norm clip"})
    save_every: int = field(default=0, metadata={"help": "write a resumable checkpoint every this many iterations (0 "
                                                         "= only at the end)"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest "
                                                          "output_dir/checkpoints/checkpoint-<iteration>"})
    torch_threads: int | None = field(default=None, metadata={"help": "torch intra-op threads; None = torch's default"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        check_config_fields(self)
        for name, choices in (("advantage", ADVANTAGES), ("loss_type", AGGREGATIONS), ("kl_in", KL_PLACES),
                              ("kl_loss", KL_LOSSES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"GRPOConfig.{name}={getattr(self, name)!r} is unknown; choose one of {list(choices)}")
        for name in ("total_episodes", "batch_size", "group_size", "num_minibatches", "ppo_epochs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"GRPOConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.batch_size % self.group_size:
            raise ValueError(f"GRPOConfig.group_size={self.group_size} does not divide batch_size={self.batch_size}; "
                             f"pick a divisor of {self.batch_size}")
        if self.batch_size % self.num_minibatches:
            raise ValueError(f"GRPOConfig.num_minibatches={self.num_minibatches} does not divide "
                             f"batch_size={self.batch_size}")
        for name in ("learning_rate", "cliprange", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GRPOConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.cliprange_high is not None and not self.cliprange_high > 0:
            raise ValueError(f"GRPOConfig.cliprange_high must be > 0 or None, got {self.cliprange_high!r}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"GRPOConfig.adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        for name in ("beta", "max_refills", "overlong_buffer", "overlong_penalty", "warmup_iterations"):
            if getattr(self, name) < 0:
                raise ValueError(f"GRPOConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.overlong_buffer > self.max_new_tokens:
            raise ValueError(f"GRPOConfig.overlong_buffer={self.overlong_buffer} exceeds max_new_tokens="
                             f"{self.max_new_tokens}")
        if isinstance(self.prompts, str):
            raise TypeError("GRPOConfig.prompts must be a list of strings or None, got a single str; wrap it in a list")
        SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                       top_p=self.top_p)  # its checks now, before anything runs

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p)

    @property
    def num_iterations(self) -> int:
        return max(1, self.total_episodes // self.batch_size)

    @property
    def clip_high(self) -> float:
        """The upper clip in effect."""
        if self.cliprange_high is not None:
            return self.cliprange_high
        return 0.28 if self.loss_type == "dapo" else self.cliprange

    @property
    def drops_zero_variance(self) -> bool:
        """Whether dynamic sampling is on."""
        return self.loss_type == "dapo" if self.dynamic_sampling is None else self.dynamic_sampling


@dataclass
class GRPOResult:
    output_dir: str
    iterations: int
    history: list[dict]
    seconds: float
    completions: int
    """Responses sampled (refills included)."""


@dataclass
class _Run:
    config: GRPOConfig
    lm: nn.Module
    tokenizer: Any
    envs: Any
    optimizer: torch.optim.Optimizer
    start_iter: int = 0
    completions: int = 0
    metrics: Any = None

    @property
    def task(self):
        return self.envs.unwrapped.task


def _make_env(config: GRPOConfig):
    kwargs = dict(config.env_kwargs)
    if config.prompts is not None:
        kwargs["prompts"] = config.prompts
    model = config.ref_model_path or config.model_path
    if model is not None:
        kwargs["model"] = model
    kl_reward = config.kl_in == "reward"
    return gym.make_vec(config.env_id, num_envs=config.batch_size, group_size=config.group_size,
                        beta=config.beta if kl_reward else 0.0, skip_reference=config.beta == 0,
                        max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k,
                        top_p=config.top_p, **kwargs)


def _setup(config: GRPOConfig) -> _Run:
    """Seeds, env (whose default model is the policy's start when ``model_path`` is None), policy, optimizer, resume."""
    from agents.checkpoint import latest_checkpoint, load_checkpoint
    from agents.distributed import refuse_distributed
    from agents.lm_common import CPU_FUSED_ADAM, MetricsWriter, disable_dropout, fuse_gelu, set_seed
    from rlhf_envs.lm.loading import load_causal_lm

    refuse_distributed("rlhf grpo")
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    set_seed(config.seed)
    envs = _make_env(config)
    task = envs.unwrapped.task
    if config.model_path is None:
        import copy

        lm, tokenizer = copy.deepcopy(task.ref_model).requires_grad_(True), task.tokenizer
    else:
        lm, tokenizer = load_causal_lm(config.model_path)
    fuse_gelu(lm)
    disable_dropout(lm)  # the ratio must be exactly 1 before the first step
    if task.vocab_size != lm.get_output_embeddings().weight.shape[0]:
        raise ValueError(f"policy vocabulary {lm.get_output_embeddings().weight.shape[0]} != reference vocabulary "
                         f"{task.vocab_size}: the policy and ref_model must share a tokenizer")
    optimizer = torch.optim.Adam(lm.parameters(), lr=config.learning_rate, betas=tuple(config.adam_betas), eps=1e-5,
                                 fused=CPU_FUSED_ADAM)
    run = _Run(config, lm, tokenizer, envs, optimizer)
    out = Path(config.output_dir)
    latest = latest_checkpoint(out / "checkpoints") if config.resume else None
    if latest is not None:
        state = load_checkpoint(latest, model=lm, optimizer=optimizer)
        run.start_iter, run.completions = state["iteration"], state["completions"]
    run.metrics = MetricsWriter(out / "metrics.jsonl", resume_step=run.start_iter if config.resume else None)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str) + "\n")
    return run


def _rollout(run: _Run, seed: int) -> dict[str, torch.Tensor]:
    """Phases 1-2 for one env batch: prompts, responses, old log-probs, and the env's scores, KL and
    reference log-probs; responses padded to ``max_new_tokens``."""
    from rlhf_envs.text_common import attention_mask_from_obs

    config, task, width = run.config, run.task, run.config.max_new_tokens
    obs, _ = run.envs.reset(seed=seed)
    prompt_ids = torch.as_tensor(obs)
    prompt_mask = attention_mask_from_obs(prompt_ids, task.pad_token_id)
    generator = torch.Generator().manual_seed(seed)
    run.lm.eval()
    with torch.no_grad():
        # the env hands out each prompt to G consecutive rows: the sampler runs each prompt once
        G = config.group_size
        gen = generate(run.lm, prompt_ids[::G], prompt_mask[::G], config.sampling, eos_token_id=task.eos_token_id,
                       pad_token_id=task.pad_token_id, generator=generator, repeats=G)
        # one on-policy step without a KL needs no old log-probs: the training pass's, detached, are the same numbers
        old = gen.logprobs if _single_on_policy_step(config) else policy_forward(
            run.lm, None, prompt_ids, prompt_mask, gen.response_ids, gen.response_mask, config.sampling)[0]
    n, used = gen.response_ids.shape
    ids = torch.full((n, width), task.pad_token_id, dtype=torch.long)
    ids[:, :used] = gen.response_ids
    mask = torch.zeros(n, width, dtype=torch.bool)
    mask[:, :used] = gen.response_mask
    old_logprobs = torch.zeros(n, width)
    old_logprobs[:, :used] = old
    if not task.skip_reference:
        run.envs.set_policy_logprobs(old_logprobs.numpy())
    _, rewards, _, _, info = run.envs.step(ids.numpy())
    run.completions += n
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": ids, "response_mask": mask,
            "old_logprobs": old_logprobs, "ref_logprobs": torch.as_tensor(info["ref_logprobs"]),
            "rewards": torch.as_tensor(rewards, dtype=torch.float32),
            "scores": torch.as_tensor(info["score"], dtype=torch.float32),
            "kl": torch.as_tensor(info["kl"], dtype=torch.float32)}


def _single_on_policy_step(config: GRPOConfig) -> bool:
    """Whether each rollout gets one gradient step and no KL: then the ratio is ``exp(logp - logp.detach())``."""
    return config.ppo_epochs == 1 and config.num_minibatches == 1 and config.beta == 0


def _collect(run: _Run, iteration: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Phases 1-3: a rollout, and under dynamic sampling refills until ``batch_size / G`` groups have signal.

    Returns the batch to train on (its groups whole, in order) and the group statistics of all sampled groups.
    """
    config, G = run.config, run.config.group_size
    wanted = config.batch_size // G
    kept: list[dict[str, torch.Tensor]] = []
    n_groups = n_zero = have = 0
    sampled_scores = []
    for refill in range(config.max_refills + 1 if config.drops_zero_variance else 1):
        seed = (config.seed * 1_000_003 + iteration) * 101 + refill
        batch = _rollout(run, seed)
        sampled_scores.append(batch["scores"])
        zero = zero_variance_groups(batch["scores"], G)
        n_groups, n_zero = n_groups + len(zero), n_zero + int(zero.sum())
        if config.drops_zero_variance:
            keep = (~zero).repeat_interleave(G)
            batch = {k: v[keep] for k, v in batch.items()}
        kept.append(batch)
        have += len(batch["scores"]) // G
        if have >= wanted:
            break
    whole = {k: torch.cat([b[k] for b in kept])[:wanted * G] for k in kept[0]}
    trained_zero = zero_variance_groups(whole["scores"], G).float().mean() if len(whole["scores"]) else torch.tensor(0.)
    stats = {"objective/scores": float(torch.cat(sampled_scores).mean()),
             "groups/zero_variance_frac": n_zero / n_groups,
             "groups/trained": len(whole["scores"]) // G,
             "groups/trained_zero_variance_frac": float(trained_zero), "groups/rollouts": len(kept)}
    return whole, stats


def _advantages(config: GRPOConfig, batch: dict[str, torch.Tensor], eos_token_id: int) -> torch.Tensor:
    """Phase 4: the reward (after overlong shaping) turned into an advantage per response ``[B]``."""
    rewards = batch["rewards"]
    if config.overlong_buffer:
        mask = batch["response_mask"]
        truncated = ~((batch["response_ids"] == eos_token_id) & mask).any(-1)
        rewards = rewards + overlong_penalty(mask.sum(-1), truncated, config.max_new_tokens, config.overlong_buffer,
                                             config.overlong_penalty)
    scale = config.scale_rewards and config.loss_type != "dr_grpo"
    return ADVANTAGES[config.advantage](rewards, config.group_size, scale)


def _minibatch_loss(run: _Run, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The aggregated clipped loss (+ ``beta`` x per-token KL when ``kl_in="loss"``) of one minibatch."""
    config = run.config
    m = mb["response_mask"]
    logprobs, _, _ = policy_forward(run.lm, None, mb["prompt_ids"], mb["prompt_mask"], mb["response_ids"], m,
                                    config.sampling)
    old = logprobs.detach() if _single_on_policy_step(config) else mb["old_logprobs"]
    token_loss, stats = clipped_token_loss(logprobs, old, mb["advantages"], m, config.cliprange, config.clip_high)
    if config.beta > 0 and config.kl_in == "loss":
        kl = KL_LOSSES[config.kl_loss](logprobs, mb["ref_logprobs"]) * m
        token_loss = token_loss + config.beta * kl
        stats["kl_loss"] = AGGREGATIONS[config.loss_type](kl.detach(), m, config.max_new_tokens)
    loss = AGGREGATIONS[config.loss_type](token_loss, m, config.max_new_tokens)
    stats["pg_loss"] = loss.detach()
    return loss, stats


def _update(run: _Run, batch: dict[str, torch.Tensor], iteration: int) -> dict[str, float]:
    """Phase 5: ``ppo_epochs`` passes of minibatches over the batch; the mean of each statistic."""
    config = run.config
    run.lm.train()
    n = len(batch["advantages"])
    generator = torch.Generator().manual_seed(config.seed * 7_919 + iteration)
    for group in run.optimizer.param_groups:
        group["lr"] = config.learning_rate * min(1.0, (iteration + 1) / (config.warmup_iterations + 1))
    size = max(1, n // config.num_minibatches)
    stats: dict[str, list[float]] = {}
    for _ in range(config.ppo_epochs):
        for index in torch.randperm(n, generator=generator).split(size):
            mb = {k: v[index] for k, v in batch.items()}
            loss, mb_stats = _minibatch_loss(run, mb)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(run.lm.parameters(), config.max_grad_norm, foreach=True)
            run.optimizer.step()
            for key, value in mb_stats.items():
                stats.setdefault(key, []).append(float(value))
    return {key: float(np.mean(values)) for key, values in stats.items()}


def _metrics_row(iteration: int, run: _Run, batch: dict[str, torch.Tensor], groups: dict[str, float],
                 stats: dict[str, float]) -> dict[str, Any]:
    """One ``metrics.jsonl`` row."""
    row = {"step": iteration + 1, "episodes": (iteration + 1) * run.config.batch_size, "completions": run.completions,
           "objective/trained_scores": float(batch["scores"].mean()) if len(batch["scores"]) else float("nan"),
           "objective/kl": float(batch["kl"].mean()) if len(batch["kl"]) else 0.0, **groups,
           "policy/clipfrac_avg": stats.get("clipfrac", 0.0), "policy/ratio_avg": stats.get("ratio", 1.0),
           "loss/policy_avg": stats.get("pg_loss", 0.0),
           "tokens/response_length_mean": float(batch["response_mask"].sum(-1).float().mean())
           if len(batch["scores"]) else 0.0}
    if "kl_loss" in stats:
        row["loss/kl_avg"] = stats["kl_loss"]
    return row


def _save(run: _Run, done: int) -> None:
    """A resumable checkpoint every ``save_every`` iterations and at the end (the newest kept)."""
    from agents.checkpoint import prune_checkpoints, save_checkpoint

    config, out = run.config, Path(run.config.output_dir)
    if (config.save_every and done % config.save_every == 0) or done == config.num_iterations:
        save_checkpoint(out / "checkpoints" / f"checkpoint-{done:08d}", model=run.lm, optimizer=run.optimizer,
                        state={"iteration": done, "completions": run.completions})
        prune_checkpoints(out / "checkpoints", keep=1)


def train_grpo(config: GRPOConfig) -> GRPOResult:
    """Critic-free RL against a text bandit with group sampling; writes the policy (HF dir) and metrics.jsonl.

    Each iteration runs the phases of the module docstring: :func:`_collect` (rollouts, scoring, dynamic
    sampling), :func:`_advantages`, :func:`_update`, then :func:`_metrics_row` and :func:`_save`.
    """
    from agents.checkpoint import save_model_dir

    run = _setup(config)
    history: list[dict] = []
    started = time.perf_counter()
    bar = tqdm(range(run.start_iter, config.num_iterations), initial=run.start_iter, total=config.num_iterations,
               disable=not config.progress, desc=f"GRPO ({config.loss_type})", unit="iter")
    for iteration in bar:
        batch, groups = _collect(run, iteration)
        stats: dict[str, float] = {}
        if len(batch["scores"]):
            batch["advantages"] = _advantages(config, batch, run.task.eos_token_id)
            stats = _update(run, batch, iteration)
        row = _metrics_row(iteration, run, batch, groups, stats)
        history.append(row)
        run.metrics.write(row)
        bar.set_postfix(score=f"{row['objective/scores']:.3f}", zero_var=f"{groups['groups/zero_variance_frac']:.2f}")
        _save(run, iteration + 1)
    seconds = time.perf_counter() - started
    run.metrics.close()
    out = Path(config.output_dir)
    save_model_dir(out / "policy", model=run.lm, tokenizer=run.tokenizer)
    (out / "timing.json").write_text(json.dumps({
        "iterations": config.num_iterations - run.start_iter, "train_seconds": seconds, "completions": run.completions,
        "completions_per_second": run.completions / seconds if seconds > 0 else 0.0}) + "\n")
    run.envs.close()
    return GRPOResult(str(out), config.num_iterations, history, seconds, run.completions)
