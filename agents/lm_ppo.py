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
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn import functional as F
from tqdm.auto import tqdm

import rlhf_envs  # noqa: F401  (registers the envs)
from agents.lm_common import LossModule, distributed, join_process_group, shard
from agents.lm_ppo_losses import gae, masked_mean, masked_whiten, policy_loss, token_rewards, value_loss
from rlhf_envs.lm.packing import pack_sequences
from rlhf_envs.lm.views import PackedForward, packed_view
from rlhf_envs.lm.sampling import SamplingConfig, generate, positions_from_mask, processed_logprobs


@dataclass
class LMPPOConfig:
    """Hyper-parameters of RLHF PPO (InstructGPT / Ziegler et al. names where they exist)."""

    model_path: str | None = field(default=None, metadata={"help": "policy initialisation, a local causal-LM directory (the SFT model); None = embedded default"})
    ref_model_path: str | None = field(default=None, metadata={"help": "frozen reference model for the KL term; None = the same as model_path"})
    reward_model: Any = field(default="sentiment", metadata={"help": "reward plugin name (sentiment, learned, or a registered plugin)"})
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
    kl_horizon: float = field(default=10000.0, metadata={"help": "horizon (episodes) of the adaptive controller: how fast beta moves (Ziegler et al.: 10000)"})
    kl_estimator: str = field(default="k1", metadata={"help": "per-token KL estimator of the env: k1, k2, k3 or exact"})
    gamma: float = field(default=1.0, metadata={"help": "discount over tokens"})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE lambda over tokens"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value prediction clip"})
    vf_coef: float = field(default=0.1, metadata={"help": "value loss coefficient"})
    whiten_advantages: bool = field(default=True, metadata={"help": "whiten advantages over the rollout"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "global gradient-norm clip"})
    max_approx_kl: float | None = field(default=0.03, metadata={"help": "stop an update's epochs once a minibatch's approx-KL (old -> new policy) exceeds this; None = never"})
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
        if self.max_approx_kl is not None and not self.max_approx_kl > 0:
            raise ValueError(f"LMPPOConfig.max_approx_kl must be > 0 or None, got {self.max_approx_kl!r}")
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


def _logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, cfg: SamplingConfig
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(chosen [...], entropy [...], full [..., V])`` of the processed (sampled-from) distribution."""
    full = processed_logprobs(logits, cfg)
    probs = full.exp()
    return full.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(probs * full.masked_fill(probs == 0, 0.0)).sum(-1), full


def _packed_policy_forward(view: PackedForward, v_head: ValueHead, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           response_ids: torch.Tensor, response_mask: torch.Tensor, cfg: SamplingConfig, return_full: bool = False):
    """:func:`policy_forward` through a packed forward (:mod:`rlhf_envs.lm.views`): no padding, the LM head at
    response tokens only."""
    prompt_keep, keep = prompt_mask.bool(), response_mask.bool()
    seqs = [torch.cat([p[pk], r[k]]) for p, pk, r, k in zip(prompt_ids.cpu(), prompt_keep.cpu(), response_ids.cpu(), keep.cpu())]
    batch = pack_sequences(seqs, drop_last=True)  # the last token predicts nothing
    predictor, targets, _ = batch.targets(prompt_keep.sum(-1).tolist())
    device = prompt_ids.device
    hidden = view.final_norm(batch.to(device).hidden(view, predictor.to(device)))
    logprobs, entropy, full = _logprobs_and_entropy(F.linear(hidden, view.lm_head), targets.to(device), cfg)
    out = []
    for flat in (logprobs, v_head(hidden), entropy):  # response tokens in row-major order = keep's True cells
        out.append(flat.new_zeros(keep.shape).masked_scatter(keep, flat))
    if return_full:
        out.append(full.new_zeros(keep.shape + full.shape[-1:]).index_put_((keep,), full))
    return tuple(out)


def policy_forward(policy: nn.Module, v_head: ValueHead, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   response_ids: torch.Tensor, response_mask: torch.Tensor, cfg: SamplingConfig, return_full: bool = False):
    """One teacher-forced pass: ``(logprobs [B, T], values [B, T], entropy [B, T])`` of the responses
    under the processed (sampled-from) distribution; the value at t is that of the state before token t.
    With ``return_full`` a fourth tensor, the full log-distributions ``[B, T, V]`` (0 past each
    response), e.g. for the env's ``exact`` KL estimator.

    GPT-2 and Llama-family models without active dropout take a packed forward (:mod:`rlhf_envs.lm.views`);
    other models Hugging Face's forward on the padded batch. Both give the same values to float rounding.
    """
    view = packed_view(policy)
    if view is not None and view.lm_head is not None:
        return _packed_policy_forward(view, v_head, prompt_ids, prompt_mask, response_ids, response_mask, cfg, return_full)
    prompt_len = prompt_ids.shape[1]
    mask = torch.cat([prompt_mask.bool(), response_mask.bool()], dim=1)
    out = policy(input_ids=torch.cat([prompt_ids, response_ids], dim=1), attention_mask=mask.long(),
                 position_ids=positions_from_mask(mask), output_hidden_states=True, use_cache=False)
    logprobs, entropy, full = _logprobs_and_entropy(out.logits[:, prompt_len - 1:-1], response_ids, cfg)
    values = v_head(out.hidden_states[-1][:, prompt_len - 1:-1])
    keep = response_mask.bool()
    result = (logprobs.masked_fill(~keep, 0.0), values.masked_fill(~keep, 0.0), entropy.masked_fill(~keep, 0.0))
    return result + (full.masked_fill(~keep[..., None], 0.0),) if return_full else result


class PolicyWithValueHead(nn.Module):
    """The policy LM and its value head, saved and restored together."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.v_head = ValueHead(lm.config.get_text_config().hidden_size)

    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask, cfg: SamplingConfig, return_full: bool = False):
        return policy_forward(self.lm, self.v_head, prompt_ids, prompt_mask, response_ids, response_mask, cfg, return_full)


@dataclass
class LMPPOResult:
    output_dir: str
    iterations: int
    history: list[dict]
    seconds: float


def _make_env(config: LMPPOConfig, num_envs: int):
    reward_kwargs = {"path": config.reward_model_path} if config.reward_model_path else None
    return gym.make_vec(
        "TextBandit-v0", num_envs=num_envs, model=config.ref_model_path or config.model_path,
        reward_model=config.reward_model, reward_kwargs=reward_kwargs, prompts=config.prompts,
        beta=config.beta, target_kl=config.target_kl, kl_horizon=config.kl_horizon, kl_estimator=config.kl_estimator,
        max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)


def _ptx_batches(config: LMPPOConfig, tokenizer, generator: torch.Generator):
    """Endless minibatches of pretraining text (input ids, attention mask) for PPO-ptx."""
    from rlhf_envs.corpus import make_reviews

    texts = config.ptx_texts or make_reviews(4096, seed=config.seed + 7)
    eos = tokenizer.eos_token
    enc = tokenizer([eos + t + eos for t in texts], return_tensors="pt", padding=True, truncation=True, max_length=64)
    size = config.batch_size // config.num_minibatches
    while True:
        for idx in torch.randperm(len(texts), generator=generator).split(size):
            yield enc["input_ids"][idx], enc["attention_mask"][idx]


def _ptx_loss(lm: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


_RANK_SEED_STRIDE = 1_000_000_007
"""Process ``r`` of a data-parallel run seeds its prompts and sampler ``r`` strides away from rank 0's."""

_STAT_KEYS = ("approxkl", "pg_loss", "vf_loss", "clipfrac", "vf_clipfrac", "entropy", "ptx_loss")


def _minibatch_loss(model: PolicyWithValueHead, batch: dict[str, Any], config: LMPPOConfig, cfg: SamplingConfig
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One minibatch (this process's share of it): the scaled PPO loss (+ PPO-ptx) and its stats, unscaled."""
    m = batch["response_mask"]
    logprobs, values, entropy = model(batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], m, cfg)
    pg, pg_stats = policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], m, config.cliprange)
    vf, vf_stats = value_loss(values, batch["old_values"], batch["returns"], m, config.cliprange_value)
    loss = batch["scale"] * (pg + config.vf_coef * vf)
    stats = {"approxkl": pg_stats["approx_kl"], "pg_loss": pg.detach(), "vf_loss": vf.detach(),
             "clipfrac": pg_stats["clipfrac"], "vf_clipfrac": vf_stats["clipfrac"],
             "entropy": masked_mean(entropy.detach(), m)}
    if "ptx_ids" in batch:
        ptx_loss = _ptx_loss(model.lm, batch["ptx_ids"], batch["ptx_mask"])
        loss = loss + config.ptx_coef * batch["ptx_scale"] * ptx_loss
        stats["ptx_loss"] = ptx_loss.detach()
    return loss, stats


def _gather_rollout(rollout: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    """Every process's rollout rows, in rank order (each tensor has one shape on every process)."""
    whole = {}
    for key, tensor in rollout.items():
        sent = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor.contiguous()  # gloo has no bool
        parts = [torch.empty_like(sent) for _ in range(world)]
        dist.all_gather(parts, sent)
        whole[key] = torch.cat(parts).to(tensor.dtype)
    return whole


def _ppo_update(step_loss: Any, model: nn.Module, optimizer: torch.optim.Optimizer, rollout: dict[str, torch.Tensor],
                config: LMPPOConfig, generator: torch.Generator, ptx: Any, rank: int = 0, world: int = 1
                ) -> tuple[dict[str, list[float]], bool]:
    """``ppo_epochs`` passes of minibatches over the whole batch ``rollout``; returns the stats and whether
    the approx-KL stop ended it early.

    Every process draws the same minibatches from ``generator`` and back-propagates its share of each
    (:func:`agents.lm_common.shard`, weighed by response tokens, as the losses are means over tokens);
    the stats are the whole minibatch's (scaled shares summed over the processes).
    """
    mb_size = config.batch_size // config.num_minibatches
    tokens = rollout["response_mask"].sum(-1).tolist()
    stats: dict[str, list[float]] = {k: [] for k in _STAT_KEYS}
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
            keys = [k for k in _STAT_KEYS if k in mb_stats]
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


def check_divides_among_processes(batch_size: int, name: str) -> None:
    """Raise unless ``batch_size`` responses divide among the ``WORLD_SIZE`` processes of a data-parallel run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if batch_size % world:
        raise ValueError(f"{name} {batch_size} does not divide among {world} processes (WORLD_SIZE): "
                         f"make it a multiple of {world}")


def train_lm_ppo(config: LMPPOConfig) -> LMPPOResult:
    """RLHF PPO against ``TextBandit-v0``; writes the policy (HF dir), value head, metrics.jsonl.

    Runs data parallel under ``torchrun`` (see the module's docstring); ``batch_size`` is then the
    whole batch over all processes and must divide among them.
    """
    from agents.checkpoint import load_checkpoint, save_checkpoint
    from agents.lm_common import CPU_FUSED_ADAM, MetricsWriter, fuse_gelu, set_seed
    from rlhf_envs.lm.loading import load_causal_lm
    from rlhf_envs.text_common import attention_mask_from_obs

    check_divides_among_processes(config.batch_size, "batch_size")
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        join_process_group(torch.device("cpu"))
    rank, world = distributed()
    main = rank == 0
    set_seed(config.seed)
    out = Path(config.output_dir)
    lm, tokenizer = load_causal_lm(config.model_path)
    fuse_gelu(lm)  # torch's fused tanh-GELU in place of GPT-2's Python one: same maths, the saved model is unchanged
    model = PolicyWithValueHead(lm)
    model.train()
    for module in model.modules():  # RLHF PPO runs without dropout: the ratio must be 1 before the first step
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    local = config.batch_size // world
    envs = _make_env(config, local)
    task = envs.unwrapped.task
    if task.vocab_size != lm.get_output_embeddings().weight.shape[0]:
        raise ValueError(f"policy vocabulary {lm.get_output_embeddings().weight.shape[0]} != reference vocabulary "
                         f"{task.vocab_size}: the policy and ref_model must share a tokenizer")
    # the fused kernel updates every tensor in one call, not a Python loop over them
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, eps=1e-5, fused=CPU_FUSED_ADAM)
    cfg = config.sampling
    generator = torch.Generator()
    ptx = _ptx_batches(config, tokenizer, torch.Generator().manual_seed(config.seed)) if config.ptx_coef > 0 else None
    loss_fn = functools.partial(_minibatch_loss, config=config, cfg=cfg)
    if world > 1:
        step_loss = DistributedDataParallel(LossModule(model, loss_fn))
    else:
        step_loss = functools.partial(loss_fn, model)

    start_iter = 0
    checkpoint_dir = out / "checkpoint"
    if config.resume and (checkpoint_dir / "checkpoint.json").is_file():
        state = load_checkpoint(checkpoint_dir, model=model, optimizer=optimizer)
        start_iter = state["iteration"]
        task.kl_controller.kl_coef = state["kl_coef"]
    metrics = timings = None
    if main:
        metrics = MetricsWriter(out / "metrics.jsonl", resume_step=start_iter if config.resume else None)
        timings = MetricsWriter(out / "timing.jsonl", resume_step=start_iter if config.resume else None)
        (out / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str) + "\n")

    history: list[dict] = []
    started = time.perf_counter()
    bar = tqdm(range(start_iter, config.num_iterations), initial=start_iter, total=config.num_iterations,
               disable=not (config.progress and main), desc="RLHF PPO", unit="iter")
    for iteration in bar:
        t0 = time.perf_counter()
        # Every iteration draws its prompts and samples from seeds derived from (seed, iteration),
        # so a resumed run makes exactly the same rollouts as an uninterrupted one.
        obs, _ = envs.reset(seed=config.seed * 100_003 + iteration + rank * _RANK_SEED_STRIDE)
        generator.manual_seed(config.seed * 1_000_003 + iteration + rank * _RANK_SEED_STRIDE)
        prompt_ids = torch.as_tensor(obs)
        prompt_mask = attention_mask_from_obs(prompt_ids, task.pad_token_id)
        model.eval()
        with torch.no_grad():
            gen = generate(model.lm, prompt_ids, prompt_mask, cfg, eos_token_id=task.eos_token_id,
                           pad_token_id=task.pad_token_id, generator=generator)
            response_ids, response_mask = gen.response_ids, gen.response_mask
            # the exact KL estimator needs the policy's full next-token distributions, handed over with the log-probs
            old_logprobs, old_values, _, *old_full = model(prompt_ids, prompt_mask, response_ids, response_mask, cfg,
                                                           return_full=config.kl_estimator == "exact")
        t_rollout = time.perf_counter()

        width = config.max_new_tokens
        action = torch.full((local, width), task.pad_token_id, dtype=torch.long)
        action[:, :response_ids.shape[1]] = response_ids
        handed = torch.zeros(local, width)
        handed[:, :response_ids.shape[1]] = old_logprobs
        handed_full = None
        if old_full:
            handed_full = torch.zeros(local, width, old_full[0].shape[-1])
            handed_full[:, :response_ids.shape[1]] = old_full[0]
            handed_full = handed_full.numpy()
        kl_coef = task.kl_controller.kl_coef
        envs.set_policy_logprobs(handed.numpy(), handed_full)
        _, _, _, _, info = envs.step(action.numpy())
        if world > 1:
            # every process gets the whole batch: responses padded to max_new_tokens, then cut to the longest
            values = torch.zeros(local, width)
            values[:, :response_ids.shape[1]] = old_values
            mask = torch.zeros(local, width, dtype=torch.bool)
            mask[:, :response_ids.shape[1]] = response_mask
            whole = _gather_rollout({
                "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": action, "response_mask": mask,
                "old_logprobs": handed, "old_values": values, **{k: torch.as_tensor(info[k]) for k in ("score", "kl", "kl_per_token", "beta")},
            }, world)
            longest = int(whole["response_mask"].any(0).nonzero().max()) + 1
            prompt_ids, prompt_mask = whole["prompt_ids"], whole["prompt_mask"]
            response_ids, response_mask = whole["response_ids"][:, :longest], whole["response_mask"][:, :longest]
            old_logprobs, old_values = whole["old_logprobs"][:, :longest], whole["old_values"][:, :longest]
            info = {k: whole[k].numpy() for k in ("score", "kl", "kl_per_token", "beta")}
            # the adaptive controller steps on the whole batch's KL, alike on every process
            task.kl_controller.kl_coef = kl_coef
            task.kl_controller.update(float(np.mean(info["kl"])), len(info["kl"]))
        t_score = time.perf_counter()

        T = response_ids.shape[1]
        score = torch.as_tensor(info["score"], dtype=torch.float32)
        kl_per_token = torch.as_tensor(info["kl_per_token"][:, :T])
        rewards = token_rewards(score, kl_per_token, torch.as_tensor(info["beta"]), response_mask)
        advantages, returns = gae(rewards, old_values, response_mask, config.gamma, config.gae_lambda)
        if config.whiten_advantages:
            advantages = masked_whiten(advantages, response_mask)

        model.train()
        rollout = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids,
                   "response_mask": response_mask, "old_logprobs": old_logprobs, "old_values": old_values,
                   "advantages": advantages, "returns": returns}
        # one process keeps drawing minibatches from its sampler's generator; several share one seeded alike
        minibatches = generator if world == 1 else \
            torch.Generator().manual_seed(config.seed * 1_000_003 + iteration + world * _RANK_SEED_STRIDE)
        stats, kl_stop = _ppo_update(step_loss, model, optimizer, rollout, config, minibatches, ptx, rank, world)
        t_update = time.perf_counter()

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
        timing = {"step": iteration + 1, "time/rollout_s": t_rollout - t0, "time/scoring_s": t_score - t_rollout,
                  "time/update_s": t_update - t_score}
        history.append({**row, **timing})
        if main:
            metrics.write(row)  # wall-clock figures go to timing.jsonl: metrics.jsonl is identical across runs with one seed
            timings.write(timing)
        bar.set_postfix(score=f"{row['objective/scores']:.3f}", kl=f"{row['objective/kl']:.2f}", beta=f"{row['objective/kl_coef']:.3f}")

        done = iteration + 1
        if main and config.snapshot_every and done % config.snapshot_every == 0:
            _save_policy(out / "snapshots" / f"iter-{done:05d}", model, tokenizer)
        if (config.save_every and done % config.save_every == 0) or done == config.num_iterations:
            if main:
                save_checkpoint(checkpoint_dir, model=model, optimizer=optimizer,
                                state={"iteration": done, "kl_coef": task.kl_controller.kl_coef})
            if world > 1:
                dist.barrier()
    seconds = time.perf_counter() - started
    if main:
        metrics.close()
        timings.close()
        episodes = (config.num_iterations - start_iter) * config.batch_size
        # as the other trainers' timing.json: this run's iterations (rollout, scoring, update), beside timing.jsonl's
        (out / "timing.json").write_text(json.dumps({
            "iterations": config.num_iterations - start_iter, "train_seconds": seconds,
            "samples_per_second": episodes / seconds if seconds > 0 else 0.0, "processes": world}) + "\n")
        _save_policy(out / "policy", model, tokenizer)
    if world > 1:
        dist.barrier()
    envs.close()
    return LMPPOResult(str(out), config.num_iterations, history, seconds)


def _save_policy(directory: Path, model: PolicyWithValueHead, tokenizer) -> None:
    """The policy as a loadable HF directory plus ``value_head.safetensors``, moved into place atomically."""
    import shutil
    import tempfile

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    model.lm.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file({k: v.contiguous() for k, v in model.v_head.state_dict().items()}, str(tmp / "value_head.safetensors"))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def load_value_head(directory: str | Path, hidden_size: int) -> ValueHead:
    """The value head saved beside a PPO policy."""
    head = ValueHead(hidden_size)
    head.load_state_dict(load_file(str(Path(directory) / "value_head.safetensors")))
    return head
