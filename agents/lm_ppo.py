"""RLHF PPO for language models against ``TextBandit-v0`` (InstructGPT's recipe).

One iteration reads top to bottom in :func:`train_lm_ppo`:

1. **Rollout.** The vector env hands out ``batch_size`` prompts; the policy samples a response to
   each with the shared KV-cached sampler.
2. **Old log-probs and values** in one teacher-forced pass of the policy (and its value head).
   These log-probs are handed to the env *before* ``step`` (the env's only KL mechanism), so the
   KL the env computes and the PPO ratio use the very same numbers.
3. **Scoring** is the env's ``step``: one batched reference pass and one batched reward call. It
   returns the score and the per-token KL; the per-token reward is ``-beta * kl_t`` with the score
   added on the last token. With ``kl_setpoint`` set, the env's adaptive controller moves beta.
4. **GAE** per token, advantages whitened over the batch.
5. **Update**: ``ppo_epochs`` passes over minibatches: clipped surrogate, clipped value loss,
   optionally the pretraining loss mixed in (PPO-ptx, coefficient ``ptx_coef``).

Logged names follow TRL's PPO trainer (``objective/kl``, ``objective/scores``, ``policy/approxkl_avg``...).

Data parallel (launched by ``torchrun``, ``WORLD_SIZE`` > 1): each process rolls out and scores
``batch_size / world`` responses (its own prompts and sampler seed), then the processes exchange
their rollouts (token ids, log-probs, values, scores, KL: small next to the model) so that every
one holds the whole batch. From there each computes the same GAE, whitening over the whole batch
and adaptive-KL step, cuts the same minibatches, and back-propagates its share of each minibatch
under ``DistributedDataParallel``, its loss scaled by its share of the minibatch's tokens: the
averaged gradient is that of one process on the whole minibatch, and the approx-KL early stop is
decided on the whole minibatch's figure. Rank 0 alone logs and writes.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import rlhf_envs  # noqa: F401  (registers the envs)
from agents.distributed import (
    LossModule,
    check_divides_among_processes,
    distributed,
    gather_tensors,
    join_process_group,
)
from agents.lm_policy import PolicyWithValueHead
from agents.lm_ppo_losses import gae, masked_mean, masked_whiten, token_rewards
from agents.lm_ppo_update import minibatch_loss, ppo_update, ptx_batches
from agents.lora import LORA_HELP, check_lora_fields, is_lora, with_lora
from agents.trackers import REPORT_TO_HELP, parse_report_to
from rlhf_envs.compat import renamed_fields
from rlhf_envs.kl import check_env_estimator, truncates
from rlhf_envs.lm.sampling import SamplingConfig, generate
from rlhf_envs.text_common import AdaptersOff
from rlhf_envs.validation import check_config_fields


@renamed_fields(target_kl="kl_setpoint")
@dataclass
class LMPPOConfig:
    """Hyper-parameters of RLHF PPO (InstructGPT / Ziegler et al. names where they exist)."""

    model_path: str | None = field(
        default=None,
        metadata={
            "help": "policy initialisation, a local causal-LM directory (the SFT model); None = embedded default"
        },
    )
    ref_model_path: str | None = field(
        default=None, metadata={"help": "frozen reference model for the KL term; None = the same as model_path"}
    )
    reward_model: Any = field(
        default="sentiment", metadata={"help": "reward plugin name (sentiment, learned, or a registered plugin)"}
    )
    reward_model_path: str | None = field(
        default=None, metadata={"help": "checkpoint directory for the 'learned' reward plugin"}
    )
    prompts: list | None = field(
        default=None, metadata={"help": "training prompts; None = the env's default (corpus prompts)"}
    )
    output_dir: str = field(
        default="runs/ppo", metadata={"help": "policy, value head, metrics.jsonl and checkpoints go here"}
    )
    seed: int = field(default=0, metadata={"help": "seed of torch, numpy, the env and the sampler"})
    total_episodes: int = field(default=2048, metadata={"help": "responses sampled over the whole run"})
    batch_size: int = field(default=64, metadata={"help": "responses per rollout (the vector env's num_envs)"})
    num_minibatches: int = field(default=4, metadata={"help": "minibatches per PPO epoch"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout"})
    learning_rate: float = field(default=3e-5, metadata={"help": "Adam learning rate of policy and value head"})
    anneal_lr: bool = field(
        default=False, metadata={"help": "anneal the learning rate linearly to 0 over the run (CleanRL's anneal_lr)"}
    )
    max_new_tokens: int = field(default=24, metadata={"help": "longest response, EOS included"})
    temperature: float = field(
        default=1.0, metadata={"help": "sampling temperature (the KL and ratio use the same distribution)"}
    )
    top_k: int = field(default=0, metadata={"help": "top-k sampling; 0 = off"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass; 1.0 = off"})
    beta: float = field(default=0.05, metadata={"help": "KL coefficient (initial value when kl_setpoint is set)"})
    kl_setpoint: float | None = field(
        default=None, metadata={"help": "sequence-level KL target of the adaptive controller; None = fixed beta"}
    )
    kl_horizon: float = field(
        default=10000.0,
        metadata={"help": "horizon (episodes) of the adaptive controller: how fast beta moves (Ziegler et al.: 10000)"},
    )
    kl_estimator: str = field(default="k1", metadata={"help": "per-token KL estimator of the env: k1, k3 or exact"})
    gamma: float = field(default=1.0, metadata={"help": "discount over tokens"})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE lambda over tokens"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value prediction clip"})
    vf_coef: float = field(default=0.1, metadata={"help": "value loss coefficient"})
    whiten_advantages: bool = field(default=True, metadata={"help": "whiten advantages over the rollout"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "global gradient-norm clip"})
    max_approx_kl: float | None = field(
        default=0.03,
        metadata={
            "help": "stop an update's epochs once a minibatch's "
            "approx-KL (old -> new policy) exceeds this; "
            "None = never"
        },
    )
    ptx_coef: float = field(
        default=0.0,
        metadata={"help": "PPO-ptx: weight of the pretraining LM loss mixed into each update (gamma in InstructGPT)"},
    )
    ptx_texts: list | None = field(
        default=None, metadata={"help": "pretraining texts for PPO-ptx; None = corpus reviews"}
    )
    save_every: int = field(
        default=0, metadata={"help": "write a resumable checkpoint every this many iterations (0 = only at the end)"}
    )
    snapshot_every: int = field(
        default=0,
        metadata={
            "help": "also keep the policy every this many iterations as snapshots/iter-N (for reward-vs-KL curves)"
        },
    )
    resume: bool = field(
        default=False, metadata={"help": "continue from the newest output_dir/checkpoints/checkpoint-<iteration>"}
    )
    torch_threads: int | None = field(default=None, metadata={"help": "torch intra-op threads; None = torch's default"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    report_to: list[str] = field(default_factory=lambda: ["none"], metadata={"help": REPORT_TO_HELP, "nargs": "+"})
    lora_r: int = field(default=0, metadata={"help": LORA_HELP["lora_r"]})
    lora_alpha: float = field(default=16.0, metadata={"help": LORA_HELP["lora_alpha"]})
    lora_dropout: float = field(default=0.0, metadata={"help": LORA_HELP["lora_dropout"]})
    lora_target_modules: str | None = field(default=None, metadata={"help": LORA_HELP["lora_target_modules"]})

    def __post_init__(self):
        check_config_fields(self)
        check_env_estimator(self.kl_estimator)
        for name in ("prompts", "ptx_texts"):
            if isinstance(getattr(self, name), str):
                raise TypeError(
                    f"LMPPOConfig.{name} must be a list of strings or None, got a single str "
                    f"{getattr(self, name)[:40]!r}; wrap it in a list"
                )
        self.report_to = parse_report_to(self.report_to, "LMPPOConfig")
        check_lora_fields(self, "LMPPOConfig")
        if self.lora_r and self.ref_model_path is not None:
            raise ValueError(
                "LMPPOConfig.lora_r > 0 uses the policy with its adapters off as the reference; "
                "leave ref_model_path unset (None)"
            )
        for name in ("total_episodes", "batch_size", "num_minibatches", "ppo_epochs", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LMPPOConfig.{name} must be a positive integer, got {value!r}")
        if self.batch_size % self.num_minibatches:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by num_minibatches {self.num_minibatches}")
        if self.beta < 0:
            raise ValueError(f"LMPPOConfig.beta must be >= 0, got {self.beta!r}; 0 turns the KL penalty off")
        if self.kl_setpoint is not None and not self.kl_setpoint > 0:
            raise ValueError(f"LMPPOConfig.kl_setpoint must be > 0 or None, got {self.kl_setpoint!r}")
        for name in ("learning_rate", "cliprange", "cliprange_value", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LMPPOConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"LMPPOConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.ptx_coef < 0:
            raise ValueError(f"LMPPOConfig.ptx_coef must be >= 0, got {self.ptx_coef!r}")
        if self.max_approx_kl is not None and not self.max_approx_kl > 0:
            raise ValueError(f"LMPPOConfig.max_approx_kl must be > 0 or None, got {self.max_approx_kl!r}")
        if self.reward_model == "learned" and not self.reward_model_path:
            raise ValueError("reward_model='learned' needs reward_model_path= (a directory written by `rlhf rm`)")
        SamplingConfig(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p
        )

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p
        )

    @property
    def num_iterations(self) -> int:
        return max(1, self.total_episodes // self.batch_size)


@dataclass
class LMPPOResult:
    output_dir: str
    iterations: int
    history: list[dict]
    seconds: float


def _make_env(config: LMPPOConfig, num_envs: int, reference: Any = None):
    """The vector env; ``reference`` (an :class:`rlhf_envs.text_common.AdaptersOff`) in place of loading one."""
    reward_kwargs = {"path": config.reward_model_path} if config.reward_model_path else None
    return gym.make_vec(
        "TextBandit-v0",
        num_envs=num_envs,
        model=reference or config.ref_model_path or config.model_path,
        reward_model=config.reward_model,
        reward_kwargs=reward_kwargs,
        prompts=config.prompts,
        beta=config.beta,
        kl_setpoint=config.kl_setpoint,
        kl_horizon=config.kl_horizon,
        kl_estimator=config.kl_estimator,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
    )


_RANK_SEED_STRIDE = 1_000_000_007
"""Process ``r`` of a data-parallel run seeds its prompts and sampler ``r`` strides away from rank 0's."""


@dataclass
class _Run:
    """What one RLHF PPO run holds between phases: the policy, the env, the optimizer and the writers."""

    config: LMPPOConfig
    model: PolicyWithValueHead
    tokenizer: Any
    envs: Any
    optimizer: torch.optim.Optimizer
    step_loss: Any
    ptx: Any
    rank: int
    world: int
    start_iter: int
    metrics: Any = None
    timings: Any = None

    @property
    def task(self):
        return self.envs.unwrapped.task

    @property
    def local(self) -> int:
        """Responses this process samples per iteration."""
        return self.config.batch_size // self.world


def _setup(config: LMPPOConfig) -> _Run:
    """Process group, seeds, policy with value head (dropout off), env, optimizer; resumes from the newest
    ``checkpoints/checkpoint-<iteration>``."""
    from agents.checkpoint import latest_checkpoint, load_checkpoint
    from agents.lm_common import CPU_FUSED_ADAM, MetricsWriter, fuse_gelu, set_seed
    from rlhf_envs.lm.loading import load_causal_lm

    check_divides_among_processes(config.batch_size, "batch_size")
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        join_process_group(torch.device("cpu"))
    rank, world = distributed()
    set_seed(config.seed)
    out = Path(config.output_dir)
    lm, tokenizer = load_causal_lm(config.model_path)
    fuse_gelu(lm)  # torch's fused tanh-GELU in place of GPT-2's Python one: same maths, the saved model is unchanged
    lm = with_lora(lm, config)
    model = PolicyWithValueHead(lm)
    model.train()
    for module in model.modules():  # RLHF PPO runs without dropout: the ratio must be 1 before the first step
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    envs = _make_env(config, config.batch_size // world, AdaptersOff(lm, tokenizer) if is_lora(lm) else None)
    task = envs.unwrapped.task
    if task.vocab_size != lm.get_output_embeddings().weight.shape[0]:
        raise ValueError(
            f"policy vocabulary {lm.get_output_embeddings().weight.shape[0]} != reference vocabulary "
            f"{task.vocab_size}: the policy and ref_model must share a tokenizer"
        )
    # the fused kernel updates every tensor in one call, not a Python loop over them
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, eps=1e-5, fused=CPU_FUSED_ADAM)
    ptx = ptx_batches(config, tokenizer, torch.Generator().manual_seed(config.seed)) if config.ptx_coef > 0 else None
    loss_fn = functools.partial(
        minibatch_loss, config=config, cfg=config.sampling, truncated=truncates(config.sampling, task.vocab_size)
    )
    step_loss = DistributedDataParallel(LossModule(model, loss_fn)) if world > 1 else functools.partial(loss_fn, model)
    run = _Run(config, model, tokenizer, envs, optimizer, step_loss, ptx, rank, world, start_iter=0)
    latest = latest_checkpoint(out / "checkpoints") if config.resume else None
    if latest is not None:
        state = load_checkpoint(latest, model=model, optimizer=optimizer)
        run.start_iter = state["iteration"]
        task.kl_controller.kl_coef = state["kl_coef"]
    if rank == 0:
        resume_step = run.start_iter if config.resume else None
        run.metrics = MetricsWriter(
            out / "metrics.jsonl", resume_step=resume_step, report_to=config.report_to, run_config=asdict(config)
        )
        run.timings = MetricsWriter(out / "timing.jsonl", resume_step=resume_step)
        (out / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str) + "\n")
    return run


def _rollout(run: _Run, iteration: int, generator: torch.Generator) -> dict[str, Any]:
    """Phase 1-2: this process's prompts, sampled responses, and their old log-probs and values in one pass."""
    from rlhf_envs.text_common import attention_mask_from_obs

    config, task, model = run.config, run.task, run.model
    # Every iteration draws its prompts and samples from seeds derived from (seed, iteration),
    # so a resumed run makes exactly the same rollouts as an uninterrupted one.
    obs, _ = run.envs.reset(seed=config.seed * 100_003 + iteration + run.rank * _RANK_SEED_STRIDE)
    generator.manual_seed(config.seed * 1_000_003 + iteration + run.rank * _RANK_SEED_STRIDE)
    prompt_ids = torch.as_tensor(obs)
    prompt_mask = attention_mask_from_obs(prompt_ids, task.pad_token_id)
    model.eval()
    with torch.no_grad():
        gen = generate(
            model.lm,
            prompt_ids,
            prompt_mask,
            config.sampling,
            eos_token_id=task.eos_token_id,
            pad_token_id=task.pad_token_id,
            generator=generator,
        )
        # exact, and k3 under top-k/top-p, need the policy's full next-token distributions, handed over too
        old_logprobs, old_values, _, *old_full = model(
            prompt_ids,
            prompt_mask,
            gen.response_ids,
            gen.response_mask,
            config.sampling,
            return_full=task.needs_full_logprobs,
        )
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "response_ids": gen.response_ids,
        "response_mask": gen.response_mask,
        "old_logprobs": old_logprobs,
        "old_values": old_values,
        "old_full": old_full[0] if old_full else None,
    }


def _padded(tensor: torch.Tensor, shape: tuple[int, ...], fill: float | int = 0, dtype: torch.dtype | None = None):
    """``tensor [B, T, ...]`` written into a new ``shape`` tensor filled with ``fill`` (responses padded to full
    width)."""
    out = torch.full(shape, fill, dtype=dtype or tensor.dtype)
    out[:, : tensor.shape[1]] = tensor
    return out


def _score(run: _Run, rollout: dict[str, Any]) -> dict[str, Any]:
    """Phase 3: the env's ``step`` scores the responses (reference pass, reward, KL) from the handed-over log-probs.

    Data parallel, the processes then exchange their rollouts so that every one holds the whole batch, and
    the adaptive controller steps on the whole batch's KL. Returns ``rollout`` (whole batch) with ``info``.
    """
    task, local, width = run.task, run.local, run.config.max_new_tokens
    response_ids = rollout["response_ids"]
    action = _padded(response_ids, (local, width), task.pad_token_id, torch.long)
    handed = _padded(rollout["old_logprobs"], (local, width), dtype=torch.float32)
    full = rollout.pop("old_full")
    handed_full = None if full is None else _padded(full, (local, width, full.shape[-1]), dtype=torch.float32).numpy()
    kl_coef = task.kl_controller.kl_coef
    run.envs.set_policy_logprobs(handed.numpy(), handed_full)
    _, _, _, _, info = run.envs.step(action.numpy())
    if run.world == 1:
        return {**rollout, "info": info}
    # every process gets the whole batch: responses padded to max_new_tokens, then cut to the longest
    keys = ("score", "kl", "kl_per_token", "beta")
    whole = gather_tensors(
        {
            "prompt_ids": rollout["prompt_ids"],
            "prompt_mask": rollout["prompt_mask"],
            "response_ids": action,
            "response_mask": _padded(rollout["response_mask"], (local, width), False, torch.bool),
            "old_logprobs": handed,
            "old_values": _padded(rollout["old_values"], (local, width), dtype=torch.float32),
            **{k: torch.as_tensor(info[k]) for k in keys},
        },
        run.world,
    )
    longest = int(whole["response_mask"].any(0).nonzero().max()) + 1
    info = {k: whole.pop(k).numpy() for k in keys}
    task.kl_controller.kl_coef = kl_coef
    task.kl_controller.update(float(np.mean(info["kl"])), len(info["kl"]))
    for key in ("response_ids", "response_mask", "old_logprobs", "old_values"):
        whole[key] = whole[key][:, :longest]
    return {**whole, "info": info}


def _advantages(config: LMPPOConfig, rollout: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 4: InstructGPT's per-token rewards, then GAE; ``(advantages [B, T], returns [B, T])``."""
    info, response_mask = rollout["info"], rollout["response_mask"]
    score = torch.as_tensor(info["score"], dtype=torch.float32)
    kl_per_token = torch.as_tensor(info["kl_per_token"][:, : response_mask.shape[1]])
    rewards = token_rewards(score, kl_per_token, torch.as_tensor(info["beta"]), response_mask)
    advantages, returns = gae(rewards, rollout["old_values"], response_mask, config.gamma, config.gae_lambda)
    if config.whiten_advantages:
        advantages = masked_whiten(advantages, response_mask)
    return advantages, returns


def _metrics_row(
    iteration: int,
    config: LMPPOConfig,
    rollout: dict[str, Any],
    returns: torch.Tensor,
    stats: dict[str, list[float]],
    kl_stop: bool,
) -> dict[str, Any]:
    """Phase 6: one ``metrics.jsonl`` row under TRL's PPO names."""
    info, response_mask = rollout["info"], rollout["response_mask"]
    row = {
        "step": iteration + 1,
        "episodes": (iteration + 1) * config.batch_size,
        "objective/scores": float(np.mean(info["score"])),
        "objective/kl": float(np.mean(info["kl"])),
        "objective/kl_coef": float(info["beta"][0]),
        "objective/rlhf_reward": float(np.mean(info["score"] - info["beta"] * info["kl"])),
        "policy/approxkl_avg": float(np.mean(stats["approxkl"])),
        "policy/early_stopped": kl_stop,
        "policy/updates": len(stats["pg_loss"]),
        "policy/clipfrac_avg": float(np.mean(stats["clipfrac"])),
        "policy/entropy_avg": float(np.mean(stats["entropy"])),
        "loss/policy_avg": float(np.mean(stats["pg_loss"])),
        "loss/value_avg": float(np.mean(stats["vf_loss"])),
        "val/clipfrac_avg": float(np.mean(stats["vf_clipfrac"])),
        "val/returns_mean": float(masked_mean(returns, response_mask)),
        "tokens/response_length_mean": float(response_mask.sum(-1).float().mean()),
    }
    if stats["ptx_loss"]:
        row["loss/ptx_avg"] = float(np.mean(stats["ptx_loss"]))
    return row


def _save(run: _Run, done: int) -> None:
    """Phase 7: snapshots every ``snapshot_every`` iterations, the resumable checkpoint every ``save_every`` and at
    the end."""
    from agents.checkpoint import prune_checkpoints, save_checkpoint

    config, out = run.config, Path(run.config.output_dir)
    if run.rank == 0 and config.snapshot_every and done % config.snapshot_every == 0:
        _save_policy(out / "snapshots" / f"iter-{done:05d}", run.model, run.tokenizer)
    if (config.save_every and done % config.save_every == 0) or done == config.num_iterations:
        if run.rank == 0:
            # the trainers' one naming scheme, checkpoints/checkpoint-<step>; the newest alone is kept
            save_checkpoint(
                out / "checkpoints" / f"checkpoint-{done:08d}",
                model=run.model,
                optimizer=run.optimizer,
                state={"iteration": done, "kl_coef": run.task.kl_controller.kl_coef},
            )
            prune_checkpoints(out / "checkpoints", keep=1)
        if run.world > 1:
            dist.barrier()


def _finish(run: _Run, seconds: float) -> None:
    """Rank 0 closes the writers, writes ``timing.json`` and the final policy."""
    config, out = run.config, Path(run.config.output_dir)
    if run.rank == 0:
        run.metrics.close()
        run.timings.close()
        iterations = config.num_iterations - run.start_iter
        # as the other trainers' timing.json: this run's iterations (rollout, scoring, update), beside timing.jsonl's
        (out / "timing.json").write_text(
            json.dumps(
                {
                    "iterations": iterations,
                    "train_seconds": seconds,
                    "samples_per_second": iterations * config.batch_size / seconds if seconds > 0 else 0.0,
                    "processes": run.world,
                }
            )
            + "\n"
        )
        _save_policy(out / "policy", run.model, run.tokenizer)
    if run.world > 1:
        dist.barrier()
    run.envs.close()


def train_lm_ppo(config: LMPPOConfig) -> LMPPOResult:
    """RLHF PPO against ``TextBandit-v0``; writes the policy (HF dir), value head, metrics.jsonl.

    Each iteration runs the phases of the module docstring: :func:`_rollout`, :func:`_score`,
    :func:`_advantages`, :func:`~agents.lm_ppo_update.ppo_update`, then :func:`_metrics_row` and :func:`_save`.
    Runs data parallel under ``torchrun`` (see the module's docstring); ``batch_size`` is then the
    whole batch over all processes and must divide among them.
    """
    run = _setup(config)
    generator = torch.Generator()
    history: list[dict] = []
    started = time.perf_counter()
    bar = tqdm(
        range(run.start_iter, config.num_iterations),
        initial=run.start_iter,
        total=config.num_iterations,
        disable=not (config.progress and run.rank == 0),
        desc="RLHF PPO",
        unit="iter",
    )
    for iteration in bar:
        t0 = time.perf_counter()
        if config.anneal_lr:  # a resumed run continues the same schedule
            run.optimizer.param_groups[0]["lr"] = (1.0 - iteration / config.num_iterations) * config.learning_rate
        rollout = _rollout(run, iteration, generator)
        t_rollout = time.perf_counter()
        rollout = _score(run, rollout)
        t_score = time.perf_counter()
        advantages, returns = _advantages(config, rollout)
        run.model.train()
        batch = {
            k: rollout[k]
            for k in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "old_logprobs", "old_values")
        }
        batch.update(advantages=advantages, returns=returns)
        # one process keeps drawing minibatches from its sampler's generator; several share one seeded alike
        minibatches = (
            generator
            if run.world == 1
            else torch.Generator().manual_seed(config.seed * 1_000_003 + iteration + run.world * _RANK_SEED_STRIDE)
        )
        stats, kl_stop = ppo_update(
            run.step_loss, run.model, run.optimizer, batch, config, minibatches, run.ptx, run.rank, run.world
        )
        t_update = time.perf_counter()
        row = _metrics_row(iteration, config, rollout, returns, stats, kl_stop)
        timing = {
            "step": iteration + 1,
            "time/rollout_s": t_rollout - t0,
            "time/scoring_s": t_score - t_rollout,
            "time/update_s": t_update - t_score,
        }
        history.append({**row, **timing})
        if run.rank == 0:
            run.metrics.write(row)  # wall-clock figures go to timing.jsonl: metrics.jsonl is identical across runs
            run.timings.write(timing)
        bar.set_postfix(
            score=f"{row['objective/scores']:.3f}",
            kl=f"{row['objective/kl']:.2f}",
            beta=f"{row['objective/kl_coef']:.3f}",
        )
        _save(run, iteration + 1)
    seconds = time.perf_counter() - started
    _finish(run, seconds)
    return LMPPOResult(str(config.output_dir), config.num_iterations, history, seconds)


def _save_policy(directory: Path, model: PolicyWithValueHead, tokenizer) -> None:
    """The policy as a loadable HF directory plus ``value_head.safetensors``, moved into place atomically."""
    from agents.checkpoint import save_model_dir

    save_model_dir(
        directory,
        model=model.lm,
        tokenizer=tokenizer,
        keep_training=True,
        tensors={"value_head.safetensors": model.v_head.state_dict()},
    )
