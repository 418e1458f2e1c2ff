"""PPO for discrete-action Gymnasium envs, in the manner of CleanRL's ``ppo.py``.

The algorithm reads top to bottom in :func:`train_ppo`: collect ``num_steps`` steps from
``num_envs`` envs (natively batched when the env has a vector entry point, such as CatGrid),
compute GAE advantages (bootstrapping the value at time-limit truncation), then
``update_epochs`` passes of clipped-surrogate minibatch updates with a clipped value loss,
advantage normalisation, gradient clipping, a linearly annealed learning rate, and the
approx-KL early stop checked after every minibatch. Logged names follow CleanRL
(``charts/episodic_return``, ``losses/approx_kl``, ...).
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from torch import nn
from tqdm.auto import tqdm

from rlhf_envs.compat import renamed_fields
from rlhf_envs.validation import check_config_fields


@renamed_fields(target_kl="max_approx_kl")
@dataclass
class PPOConfig:
    """Hyper-parameters of :func:`train_ppo` (CleanRL's names)."""

    env_id: str = field(default="CatGrid-v0", metadata={"help": "Gymnasium id of an env with a Discrete action space"})
    env_kwargs: dict = field(default_factory=dict, metadata={"help": "keyword arguments for gym.make_vec"})
    seed: int = field(default=1, metadata={"help": "seed of torch, numpy and the envs"})
    total_timesteps: int = field(default=50_000, metadata={"help": "env steps over all envs"})
    learning_rate: float = field(default=2.5e-3, metadata={"help": "Adam learning rate"})
    num_envs: int = field(default=64, metadata={"help": "parallel envs (one natively batched vector env where the env "
                                                        "has one)"})
    num_steps: int = field(default=8, metadata={"help": "steps per env per rollout"})
    anneal_lr: bool = field(default=True, metadata={"help": "anneal the learning rate linearly to 0"})
    gamma: float = field(default=0.99, metadata={"help": "discount factor"})
    gae_lambda: float = field(default=0.95, metadata={"help": "lambda of generalised advantage estimation"})
    num_minibatches: int = field(default=2, metadata={"help": "minibatches per epoch"})
    update_epochs: int = field(default=4, metadata={"help": "epochs over each rollout"})
    norm_adv: bool = field(default=True, metadata={"help": "normalise advantages per minibatch"})
    clip_coef: float = field(default=0.2, metadata={"help": "surrogate clipping coefficient"})
    clip_vloss: bool = field(default=True, metadata={"help": "clip the value loss as in the PPO paper's code"})
    ent_coef: float = field(default=0.01, metadata={"help": "entropy bonus coefficient (the initial one with "
                                                            "ent_coef_final)"})
    ent_coef_final: float | None = field(default=None, metadata={"help": "anneal the entropy coefficient linearly "
                                                                         "from ent_coef to this over the run; None = "
                                                                         "constant"})
    vf_coef: float = field(default=0.5, metadata={"help": "value loss coefficient"})
    max_grad_norm: float = field(default=0.5, metadata={"help": "global gradient-norm clip"})
    max_approx_kl: float | None = field(default=None, metadata={"help": "stop the update when approx-KL exceeds this "
                                                                        "(checked per minibatch); SB3 and CleanRL "
                                                                        "call it target_kl"})
    reward_scale: float = field(default=1.0, metadata={"help": "rewards are multiplied by this before learning "
                                                               "(returns are logged unscaled)"})
    hidden_size: int = field(default=64, metadata={"help": "width of the two hidden layers of actor and critic"})
    torch_threads: int = field(default=1, metadata={"help": "torch intra-op threads (1 is fastest for small nets)"})
    log_dir: str | None = field(default=None, metadata={"help": "write metrics.csv (and TensorBoard events if "
                                                                "installed) here"})
    tensorboard: bool = field(default=False, metadata={"help": "also write TensorBoard events to log_dir"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self):
        check_config_fields(self)
        positive = ["total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "hidden_size",
                    "torch_threads"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PPOConfig.{name} must be a positive integer, got {value!r}")
        if self.batch_size % self.num_minibatches:
            raise ValueError(
                f"num_envs * num_steps = {self.batch_size} is not divisible by num_minibatches = "
                f"{self.num_minibatches}: pick sizes that divide evenly")
        for name in ["gamma", "gae_lambda"]:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"PPOConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ["learning_rate", "clip_coef", "max_grad_norm", "reward_scale"]:
            if not getattr(self, name) > 0:
                raise ValueError(f"PPOConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_approx_kl is not None and self.max_approx_kl <= 0:
            raise ValueError(f"PPOConfig.max_approx_kl must be > 0 or None, got {self.max_approx_kl!r}")
        for name in ["ent_coef", "ent_coef_final"]:
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"PPOConfig.{name} must be >= 0, got {getattr(self, name)!r}")

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_iterations(self) -> int:
        return max(1, self.total_timesteps // self.batch_size)


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    """Orthogonal weights and constant bias, as in CleanRL and the PPO implementation details."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """Actor and critic: two separate two-hidden-layer tanh MLPs (CleanRL's), evaluated as one.

    The two MLPs share no weights. For speed they run together: the first layers are one
    ``[in, 2H]`` matrix (for Discrete observations an embedding lookup, which equals one-hot times
    the matrix), the second layers one batched matmul over ``[2, H, H]``. Each half is initialised
    orthogonally exactly as CleanRL initialises its separate layers.
    """

    def __init__(self, observation_space: spaces.Space, n_actions: int, hidden_size: int = 64):
        super().__init__()
        if isinstance(observation_space, spaces.Discrete):
            self.n_obs = int(observation_space.n)
            self.first = nn.Embedding(self.n_obs, 2 * hidden_size)
            in_features = self.n_obs
        elif isinstance(observation_space, spaces.Box):
            self.n_obs = 0
            in_features = int(np.prod(observation_space.shape))
            self.first = nn.Linear(in_features, 2 * hidden_size)
        else:
            raise TypeError(f"PPO supports Discrete or Box observations, got {observation_space}")
        H = hidden_size
        self.hidden_size = H
        first = torch.empty(2 * H, in_features)
        for half in (first[:H], first[H:]):
            nn.init.orthogonal_(half, math.sqrt(2))
        with torch.no_grad():
            if self.n_obs:
                self.first.weight.copy_(first.T)
            else:
                self.first.weight.copy_(first)
                self.first.bias.zero_()
        self.second_weight = nn.Parameter(torch.empty(2, H, H))
        for half in self.second_weight.data:
            nn.init.orthogonal_(half, math.sqrt(2))
        self.second_bias = nn.Parameter(torch.zeros(2, 1, H))
        self.actor_head = layer_init(nn.Linear(H, n_actions), std=0.01)
        self.critic_head = layer_init(nn.Linear(H, 1), std=1.0)

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        """What the rollout buffer stores: cell ids ``[B]`` (Discrete) or flat floats ``[B, in]``."""
        return obs.long() if self.n_obs else obs.float().flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, n_actions], values [B])``."""
        h = torch.tanh(self.first(x)).view(x.shape[0], 2, self.hidden_size).transpose(0, 1)
        h = torch.tanh(torch.baddbmm(self.second_bias, h, self.second_weight.transpose(1, 2)))
        return self.actor_head(h[0]), self.critic_head(h[1]).squeeze(-1)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)[1]

    def act(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Sample actions: ``(actions [B], logprobs [B], values [B])``."""
        logits, value = self.forward(x)
        logp = torch.log_softmax(logits, dim=-1)
        # Inverse-CDF sampling: one uniform per row (cheaper than torch.multinomial for a handful of actions).
        u = torch.rand(logp.shape[0], 1, generator=generator)
        action = (logp.exp().cumsum(-1) < u).sum(-1).clamp_(max=logp.shape[-1] - 1)
        return action, logp.gather(-1, action[:, None]).squeeze(-1), value

    def evaluate(self, x: torch.Tensor, action: torch.Tensor):
        """``(logprobs [B], entropy [B], values [B])`` of given actions."""
        logits, value = self.forward(x)
        logp = torch.log_softmax(logits, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, action[:, None]).squeeze(-1), entropy, value

    @torch.no_grad()
    def action_probs(self, obs: np.ndarray) -> np.ndarray:
        """``[B, n_actions]`` the policy's action probabilities per observation."""
        return torch.softmax(self.forward(self.features(torch.as_tensor(obs)))[0], dim=-1).double().numpy()


@dataclass
class PPOResult:
    agent: Agent
    history: list[dict]
    global_step: int
    seconds: float
    stopped_early: bool


def make_vector_env(env_id: str, num_envs: int, env_kwargs: dict | None = None) -> gym.vector.VectorEnv:
    """A vector env with SAME_STEP autoreset: native when the env registers a vector entry point."""
    spec = gym.spec(env_id)
    if spec.vector_entry_point is not None:
        return gym.make_vec(env_id, num_envs=num_envs, **(env_kwargs or {}))
    return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP}, **(env_kwargs or {}))


class _Logger:
    """Metrics to ``metrics.csv`` (and TensorBoard when asked), one row per iteration."""

    def __init__(self, log_dir: str | None, tensorboard: bool, config: PPOConfig):
        self.rows: list[dict] = []
        self.path = self.writer = None
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.path = Path(log_dir) / "metrics.csv"
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as err:
                    raise ImportError("tensorboard=True needs the tensorboard package: "
                                      "pip install tensorboard") from err
                self.writer = SummaryWriter(log_dir)
                self.writer.add_text("hyperparameters", str(asdict(config)))

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "global_step" and value is not None:
                    self.writer.add_scalar(key, value, row["global_step"])

    def close(self) -> None:
        if self.path is not None and self.rows:
            keys = list(dict.fromkeys(k for row in self.rows for k in row))
            tmp = self.path.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(self.rows)
            tmp.replace(self.path)
        if self.writer is not None:
            self.writer.close()


def _gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    next_value: torch.Tensor,
    next_done: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> torch.Tensor:
    """GAE advantages ``[T, N]`` over a rollout; ``dones[t]`` marks step t as the first of a new episode."""
    T = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        nextnonterminal = 1.0 - (next_done if t == T - 1 else dones[t + 1])
        nextvalues = next_value if t == T - 1 else values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
        advantages[t] = lastgaelam
    return advantages


def _update(
    agent: Agent,
    optimizer: torch.optim.Optimizer,
    config: PPOConfig,
    ent_coef: float,
    generator: torch.Generator,
    b_x: torch.Tensor,
    b_actions: torch.Tensor,
    b_logprobs: torch.Tensor,
    b_advantages: torch.Tensor,
    b_returns: torch.Tensor,
    b_values: torch.Tensor,
) -> dict[str, float]:
    """``update_epochs`` passes of clipped-surrogate minibatches over the flat batch; the logged loss figures."""
    clipfracs, approx_kl, old_approx_kl = [], torch.zeros(()), torch.zeros(())
    pg_loss = v_loss = entropy_loss = torch.zeros(())  # logged even if the KL stop hits first
    kl_stop = False
    for _epoch in range(config.update_epochs):
        perm = torch.randperm(config.batch_size, generator=generator)
        for start_idx in range(0, config.batch_size, config.minibatch_size):
            mb = perm[start_idx : start_idx + config.minibatch_size]
            newlogprob, entropy, newvalue = agent.evaluate(b_x[mb], b_actions[mb])
            logratio = newlogprob - b_logprobs[mb]
            ratio = logratio.exp()
            with torch.no_grad():
                old_approx_kl = (-logratio).mean()
                approx_kl = ((ratio - 1) - logratio).mean()
                clipfracs.append(((ratio - 1.0).abs() > config.clip_coef).float().mean().item())
            if config.max_approx_kl is not None and approx_kl > config.max_approx_kl:
                kl_stop = True  # checked before the step, per minibatch
                break
            mb_adv = b_advantages[mb]
            if config.norm_adv:
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
            pg_loss = torch.max(
                -mb_adv * ratio, -mb_adv * torch.clamp(ratio, 1 - config.clip_coef, 1 + config.clip_coef)
            ).mean()
            if config.clip_vloss:
                v_unclipped = (newvalue - b_returns[mb]) ** 2
                v_clipped = b_values[mb] + torch.clamp(newvalue - b_values[mb], -config.clip_coef, config.clip_coef)
                v_loss = 0.5 * torch.max(v_unclipped, (v_clipped - b_returns[mb]) ** 2).mean()
            else:
                v_loss = 0.5 * ((newvalue - b_returns[mb]) ** 2).mean()
            entropy_loss = entropy.mean()
            loss = pg_loss - ent_coef * entropy_loss + v_loss * config.vf_coef
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), config.max_grad_norm, foreach=True)
            optimizer.step()
        if kl_stop:
            break
    return {
        "losses/value_loss": v_loss.item(),
        "losses/policy_loss": pg_loss.item(),
        "losses/entropy": entropy_loss.item(),
        "losses/old_approx_kl": float(old_approx_kl),
        "losses/approx_kl": float(approx_kl),
        "losses/clipfrac": float(np.mean(clipfracs)) if clipfracs else 0.0,
    }


def train_ppo(config: PPOConfig, callback: Callable[[Agent, int], bool] | None = None) -> PPOResult:
    """Train a PPO agent. ``callback(agent, global_step)`` runs after every iteration; returning
    True stops training (used to stop at a target return)."""
    torch.set_num_threads(config.torch_threads)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    envs = make_vector_env(config.env_id, config.num_envs, config.env_kwargs)
    if not isinstance(envs.single_action_space, spaces.Discrete):
        raise TypeError(f"{config.env_id} has action space {envs.single_action_space}; PPO here needs Discrete actions")
    agent = Agent(envs.single_observation_space, int(envs.single_action_space.n), config.hidden_size)
    optimizer = torch.optim.Adam(agent.parameters(), lr=config.learning_rate, eps=1e-5, fused=True)
    logger = _Logger(config.log_dir, config.tensorboard, config)

    T, N = config.num_steps, config.num_envs
    obs_buf = torch.zeros((T, N), dtype=torch.long) if agent.n_obs else torch.zeros((T, N, agent.first.in_features))
    actions = torch.zeros((T, N), dtype=torch.long)
    logprobs = torch.zeros((T, N))
    rewards = torch.zeros((T, N))
    dones = torch.zeros((T, N))
    values = torch.zeros((T, N))

    next_obs, _ = envs.reset(seed=config.seed)
    next_x = agent.features(torch.as_tensor(next_obs))
    next_done = torch.zeros(N)
    episode_return = np.zeros(N)
    episode_length = np.zeros(N, dtype=np.int64)
    global_step, start, stopped_early = 0, time.perf_counter(), False
    bar = tqdm(
        total=config.num_iterations * config.batch_size,
        unit="step",
        disable=not config.progress,
        desc=f"PPO {config.env_id}",
    )

    for iteration in range(1, config.num_iterations + 1):
        progress = (iteration - 1.0) / config.num_iterations
        if config.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - progress) * config.learning_rate
        ent_coef = config.ent_coef
        if config.ent_coef_final is not None:  # explore widely first, then let the policy sharpen
            ent_coef += progress * (config.ent_coef_final - config.ent_coef)

        finished_returns, finished_lengths = [], []
        with torch.inference_mode():
            for step in range(T):
                obs_buf[step] = next_x
                dones[step] = next_done
                action, logprob, value = agent.act(next_x, generator)
                values[step], actions[step], logprobs[step] = value, action, logprob
                next_obs, reward, terminated, truncated, info = envs.step(action.numpy())
                global_step += N
                episode_return += reward
                episode_length += 1
                reward_t = torch.as_tensor(reward, dtype=torch.float32) * config.reward_scale
                done = np.logical_or(terminated, truncated)
                if done.any():
                    # Bootstrap at the time limit: the episode did not really end there.
                    if truncated.any():
                        final_x = agent.features(torch.as_tensor(np.stack(list(info["final_obs"][truncated]))))
                        reward_t[torch.as_tensor(truncated)] += config.gamma * agent.value(final_x)
                    finished_returns.extend(episode_return[done].tolist())
                    finished_lengths.extend(episode_length[done].tolist())
                    episode_return[done] = 0.0
                    episode_length[done] = 0
                rewards[step] = reward_t
                next_x = agent.features(torch.as_tensor(next_obs))
                next_done = torch.as_tensor(done, dtype=torch.float32)

            advantages = _gae(rewards, values, dones, agent.value(next_x), next_done, config.gamma, config.gae_lambda)
            returns = advantages + values

        b_x = obs_buf.reshape(T * N, *obs_buf.shape[2:])
        b_actions, b_logprobs = actions.reshape(-1), logprobs.reshape(-1)
        b_advantages, b_returns, b_values = advantages.reshape(-1), returns.reshape(-1), values.reshape(-1)

        stats = _update(
            agent, optimizer, config, ent_coef, generator, b_x, b_actions, b_logprobs, b_advantages, b_returns, b_values
        )
        var_y = b_returns.var()
        explained_var = float("nan") if var_y == 0 else float(1 - (b_returns - b_values).var() / var_y)
        row = {
            "global_step": global_step,
            "charts/learning_rate": optimizer.param_groups[0]["lr"],
            "charts/ent_coef": ent_coef,
            "charts/episodic_return": float(np.mean(finished_returns)) if finished_returns else None,
            "charts/episodic_length": float(np.mean(finished_lengths)) if finished_lengths else None,
            **stats,
            "losses/explained_variance": explained_var,
            "charts/SPS": int(global_step / (time.perf_counter() - start)),
        }
        logger.log(row)
        bar.update(config.batch_size)
        if finished_returns:
            bar.set_postfix(ret=f"{row['charts/episodic_return']:.1f}", kl=f"{row['losses/approx_kl']:.4f}")
        if callback is not None and callback(agent, global_step):
            stopped_early = True
            break

    bar.close()
    logger.close()
    envs.close()
    return PPOResult(agent, logger.rows, global_step, time.perf_counter() - start, stopped_early)
