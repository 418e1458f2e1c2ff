"""RLHF PPO on multi-turn episodes (``TextDialogue-v0``): only the policy's tokens are trained.

One iteration reads top to bottom in :func:`train_dialogue_ppo`:

1. **Rollout** (:func:`collect_episodes`): ``num_envs`` episodes, turn by turn. Each turn the policy
   samples a whole turn after the current context with the KV-cached sampler, which **stops at the
   turn-end marker** (the tokenizer's EOS); its log-probs are handed to the env before ``step``, so the
   env's KL is on exactly the sampled numbers. The env replies; the next turn reads the longer context.
2. **Old log-probs and values**: one teacher-forced pass per episode over its final context (opening,
   turns, replies). ``loss_mask`` is the env's ``policy_mask``: True on the policy's tokens only.
3. **Credit assignment** (``credit``), rewards as the env pays them: ``-beta * kl_t`` on every policy
   token, the turn's game reward (and the final score) on the turn's last token:

   * ``"token"``: GAE over the policy's tokens of the whole episode in order, env tokens skipped (they
     are not actions; their effect reaches the value of the next turn's first token through its
     context). The default.
   * ``"turn"``: each turn is one action: its reward is the env's reward for the step, its value the
     value at its first token; GAE over turns, the turn's advantage on each of its tokens.
   * ``"episode"``: critic-free, the episode's return minus the batch mean over its spread on every
     policy token (REINFORCE with a baseline).
   * ``"group"``: critic-free, GRPO's advantage: with ``group_size`` consecutive envs playing the same
     episode (the vector env's ``group_size``), the return minus its group's mean over the group's spread.

   A truncated episode (time or context limit) bootstraps from the value after its last token.
4. **Update**: PPO's clipped surrogate and clipped value loss (:mod:`agents.lm_ppo_losses`) with
   ``mask=loss_mask``: env tokens never enter the loss, the entropy or the KL.

:func:`collect_episodes` and :class:`DialogueBatch` do not depend on PPO: another trainer (e.g. GRPO)
reads a batch of episodes the same way.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
from torch import nn

import rlhf_envs  # noqa: F401  (registers the envs)
from agents.lm_policy import PolicyWithValueHead
from agents.lm_ppo_losses import gae, masked_mean, masked_whiten, policy_loss, value_loss
from rlhf_envs.kl import check_env_estimator
from rlhf_envs.lm.sampling import SamplingConfig, generate
from rlhf_envs.text_common import attention_mask_from_obs
from rlhf_envs.validation import check_config_fields

__all__ = ["CREDIT", "DialogueBatch", "DialoguePPOConfig", "DialoguePPOResult", "collect_episodes",
           "evaluate_dialogue", "train_dialogue_ppo"]


@dataclass
class DialoguePPOConfig:
    """Hyper-parameters of multi-turn RLHF PPO."""

    env_id: str = field(
        default="TextDialogue-v0", metadata={"help": "a TextDialogue env id (TextDialogue-v0: guess, "
            "TextDialogueTool-v0: calc)"})
    env_kwargs: dict = field(
        default_factory=dict, metadata={"help": "extra env arguments, e.g. {'game_kwargs': {'tool': False}}"})
    model_path: str | None = field(
        default=None, metadata={"help": "policy initialisation and reference; None = the game's task model"})
    seed: int = field(default=0, metadata={"help": "seed of torch, the env and the sampler"})
    iterations: int = field(default=60, metadata={"help": "rollout-and-update iterations"})
    num_envs: int = field(default=64, metadata={"help": "episodes per iteration (the vector env's num_envs)"})
    num_minibatches: int = field(default=4, metadata={"help": "minibatches (of episodes) per PPO epoch"})
    ppo_epochs: int = field(default=4, metadata={"help": "passes over each rollout"})
    learning_rate: float = field(default=3e-4, metadata={"help": "Adam learning rate of policy and value head"})
    beta: float = field(default=0.01, metadata={"help": "KL coefficient (fixed) on the policy's tokens"})
    kl_estimator: str = field(default="k1", metadata={"help": "the env's KL estimator: k1, k3 or exact"})
    credit: str = field(
        default="token", metadata={"help": "credit assignment: token (GAE over policy tokens), turn (GAE over turns), "
            "episode or group (critic-free; group: GRPO's group baseline)"})
    group_size: int = field(default=1, metadata={"help": "envs per group playing the same episode (credit='group')"})
    gamma: float = field(
        default=1.0, metadata={"help": "discount per policy token (token credit) or per turn (turn credit)"})
    gae_lambda: float = field(default=0.95, metadata={"help": "GAE lambda"})
    cliprange: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value prediction clip"})
    vf_coef: float = field(default=0.5, metadata={"help": "value loss coefficient (unused by critic-free credit)"})
    whiten_advantages: bool = field(
        default=True, metadata={"help": "whiten advantages over the rollout's policy tokens"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "global gradient-norm clip"})
    max_approx_kl: float | None = field(
        default=0.05, metadata={"help": "stop an update once a minibatch's approx-KL exceeds this; None = never"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of each turn"})
    torch_threads: int | None = field(default=1, metadata={"help": "torch intra-op threads; None = torch's default"})

    def __post_init__(self):
        check_config_fields(self)
        check_env_estimator(self.kl_estimator)
        if self.credit not in CREDIT:
            raise ValueError(f"DialoguePPOConfig.credit must be one of {sorted(CREDIT)}, got {self.credit!r}")
        for name in ("iterations", "num_envs", "num_minibatches", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"DialoguePPOConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.group_size < 1 or self.num_envs % self.group_size or (self.credit == "group" and self.group_size < 2):
            raise ValueError(f"DialoguePPOConfig.group_size must divide num_envs={self.num_envs} (and be >= 2 for "
                             f"credit='group'), got group_size={self.group_size!r} with credit={self.credit!r}")
        if self.num_envs % self.num_minibatches:
            raise ValueError(f"num_envs {self.num_envs} is not divisible by num_minibatches {self.num_minibatches}")
        for name in ("learning_rate", "cliprange", "cliprange_value", "max_grad_norm", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DialoguePPOConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.beta < 0:
            raise ValueError(f"DialoguePPOConfig.beta must be >= 0, got {self.beta!r}; 0 turns the KL penalty off")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"DialoguePPOConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.max_approx_kl is not None and not self.max_approx_kl > 0:
            raise ValueError(f"DialoguePPOConfig.max_approx_kl must be > 0 or None, got {self.max_approx_kl!r}")
        if not isinstance(self.env_kwargs, dict):
            raise TypeError(f"DialoguePPOConfig.env_kwargs must be a dict, got {type(self.env_kwargs).__name__}")


@dataclass
class DialogueBatch:
    """``E`` finished episodes as prompt (the opening, left-padded ``[E, P]``) and the rest (``[E, R]``, right-padded).

    ``response_mask`` is True on every real token after the opening plus one trailing slot (whose value is
    the bootstrap value after the episode); ``loss_mask`` on the policy's tokens only. Per-token arrays are
    ``[E, R]`` and 0 outside ``loss_mask``.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    loss_mask: torch.Tensor
    kl: torch.Tensor
    """per policy token, as the env computed it (nats)."""
    turn_reward: torch.Tensor
    """the game's reward of each turn (plus the final score) on the turn's last token."""
    turn_start: torch.Tensor
    """True on each turn's first token."""
    terminated: torch.Tensor
    truncated: torch.Tensor
    turns: torch.Tensor
    returns: torch.Tensor
    """the sum of the env's rewards over the episode ``[E]``."""
    score: torch.Tensor
    beta: float


def _episode_tensors(contexts: list[np.ndarray], masks: list[np.ndarray], pad: int, fill: int
                     ) -> tuple[torch.Tensor, ...]:
    """Split each finished context (real tokens) at its first policy token: opening ``[E, P]`` left-padded, rest
    ``[E, R]`` right-padded with one trailing ``fill`` slot.

    Returns ``(prompt_ids, prompt_mask, response_ids, response_mask, loss_mask)``.
    """
    opens = [int(np.argmax(m)) for m in masks]
    P = max(opens)
    R = max(len(c) - o for c, o in zip(contexts, opens)) + 1
    E = len(contexts)
    prompt_ids, prompt_mask = torch.full((E, P), pad), torch.zeros(E, P, dtype=torch.bool)
    response_ids, response_mask = torch.full((E, R), pad), torch.zeros(E, R, dtype=torch.bool)
    loss_mask = torch.zeros(E, R, dtype=torch.bool)
    for i, (c, m, o) in enumerate(zip(contexts, masks, opens)):
        prompt_ids[i, P - o:], prompt_mask[i, P - o:] = torch.as_tensor(c[:o]), True
        n = len(c) - o
        response_ids[i, :n], response_ids[i, n] = torch.as_tensor(c[o:]), fill
        response_mask[i, :n + 1] = True
        loss_mask[i, :n] = torch.as_tensor(m[o:])
    return prompt_ids, prompt_mask, response_ids, response_mask, loss_mask


def collect_episodes(lm: nn.Module, envs: Any, sampling: SamplingConfig, generator: torch.Generator,
                     seed: int) -> DialogueBatch:
    """Play one episode on every env of the vector TextDialogue ``envs`` with ``lm``; rows whose episode ended
    step on with a bare turn-end marker (ignored) until every row's first episode is over."""
    task, d = envs.unwrapped.task, envs.unwrapped.dialogues
    n, width, eot, pad = envs.num_envs, d.max_turn_tokens, task.eos_token_id, task.pad_token_id
    obs, _ = envs.reset(seed=seed)
    active = np.ones(n, dtype=bool)
    record: list[dict[str, Any]] = [{"kl": [], "reward": [], "lengths": []} for _ in range(n)]
    lm.eval()
    while active.any():
        rows = np.flatnonzero(active)
        ids = torch.as_tensor(obs[rows])
        gen = generate(lm, ids, attention_mask_from_obs(ids, pad), sampling, eos_token_id=eot, pad_token_id=pad,
                       generator=generator)
        actions = np.full((n, width), pad, dtype=np.int64)
        actions[:, 0] = eot
        logprobs = np.zeros((n, width), dtype=np.float32)
        actions[rows, :gen.response_ids.shape[1]] = gen.response_ids.numpy()
        logprobs[rows, :gen.logprobs.shape[1]] = gen.logprobs.numpy()
        envs.set_policy_logprobs(logprobs)
        obs, _, terminated, truncated, info = envs.step(actions)
        lengths = gen.response_mask.sum(-1).numpy()
        for j, i in enumerate(rows):
            r = record[i]
            r["kl"].append(info["kl_per_token"][i, :lengths[j]])
            r["reward"].append(float(info["turn_reward"][i] + info["score"][i]))
            r["lengths"].append(int(lengths[j]))
            if terminated[i] or truncated[i]:
                active[i] = False
                real = info["final_obs"][i] != pad
                real = np.cumsum(real) > 0  # the leading pad run only
                r.update(context=info["final_obs"][i][real], mask=info["final_policy_mask"][i][real],
                         terminated=bool(terminated[i]), truncated=bool(truncated[i]), score=float(info["score"][i]),
                         ret=float(sum(r["reward"]) - task.beta * sum(k.sum() for k in r["kl"])))
    prompt_ids, prompt_mask, response_ids, response_mask, loss_mask = _episode_tensors(
        [r["context"] for r in record], [r["mask"] for r in record], pad, eot)
    kl, turn_reward, turn_start = (torch.zeros(loss_mask.shape) for _ in range(3))
    for i, r in enumerate(record):
        at = loss_mask[i].nonzero().flatten()
        ends = np.cumsum(r["lengths"]) - 1
        kl[i, at] = torch.as_tensor(np.concatenate(r["kl"]))
        turn_reward[i, at[ends]] = torch.as_tensor(r["reward"], dtype=torch.float32)
        turn_start[i, at[ends - np.array(r["lengths"]) + 1]] = 1.0
    column = {key: torch.tensor([r[key] for r in record]) for key in ("terminated", "truncated", "ret", "score")}
    return DialogueBatch(prompt_ids, prompt_mask, response_ids, response_mask, loss_mask, kl, turn_reward,
                         turn_start.bool(), column["terminated"], column["truncated"],
                         torch.tensor([len(r["lengths"]) for r in record]), column["ret"], column["score"], task.beta)


def _dense(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked entries of each row of ``x [E, R]`` moved to the front: ``(dense [E, K], dense_mask [E, K])``."""
    counts = mask.sum(-1)
    dense_mask = torch.arange(int(counts.max()))[None, :] < counts[:, None]
    dense = x.new_zeros(dense_mask.shape)
    dense[dense_mask] = x[mask]
    return dense, dense_mask


def _bootstrap(batch: DialogueBatch, values: torch.Tensor, gamma: float) -> torch.Tensor:
    """``gamma * V(after the episode)`` for truncated episodes (0 for terminated ones) ``[E]``."""
    last = batch.response_mask.sum(-1) - 1
    return gamma * values[torch.arange(len(last)), last] * batch.truncated.float()


def _token_credit(batch: DialogueBatch, values: torch.Tensor, config: DialoguePPOConfig
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over the policy's tokens of each episode, in order (env tokens skipped)."""
    m = batch.loss_mask
    rewards = batch.turn_reward - batch.beta * batch.kl
    r, dm = _dense(rewards, m)
    v, _ = _dense(values, m)
    last = dm.sum(-1) - 1
    r[torch.arange(len(last)), last] += _bootstrap(batch, values, config.gamma)
    adv, ret = gae(r, v, dm, config.gamma, config.gae_lambda)
    out_adv, out_ret = torch.zeros_like(values), torch.zeros_like(values)
    out_adv[m], out_ret[m] = adv[dm], ret[dm]
    return out_adv, out_ret


def _turn_credit(batch: DialogueBatch, values: torch.Tensor, config: DialoguePPOConfig
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over turns: a turn's reward is the step's env reward, its value the value at its first token."""
    m = batch.loss_mask
    turn_index = torch.cumsum(batch.turn_start.long(), -1) - 1  # each policy token's turn
    step_reward = batch.turn_reward - batch.beta * batch.kl
    K = int(batch.turns.max())
    r = torch.zeros(len(m), K).scatter_add_(1, turn_index.clamp(min=0) * m, step_reward * m)
    v, dm = _dense(values, batch.turn_start)
    r[torch.arange(len(m)), batch.turns - 1] += _bootstrap(batch, values, config.gamma)
    adv, ret = gae(r, v, dm, config.gamma, config.gae_lambda)
    index = turn_index.clamp(min=0)
    return adv.gather(1, index) * m, ret.gather(1, index) * m


def _episode_credit(batch: DialogueBatch, values: torch.Tensor, config: DialoguePPOConfig
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Critic-free: ``(G - mean G) / std G`` over the batch on every policy token; returns are ``G``."""
    g = batch.returns
    adv = (g - g.mean()) / (g.std() + 1e-8)
    m = batch.loss_mask.float()
    return adv[:, None] * m, g[:, None] * m


def _group_credit(batch: DialogueBatch, values: torch.Tensor, config: DialoguePPOConfig
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: ``(G - mean_group G) / std_group G`` on every policy token; groups: ``group_size`` consecutive episodes."""
    g = batch.returns.view(-1, config.group_size)
    adv = ((g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True) + 1e-8)).flatten()
    m = batch.loss_mask.float()
    return adv[:, None] * m, batch.returns[:, None] * m


CREDIT: dict[str, Callable[[DialogueBatch, torch.Tensor, DialoguePPOConfig], tuple[torch.Tensor, torch.Tensor]]] = {
    "token": _token_credit, "turn": _turn_credit, "episode": _episode_credit, "group": _group_credit}
"""Credit assignment: ``f(batch, old_values [E, R], config) -> (advantages [E, R], returns [E, R])``."""


def _minibatch_loss(model: PolicyWithValueHead, batch: dict[str, torch.Tensor], config: DialoguePPOConfig,
                    sampling: SamplingConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO loss of a minibatch of episodes; every term is masked to the policy's tokens (``loss_mask``)."""
    m = batch["loss_mask"]
    logprobs, values, entropy = model(batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
                                      batch["response_mask"], sampling)
    pg, pg_stats = policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], m, config.cliprange)
    loss = pg
    vf = torch.zeros(())
    if config.credit not in ("episode", "group"):
        vf, _ = value_loss(values, batch["old_values"], batch["returns"], m, config.cliprange_value)
        loss = loss + config.vf_coef * vf
    return loss, {"approxkl": float(pg_stats["approx_kl"]), "pg_loss": pg.item(), "vf_loss": vf.item(),
                  "clipfrac": float(pg_stats["clipfrac"]), "entropy": float(masked_mean(entropy.detach(), m))}


@dataclass
class DialoguePPOResult:
    model: PolicyWithValueHead
    tokenizer: Any
    history: list[dict]
    seconds: float


def train_dialogue_ppo(config: DialoguePPOConfig) -> DialoguePPOResult:
    """Multi-turn RLHF PPO (module docstring): the trained policy with its value head, one row per iteration."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    torch.manual_seed(config.seed)
    model_kwargs = {"model": config.model_path} if config.model_path else {}
    envs = gym.make_vec(config.env_id, num_envs=config.num_envs, beta=config.beta, kl_estimator=config.kl_estimator,
                        temperature=config.temperature, group_size=config.group_size, **model_kwargs,
                        **config.env_kwargs)
    task = envs.unwrapped.task
    positions = getattr(task.ref_model.config, "n_positions", None)
    if positions is not None and envs.unwrapped.dialogues.max_context_tokens >= positions:
        raise ValueError(f"max_context_tokens={envs.unwrapped.dialogues.max_context_tokens} leaves no position of the "
                         f"model's {positions} for the value after an episode (the truncation bootstrap); lower it")
    lm = copy.deepcopy(task.ref_model).requires_grad_(True)  # the reference is the SFT model the policy starts from
    model = PolicyWithValueHead(lm)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, eps=1e-5)
    sampling = SamplingConfig(max_new_tokens=envs.unwrapped.dialogues.max_turn_tokens, temperature=config.temperature)
    generator = torch.Generator().manual_seed(config.seed)
    history, started = [], time.perf_counter()
    for iteration in range(config.iterations):
        batch = collect_episodes(model.lm, envs, sampling, generator, seed=config.seed * 100_003 + iteration)
        fields = {"prompt_ids": batch.prompt_ids, "prompt_mask": batch.prompt_mask, "response_ids": batch.response_ids,
                  "response_mask": batch.response_mask, "loss_mask": batch.loss_mask}
        with torch.no_grad():
            old_logprobs, old_values, _ = model(*(fields[k] for k in list(fields)[:4]), sampling)
        advantages, returns = CREDIT[config.credit](batch, old_values, config)
        if config.whiten_advantages:
            advantages = masked_whiten(advantages, batch.loss_mask)
        fields.update(old_logprobs=old_logprobs, old_values=old_values, advantages=advantages, returns=returns)
        model.train()
        stats: dict[str, list[float]] = {}
        stopped = False
        for _epoch in range(config.ppo_epochs):
            for mb in torch.randperm(config.num_envs, generator=generator).chunk(config.num_minibatches):
                loss, mb_stats = _minibatch_loss(model, {k: v[mb] for k, v in fields.items()}, config, sampling)
                if config.max_approx_kl is not None and mb_stats["approxkl"] > config.max_approx_kl:
                    stopped = True
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                for key, value in mb_stats.items():
                    stats.setdefault(key, []).append(value)
            if stopped:
                break
        history.append({"iteration": iteration + 1, "episode/turns": float(batch.turns.float().mean()),
                        "episode/solved": float(batch.terminated.float().mean()),
                        "episode/return": float(batch.returns.mean()), "episode/score": float(batch.score.mean()),
                        "objective/kl": float((batch.kl * batch.loss_mask).sum(-1).mean()),
                        "policy/early_stopped": stopped, "policy/updates": len(stats.get("pg_loss", [])),
                        **{f"policy/{k}_avg": float(np.mean(v)) for k, v in stats.items()}})
    envs.close()
    return DialoguePPOResult(model, task.tokenizer, history, time.perf_counter() - started)


def evaluate_dialogue(lm: nn.Module, env_id: str = "TextDialogue-v0", episodes: int = 256, seed: int = 12345,
                      greedy: bool = False, temperature: float = 1.0, **env_kwargs: Any) -> dict[str, float]:
    """Play ``episodes`` episodes with ``lm`` (sampling, or ``greedy``): mean turns (all episodes, and solved ones),
    fraction solved (terminated), mean score and return."""
    envs = gym.make_vec(env_id, num_envs=episodes, temperature=temperature, **env_kwargs)
    sampling = SamplingConfig(max_new_tokens=envs.unwrapped.dialogues.max_turn_tokens, temperature=temperature,
                              greedy=greedy)
    batch = collect_episodes(lm, envs, sampling, torch.Generator().manual_seed(seed), seed)
    envs.close()
    solved = batch.terminated
    turns = batch.turns.float()
    return {"turns": float(turns.mean()), "turns_solved": float(turns[solved].mean()) if solved.any() else float("nan"),
            "solved": float(solved.float().mean()), "score": float(batch.score.mean()),
            "return": float(batch.returns.mean())}
