"""TextToken: the TextBandit task one token per step, with a per-token KL penalty."""

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
from rlhf_envs.lm.decoding import GPT2Decoder
from rlhf_envs.lm.sampling import cache_keyword, preallocated_cache, prefill, processed_logprobs
from rlhf_envs.lm.segments import additive_mask
from rlhf_envs.text_common import TextTask, object_array, pick_prompt, vector_info, vector_task

__all__ = ["TextTokenEnv", "TextTokenVectorEnv"]


class _TokenEpisodes:
    """``N`` token-level episodes and the reference model's KV cache over all of them.

    The cache is one timeline of ``S`` slots shared by the rows (``[N, heads, S, head_dim]`` per
    layer, preallocated to ``2 * (P + T)``); each step appends one slot for every row. A row that
    starts a new episode gets its prompt's keys/values (one batched prefill over the restarting
    rows) written into the last ``P`` slots and everything before masked out. Keys carry their
    own positions, so where they sit in the timeline does not matter. Every row's live entries
    lie in the last ``P + T`` slots, so when the buffer is full those are moved to the front.
    """

    def __init__(self, task: TextTask, num_envs: int):
        if task.adapters_off:
            raise ValueError("TextToken-v0 does not take an AdaptersOff reference (its per-token passes run the "
                             "reference "
                             "model directly): pass a model path or a (model, tokenizer) pair, or use TextBandit-v0")
        self.task = task
        self.n = num_envs
        self.width = task.max_prompt_tokens + task.max_new_tokens
        self.capacity = 2 * self.width
        device = task.device
        self.prompt_index = np.zeros(num_envs, dtype=np.int64)
        self.steps = np.zeros(num_envs, dtype=np.int64)
        self.obs = np.full((num_envs, self.width), task.pad_token_id, dtype=np.int64)
        self.response = np.full((num_envs, task.max_new_tokens), task.pad_token_id, dtype=np.int64)
        self.logprobs = np.zeros((num_envs, task.max_new_tokens), dtype=np.float32)
        self.ref_logprobs = np.zeros((num_envs, task.max_new_tokens), dtype=np.float32)
        self.kl_per_token = np.zeros((num_envs, task.max_new_tokens), dtype=np.float32)
        self.cache = preallocated_cache(task.ref_model, self.capacity)
        self.keep = torch.zeros(num_envs, self.capacity, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(num_envs, dtype=torch.long, device=device)
        self.ref_next = torch.zeros(num_envs, task.vocab_size, device=device)
        self.rows = np.arange(num_envs)

    @torch.no_grad()
    def start(self, rows: np.ndarray, prompt_index: np.ndarray) -> None:
        """Begin new episodes on ``rows`` with prompts ``prompt_index`` (one batched prefill)."""
        task = self.task
        prompt_len = task.max_prompt_tokens
        self.prompt_index[rows] = prompt_index
        self.steps[rows] = 0
        self.obs[rows] = task.pad_token_id
        self.obs[rows, -prompt_len:] = task.prompt_obs[prompt_index]
        self.response[rows] = task.pad_token_id
        self.logprobs[rows] = self.ref_logprobs[rows] = self.kl_per_token[rows] = 0.0
        index = torch.as_tensor(prompt_index, device=task.device)
        ids, mask = task.prompt_ids[index], task.prompt_mask[index]
        view = task.reference_view()
        if view is not None:  # the lean GPT-2 forward (rlhf_envs.lm.gpt2), same numbers as Hugging Face's
            decoder = GPT2Decoder(view, ids, mask, 0)
            logits = view.logits(decoder.prefill_hidden())
            fresh = decoder.cache
        else:
            cache = preallocated_cache(task.ref_model, prompt_len)
            logits = prefill(task.ref_model, ids, mask, cache)
            fresh = [(layer.keys, layer.values) for layer in cache.layers]
        layers = self.cache.layers
        if len(rows) == self.n or not layers[0].is_initialized:
            for layer in layers:
                layer.length = 0
            self.keep.zero_()
            length = 0
        else:
            length = layers[0].length
        if length < prompt_len:
            for layer in layers:
                layer.length = prompt_len
            length = prompt_len
        torch_rows = torch.as_tensor(rows, device=task.device)
        for layer, (keys, values) in zip(layers, fresh):
            if not layer.is_initialized:
                layer.lazy_initialization(keys[:1].expand(self.n, -1, -1, -1), values[:1].expand(self.n, -1, -1, -1))
            layer.keys[torch_rows, :, length - prompt_len : length] = keys
            layer.values[torch_rows, :, length - prompt_len : length] = values
        self.keep[torch_rows] = False
        self.keep[torch_rows, length - prompt_len : length] = mask
        self.next_position[torch_rows] = mask.sum(-1)
        self.ref_next[torch_rows] = processed_logprobs(logits, task.ref_sampling)

    def _compact(self) -> None:
        layers = self.cache.layers
        length = layers[0].length
        for layer in layers:
            layer.keys[:, :, : self.width] = layer.keys[:, :, length - self.width : length].clone()
            layer.values[:, :, : self.width] = layer.values[:, :, length - self.width : length].clone()
            layer.length = self.width
        self.keep[:, : self.width] = self.keep[:, length - self.width : length].clone()
        self.keep[:, self.width :] = False

    @torch.no_grad()
    def advance(self, actions: np.ndarray, handed: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Apply one token per row: returns ``(kl_t [N], done [N], just-finished rows)``.

        ``handed [N, V]`` is the policy's log-distribution of the current states (``None`` = uniform).
        """
        task = self.task
        device = task.device
        tokens = torch.as_tensor(actions, device=device)
        rows = torch.arange(self.n, device=device)
        if handed is None:
            task.warn_uniform()
            full = torch.full((self.n, task.vocab_size), task.uniform_logprob(), device=device)
        else:
            full = handed
        logprob = full[rows, tokens]
        if torch.isinf(logprob).any():
            bad = torch.isinf(logprob).nonzero().flatten().tolist()
            raise ValueError(
                f"the handed-over log-distribution gives -inf to the chosen token in rows {bad[:5]}: the action was "
                "not sampled from it; hand over the distribution you sampled from")
        ref = self.ref_next[rows, tokens]
        ones = torch.ones_like(logprob, dtype=torch.bool)
        kl = task.kl_per_token(logprob, ref, ones, full, self.ref_next).cpu().numpy().astype(np.float32)
        t = self.steps.copy()
        self.response[self.rows, t] = actions
        self.logprobs[self.rows, t] = logprob.cpu().numpy()
        self.ref_logprobs[self.rows, t] = ref.cpu().numpy()
        self.kl_per_token[self.rows, t] = kl
        self.steps += 1
        self.obs[:, :-1] = self.obs[:, 1:]
        self.obs[:, -1] = actions
        done = (actions == task.eos_token_id) | (self.steps >= task.max_new_tokens)
        if not done.all():
            self._feed(tokens, torch.as_tensor(~done, device=device))
        return kl, done, np.flatnonzero(done)

    def _feed(self, tokens: torch.Tensor, alive: torch.Tensor) -> None:
        """One batched reference forward of the new tokens through the cache (finished rows masked)."""
        if self.cache.layers[0].length >= self.capacity:
            self._compact()
        layers = self.cache.layers
        length = layers[0].length
        self.keep[:, length] = alive
        view = self.task.reference_view()
        if view is not None:  # writes slot `length` of the same buffers in place
            # every row's live keys lie in the last `width` slots (see the class docstring): attend to those only
            first = max(0, length + 1 - self.width)
            hidden = view.forward(tokens[:, None], self.next_position[:, None],
                                  additive_mask(self.keep[:, None, None, first : length + 1], view.dtype),
                                  [(layer.keys, layer.values) for layer in layers], length, first)
            for layer in layers:
                layer.length = length + 1
            logits = view.logits(hidden[:, -1])
        else:
            logits = self.task.ref_model(
                input_ids=tokens[:, None],
                attention_mask=additive_mask(self.keep[:, None, None, : length + 1],
                                             next(self.task.ref_model.parameters()).dtype),
                position_ids=self.next_position[:, None],
                **{cache_keyword(self.task.ref_model): self.cache},
                use_cache=True,
            ).logits[:, -1]
        self.next_position += 1
        self.ref_next = processed_logprobs(logits, self.task.ref_sampling)

    def texts(self, rows: np.ndarray, response: np.ndarray | None = None, steps: np.ndarray | None = None) -> list[str]:
        """Response text so far of ``rows`` (or of the given ``response [len(rows), T]`` and ``steps``)."""
        ids = torch.as_tensor(self.response[rows] if response is None else response)
        steps = self.steps[rows] if steps is None else steps
        written = torch.arange(ids.shape[1]) < torch.as_tensor(steps)[:, None]
        return self.task.decode(ids, self.task.response_mask(ids) & written)

    def info(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        task = self.task
        return {
            "kl": self.kl_per_token[rows].sum(-1),
            "kl_per_token": self.kl_per_token[rows].copy(),
            "logprobs": self.logprobs[rows].copy(),
            "ref_logprobs": self.ref_logprobs[rows].copy(),
            "beta": np.full(len(rows), task.beta, dtype=np.float32),
            "prompt": object_array([task.prompts[i] for i in self.prompt_index[rows]]),
            "response": np.array(self.texts(rows), dtype=object),
        }

    def score_ending(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(rows [M], scores [M])`` of the episodes that ``actions [N]`` would end, in one reward call.

        Runs before :meth:`advance` changes anything, so a reward model that fails leaves every episode as it
        was and the step can be retried.
        """
        task = self.task
        rows = np.flatnonzero((actions == task.eos_token_id) | (self.steps + 1 >= task.max_new_tokens))
        if not len(rows):
            return rows, np.zeros(0, dtype=np.float32)
        response = self.response[rows].copy()
        response[np.arange(len(rows)), self.steps[rows]] = actions[rows]
        return rows, task.score(self.prompt_index[rows].tolist(), self.texts(rows, response, self.steps[rows] + 1))

    def finish(self, done_rows: np.ndarray, scores: np.ndarray, rewards: np.ndarray) -> None:
        """Add the finished rows' ``scores`` to ``rewards`` and step the adaptive controller on their KL."""
        rewards[done_rows] += scores
        self.task.kl_controller.update(float(self.kl_per_token[done_rows].sum(-1).mean()), len(done_rows))


def _check_handed(task: TextTask, logprobs: Any, batch: tuple[int, ...]) -> torch.Tensor:
    full = task.check_logprobs(logprobs, batch + (task.vocab_size,), "logprobs")
    task.check_log_distributions(full, torch.ones(batch, dtype=torch.bool, device=full.device), "logprobs")
    return full


@renamed_fields(target_kl="kl_setpoint")
class TextTokenEnv(gym.Env):
    """The response is written one token per step; reward ``-beta * kl_t``, plus the score at the end.

    ## Action Space
    ``Discrete(V)``: the next token id. EOS ends the episode (EOS as the first token is a valid
    empty response).

    ## Observation Space
    ``Box(0, V - 1, (max_prompt_tokens + max_new_tokens,), int64)``: prompt plus the response so
    far, **left-padded** with the pad id so the newest token is always last; its attention mask is
    :func:`rlhf_envs.text_common.attention_mask_from_obs`.

    ## Rewards
    At step ``t``: ``-beta * kl_t`` with ``kl_t`` the chosen estimator for the token just taken; on
    the last step also ``score(prompt, response)`` from the reward model.

    **The KL mechanism.** The env never runs the policy: before each ``step`` the agent hands over
    its log-distribution of the current state, ``env.unwrapped.set_policy_logprobs(logprobs)`` with
    ``logprobs [V]`` (the distribution actually sampled from: temperature/top-k/top-p, e.g.
    :func:`rlhf_envs.lm.sampling.processed_logprobs`); the env takes the chosen token's entry (and the
    whole vector for ``kl_estimator="exact"``). The reference model runs once per step through a
    KV cache (same temperature, no truncation, so reference log-probs are finite). If nothing was
    handed over, the env assumes a uniform policy (true for ``action_space.sample()`` and
    ``check_env``) and warns once. :mod:`agents.sb3_text` does the hand-over for Stable-Baselines3.

    ## Starting State
    A prompt drawn uniformly with ``self.np_random`` (``options={"prompt_index": i}`` picks one).

    ## Episode End
    ``terminated=True`` at EOS or after ``max_new_tokens`` tokens (the length limit is part of the
    task: the response is complete and scored, so there is nothing to bootstrap).

    ## Arguments
    As :class:`rlhf_envs.text_bandit.TextBanditEnv`: ``model`` (the frozen ``ref_model``),
    ``reward_model``, ``reward_kwargs``, ``reward_timeout_s``, ``prompts``, ``n_prompts``,
    ``prompt_seed``, ``beta``, ``kl_estimator``, ``kl_setpoint``, ``kl_horizon`` (adaptive beta
    updated per finished episode), ``max_prompt_tokens``, ``max_new_tokens``, ``temperature``,
    ``top_k``, ``top_p``, ``device``.

    Errors: a bad action or hand-over raises before anything changes. So does a reward model that
    fails on the last step (:class:`rlhf_envs.rewards.RewardModelError`): the episode is scored
    before it advances, so the same ``step`` (the hand-over is kept) can be retried.

    ## Info
    Every step: ``kl`` (sum so far), ``kl_per_token [T]``, ``logprobs [T]``, ``ref_logprobs [T]``
    (zeros beyond the current step), ``beta``, ``prompt``, ``response`` (text so far); the last
    step adds ``score``.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, model: Any = None, reward_model: Any = "sentiment", prompts: list[str] | None = None,
                 beta: float = 0.05, kl_estimator: str = "k1", kl_setpoint: float | None = None,
                 kl_horizon: float = 10000.0, max_prompt_tokens: int | None = None, max_new_tokens: int = 24,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, device: str = "cpu",
                 reward_kwargs: dict | None = None, reward_timeout_s: float | None = None, n_prompts: int = 512,
                 prompt_seed: int = 0, render_mode: str | None = None):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.task = TextTask(model, reward_model, prompts, beta, kl_estimator, kl_setpoint, kl_horizon,
                             max_prompt_tokens, max_new_tokens, temperature, top_k, top_p, device, reward_kwargs,
                             reward_timeout_s, n_prompts, prompt_seed)
        self.render_mode = render_mode
        self._episodes = _TokenEpisodes(self.task, 1)
        width = self._episodes.width
        self.observation_space = spaces.Box(0, self.task.vocab_size - 1, (width,), np.int64)
        self.action_space = spaces.Discrete(self.task.vocab_size)
        self._running = False
        self._handed: torch.Tensor | None = None

    def set_policy_logprobs(self, logprobs: Any) -> None:
        """Hand over the policy's log-distribution ``[V]`` of the current state for the next ``step``."""
        self._handed = _check_handed(self.task, logprobs, ())

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        index = pick_prompt(self.task, self.np_random, options)
        self._episodes.start(np.array([0]), np.array([index]))
        self._running = True
        self._handed = None
        return self._episodes.obs[0].copy(), {"prompt": self.task.prompts[index]}

    def step(self, action):
        if not self._running:
            raise ResetNeeded("the episode has ended: call reset() before step()")
        token = self.task.check_tokens(action, np.shape(action), "action")
        if token.shape not in ((), (1,)):
            raise gym.error.InvalidAction(f"action must be one token id (Discrete), got shape {token.shape}")
        handed = None if self._handed is None else self._handed[None]
        episodes = self._episodes
        _, scores = episodes.score_ending(token.reshape(1))  # before anything changes: the step can be retried
        kl, done, done_rows = episodes.advance(token.reshape(1), handed)
        self._handed = None
        reward = -self.task.beta * kl
        info = {key: value[0] for key, value in episodes.info(np.array([0])).items()}
        if done[0]:
            self._running = False
            episodes.finish(done_rows, scores, reward)
            info["score"] = float(scores[0])
        return episodes.obs[0].copy(), float(reward[0]), bool(done[0]), False, info

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            rows = np.array([0])
            return self.task.prompt_texts[self._episodes.prompt_index[0]] + self._episodes.texts(rows)[0] + "\n"
        return None


@renamed_fields(target_kl="kl_setpoint")
class TextTokenVectorEnv(VectorEnv):
    """``num_envs`` TextToken episodes: one batched reference forward and at most one reward call per step.

    Created by ``gym.make_vec("TextToken-v0", num_envs=N)``. Same arguments as
    :class:`TextTokenEnv`; actions ``[N]``; hand-over ``envs.set_policy_logprobs(logprobs [N, V])``.
    Autoreset is ``SAME_STEP``: finished rows get a new prompt at once (one batched prefill over
    them), the returned obs is the new episode's first, and the finished one is in
    ``info["final_obs"]``; ``info["score"]`` is set where ``info["_score"]`` is True. If the reward
    model fails (:class:`rlhf_envs.rewards.RewardModelError`), nothing has changed: all ``N`` running
    episodes are kept and the same ``step`` (the hand-over is kept) can be retried.
    """

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, num_envs: int = 1, render_mode: str | None = None, **task_kwargs: Any):
        self.task = vector_task(num_envs, render_mode, "TextToken-v0", task_kwargs)
        self.num_envs = int(num_envs)
        self.render_mode = None
        self._episodes = _TokenEpisodes(self.task, self.num_envs)
        self.single_observation_space = spaces.Box(0, self.task.vocab_size - 1, (self._episodes.width,), np.int64)
        self.single_action_space = spaces.Discrete(self.task.vocab_size)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._started = False
        self._handed: torch.Tensor | None = None

    def set_policy_logprobs(self, logprobs: Any) -> None:
        """Hand over the policy's log-distributions ``[N, V]`` of the current states for the next ``step``."""
        self._handed = _check_handed(self.task, logprobs, (self.num_envs,))

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        if isinstance(seed, (list, tuple)):
            seed = seed[0]
        super().reset(seed=seed)
        index = self.np_random.integers(len(self.task.prompts), size=self.num_envs)
        self._episodes.start(np.arange(self.num_envs), index)
        self._started = True
        self._handed = None
        return self._episodes.obs.copy(), vector_info(
            {"prompt": object_array([self.task.prompts[i] for i in index])})

    def step(self, actions):
        if not self._started:
            raise ResetNeeded("call reset() before step()")
        tokens = self.task.check_tokens(actions, (self.num_envs,), "actions")
        episodes = self._episodes
        _, scores = episodes.score_ending(tokens)  # before anything changes: a failing reward model loses nothing
        kl, done, done_rows = episodes.advance(tokens, self._handed)
        self._handed = None
        rewards = (-self.task.beta * kl).astype(np.float32)
        info = vector_info(episodes.info(episodes.rows))
        if len(done_rows):
            episodes.finish(done_rows, scores, rewards)
            info["score"] = np.zeros(self.num_envs, dtype=np.float32)
            info["score"][done_rows] = scores
            info["_score"] = done
            info["final_obs"] = episodes.obs.copy()
            info["_final_obs"] = done
            episodes.start(done_rows, self.np_random.integers(len(self.task.prompts), size=len(done_rows)))
        return episodes.obs.copy(), rewards, done, np.zeros(self.num_envs, dtype=bool), info
