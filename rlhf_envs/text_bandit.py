"""TextBandit: InstructGPT's bandit environment. One prompt, one whole response, one reward."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from rlhf_envs.compat import renamed_fields
from rlhf_envs.text_common import TextTask, check_group_size, object_array, pick_prompt, vector_info, vector_task

__all__ = ["TextBanditEnv", "TextBanditVectorEnv", "check_handed", "handed_logprobs"]


@renamed_fields(target_kl="kl_setpoint")
class TextBanditEnv(gym.Env):
    """A prompt is drawn; the action is a whole response; reward = ``score - beta * KL``.

    ## Action Space
    ``MultiDiscrete([V] * max_new_tokens)``: the response's token ids. The response runs up to and
    including the first EOS; tokens after it are ignored (write padding there). A first token EOS is
    a valid **empty** response (text ``""``, the KL of that one EOS token still counts). A
    zero-length or wrongly shaped action, a non-integer dtype or an id outside ``[0, V)`` raises
    ``gymnasium.error.InvalidAction`` and leaves the env unchanged.

    ## Observation Space
    ``Box(0, V - 1, (max_prompt_tokens,), int64)``: the prompt's token ids, **left-padded** with the
    tokenizer's pad id (``env.unwrapped.task.pad_token_id``); its attention mask is
    :func:`rlhf_envs.text_common.attention_mask_from_obs`.

    ## Rewards
    ``score(prompt, response) - beta * sum_t kl_t``: ``score`` from the reward model (``sentiment``:
    VADER compound in [-1, 1]), ``kl_t`` the chosen per-token estimator (``k1``, ``k3`` or
    ``exact``, see :mod:`rlhf_envs.kl`; each has the exact KL as its expectation under every sampling
    setting) of ``KL(policy || ref_model)`` over the response tokens.

    **The KL mechanism.** The env never runs the policy: before ``step`` the agent hands over the
    log-probs it sampled the response with, ``env.unwrapped.set_policy_logprobs(logprobs,
    full_logprobs=None)`` with ``logprobs [max_new_tokens]`` the per-token log-probs under the
    distribution actually sampled from (temperature/top-k/top-p, as :func:`rlhf_envs.lm.sampling.generate`
    returns them, 0 after EOS) and, for ``kl_estimator="exact"`` or for ``"k3"`` under top-k/top-p
    (``env.unwrapped.task.needs_full_logprobs``), ``full_logprobs [max_new_tokens, V]``: normalised
    log-distributions at every response token (anything after EOS is ignored), checked at ``step``.
    The env runs only the frozen reference model (one teacher-forced forward; same temperature, no
    truncation, so reference log-probs are finite). If nothing was handed over, the env assumes the
    action was drawn uniformly from the action space (true for ``action_space.sample()`` and
    ``check_env``) and warns once. Handed-over log-probs apply to the next ``step`` only.

    ## Starting State
    A prompt drawn uniformly from ``prompts`` with ``self.np_random``;
    ``reset(options={"prompt_index": i})`` picks prompt ``i``.

    ## Episode End
    Every episode is one step: ``terminated=True`` after it; call ``reset`` for the next prompt.

    ## Arguments
    - ``model``: the frozen **reference** model ``ref_model``: ``None`` (embedded default), a path to a
      Hugging Face causal LM directory, or a ``(model, tokenizer)`` pair.
    - ``reward_model``: a registered name (``"sentiment"``, ``"learned"``, plugins), a callable
      ``f(prompts, responses)`` or an object with ``.score``; ``reward_kwargs`` go to its factory
      (e.g. ``{"path": ...}`` for ``learned``); ``reward_timeout_s`` bounds one call.
    - ``prompts``: list of strings; ``None`` = ``n_prompts`` corpus prompts (``prompt_seed``).
    - ``beta``: KL coefficient; with ``kl_setpoint`` set, the initial value of Ziegler et al.'s adaptive
      controller (``kl_horizon``), updated after every step from the observed KL per response.
    - ``kl_estimator``: ``"k1"``, ``"k3"`` or ``"exact"`` (``"k2"`` is refused: its expectation is not
      the KL, see :mod:`rlhf_envs.kl`).
    - ``max_prompt_tokens``: observation length (``None`` = longest prompt; longer prompts are an error).
    - ``max_new_tokens``: response length ``T``.
    - ``temperature``, ``top_k``, ``top_p``: the distribution the agent samples from
      (``env.unwrapped.task.sampling``).
    - ``device``: where the reference model runs.
    - ``skip_reference``: ``True`` runs no reference forward (``kl``, ``ref_logprobs`` reported as 0, the
      reward is the score alone); needs ``beta=0`` and no ``kl_setpoint`` (KL-free training, e.g. GRPO with beta 0).

    ## Info
    ``score``, ``kl`` (sum over tokens), ``kl_per_token [T]``, ``logprobs [T]``, ``ref_logprobs [T]``,
    ``beta`` (the coefficient used for this reward), ``prompt`` and ``response`` (decoded text).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(self, model: Any = None, reward_model: Any = "sentiment", prompts: list[str] | None = None,
                 beta: float = 0.05, kl_estimator: str = "k1", kl_setpoint: float | None = None,
                 kl_horizon: float = 10000.0, max_prompt_tokens: int | None = None, max_new_tokens: int = 24,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, device: str = "cpu",
                 reward_kwargs: dict | None = None, reward_timeout_s: float | None = None, n_prompts: int = 512,
                 prompt_seed: int = 0, skip_reference: bool = False, render_mode: str | None = None):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.task = TextTask(model, reward_model, prompts, beta, kl_estimator, kl_setpoint, kl_horizon,
                             max_prompt_tokens, max_new_tokens, temperature, top_k, top_p, device, reward_kwargs,
                             reward_timeout_s, n_prompts, prompt_seed, skip_reference)
        self.render_mode = render_mode
        self.observation_space = spaces.Box(0, self.task.vocab_size - 1, (self.task.max_prompt_tokens,), np.int64)
        self.action_space = spaces.MultiDiscrete([self.task.vocab_size] * max_new_tokens)
        self._prompt_index: int | None = None
        self._handed: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._last_text = ""

    def set_policy_logprobs(self, logprobs: Any, full_logprobs: Any = None) -> None:
        """Hand over the policy's log-probs for the next ``step``: ``[T]`` and optionally ``[T, V]``."""
        self._handed = check_handed(self.task, logprobs, full_logprobs, ())

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._prompt_index = pick_prompt(self.task, self.np_random, options)
        self._handed = None
        self._last_text = self.task.prompt_texts[self._prompt_index]
        return self.task.prompt_obs[self._prompt_index].copy(), {"prompt": self.task.prompts[self._prompt_index]}

    def step(self, action):
        if self._prompt_index is None:
            raise ResetNeeded("TextBandit episodes are one step long: call reset() before step()")
        tokens = self.task.check_tokens(action, (self.task.max_new_tokens,), "action")[None]
        handed = None if self._handed is None else tuple(None if h is None else h[None] for h in self._handed)
        rewards, info = score_responses(self.task, np.array([self._prompt_index]), tokens, handed)
        index, self._prompt_index, self._handed = self._prompt_index, None, None
        info = {key: value[0] for key, value in info.items()}
        self._last_text = self.task.prompt_texts[index] + info["response"]
        return self.task.prompt_obs[index].copy(), float(rewards[0]), True, False, info

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return self._last_text + "\n"
        return None


@renamed_fields(target_kl="kl_setpoint")
class TextBanditVectorEnv(VectorEnv):
    """``num_envs`` TextBandit episodes stepped as one batch: one reference forward, one reward call.

    Created by ``gym.make_vec("TextBandit-v0", num_envs=N)``. Same arguments and semantics as
    :class:`TextBanditEnv`; actions are ``[N, max_new_tokens]`` and the handed-over log-probs
    ``envs.set_policy_logprobs(logprobs [N, T], full_logprobs [N, T, V] = None)``.

    **Group sampling** (GRPO, RLOO): ``group_size=G`` draws ``N / G`` prompts and hands each out to
    ``G`` consecutive envs (``obs[g * G : (g + 1) * G]`` are one prompt); ``info["group"] [N]`` is each
    env's group index. The reference runs each distinct prompt of a step once (its cached keys and
    values serve the whole group). ``G`` must divide ``N``.

    Every step ends every episode and (autoreset ``SAME_STEP``) draws the next prompts: the returned
    observations are the new prompts, the scored ones are in ``info["final_obs"]``. The step's
    metrics (``score``, ``kl``, ...) are arrays over envs directly in ``info``.
    """

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, num_envs: int = 1, render_mode: str | None = None, group_size: int = 1, **task_kwargs: Any):
        self.group_size = check_group_size(group_size, num_envs)
        self.task = vector_task(num_envs, render_mode, "TextBandit-v0", task_kwargs)
        self.num_envs = int(num_envs)
        self._group = np.arange(self.num_envs) // self.group_size
        self.render_mode = None
        self.single_observation_space = spaces.Box(0, self.task.vocab_size - 1, (self.task.max_prompt_tokens,),
                                                   np.int64)
        self.single_action_space = spaces.MultiDiscrete([self.task.vocab_size] * self.task.max_new_tokens)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._prompt_index: np.ndarray | None = None
        self._handed: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def set_policy_logprobs(self, logprobs: Any, full_logprobs: Any = None) -> None:
        """Hand over the policy's log-probs for the next ``step``: ``[N, T]`` and optionally ``[N, T, V]``."""
        self._handed = check_handed(self.task, logprobs, full_logprobs, (self.num_envs,))

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        if isinstance(seed, (list, tuple)):
            seed = seed[0]
        super().reset(seed=seed)
        self._prompt_index = self._draw_prompts()
        self._handed = None
        return self.task.prompt_obs[self._prompt_index].copy(), vector_info(
            {"prompt": object_array([self.task.prompts[i] for i in self._prompt_index]),
             "group": self._group.copy()})

    def _draw_prompts(self) -> np.ndarray:
        """``[N]`` prompt indices: ``N / G`` uniform draws, each repeated for its ``G`` envs."""
        drawn = self.np_random.integers(len(self.task.prompts), size=self.num_envs // self.group_size)
        return np.repeat(drawn, self.group_size)

    def step(self, actions):
        if self._prompt_index is None:
            raise ResetNeeded("call reset() before step()")
        tokens = self.task.check_tokens(actions, (self.num_envs, self.task.max_new_tokens), "actions")
        rewards, info = score_responses(self.task, self._prompt_index, tokens, self._handed)
        self._handed = None
        info["final_obs"] = self.task.prompt_obs[self._prompt_index].copy()
        info["group"] = self._group.copy()
        self._prompt_index = self._draw_prompts()
        terminated = np.ones(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        return self.task.prompt_obs[self._prompt_index].copy(), rewards, terminated, truncated, vector_info(info)


def check_handed(task: TextTask, logprobs: Any, full_logprobs: Any,
                  batch: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The handed-over ``logprobs [*batch, T]`` (and ``full_logprobs [*batch, T, V]``) as checked tensors."""
    steps = (task.max_new_tokens,)
    lp = task.check_logprobs(logprobs, batch + steps, "logprobs")
    full = None
    if full_logprobs is not None:
        full = task.check_logprobs(full_logprobs, batch + steps + (task.vocab_size,), "full_logprobs")
    elif task.needs_full_logprobs:
        s = task.sampling
        why = ("the exact KL sums over them" if task.kl_estimator == "exact" else
               f"under top_k={s.top_k}, top_p={s.top_p} k3 needs the reference's mass on the tokens the policy kept, "
               "else it reads too low")
        raise ValueError(f"kl_estimator={task.kl_estimator!r} needs full_logprobs [..., T, V] too ({why}): "
                         "set_policy_logprobs(logprobs, full_logprobs=...), or pick kl_estimator='k1'")
    return lp, full


def handed_logprobs(task: TextTask, response_ids: torch.Tensor, mask: torch.Tensor,
                    handed: tuple[torch.Tensor, torch.Tensor | None] | None, where: str = "response"
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The policy's log-probs ``[N, T]`` (0 outside ``mask``) and, where the estimator needs them, ``[N, T, V]``:
    those handed over (checked), else a uniform policy's (what ``action_space.sample()`` draws from)."""
    if task.skip_reference:
        # beta = 0 without a reference: no forward at all, the KL is reported as 0 and the reward is the score
        logprobs = torch.zeros(mask.shape, device=task.device) if handed is None else handed[0]
        full = None
    elif handed is None:
        task.warn_uniform()
        logprobs = torch.full(mask.shape, task.uniform_logprob(), device=task.device)
        # a uniform policy keeps every token, so k3 needs no correction: only the exact KL needs the full vectors
        full = (torch.full(mask.shape + (task.vocab_size,), task.uniform_logprob(), device=task.device)
                if task.kl_estimator == "exact" else None)
    else:
        logprobs, full = handed
        if torch.isinf(logprobs[mask]).any():
            rows = torch.isinf(logprobs).logical_and(mask).any(-1).nonzero().flatten().tolist()
            raise ValueError(
                f"handed-over logprobs are -inf inside the {where} (rows {rows[:5]}): the action was not sampled "
                "from the distribution they describe; hand over the log-probs of the tokens you sampled")
        if full is not None:
            task.check_log_distributions(full, mask, "full_logprobs", logprobs, response_ids)
            full = full if task.needs_full_logprobs else None
    return logprobs.masked_fill(~mask, 0.0), full


def score_responses(task: TextTask, prompt_index: np.ndarray, tokens: np.ndarray,
                    handed: tuple[torch.Tensor, torch.Tensor | None] | None
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Score ``N`` responses ``tokens [N, T]`` to prompts ``prompt_index [N]``: rewards ``[N]`` and info arrays.

    One batched reference forward, one batched reward call. Validates everything before any state
    changes; the adaptive controller moves only after a successful reward call.
    """
    response_ids = torch.as_tensor(tokens, device=task.device)
    mask = task.response_mask(response_ids)
    response_ids = response_ids.masked_fill(~mask, task.pad_token_id)
    logprobs, full = handed_logprobs(task, response_ids, mask, handed)
    if task.skip_reference:
        ref = kl_per_token = torch.zeros(mask.shape, device=task.device)
    else:
        ref, ref_full = task.ref_logprobs(
            torch.as_tensor(prompt_index, device=task.device), response_ids, mask, full is not None
        )
        kl_per_token = task.kl_per_token(logprobs, ref, mask, full, ref_full)
    kl = kl_per_token.sum(-1)
    responses = task.decode(response_ids, mask)
    scores = task.score(prompt_index.tolist(), responses)
    beta = task.beta
    kl_np = kl.cpu().numpy().astype(np.float32)
    rewards = (scores - beta * kl_np).astype(np.float32)
    task.kl_controller.update(float(kl_np.mean()), len(kl_np))
    info = {
        "score": scores,
        "kl": kl_np,
        "kl_per_token": kl_per_token.cpu().numpy().astype(np.float32),
        "logprobs": logprobs.cpu().numpy().astype(np.float32),
        "ref_logprobs": ref.cpu().numpy().astype(np.float32),
        "beta": np.full(len(kl_np), beta, dtype=np.float32),
        "prompt": object_array([task.prompts[i] for i in prompt_index]),
        "response": np.array(responses, dtype=object),
    }
    return rewards, info
