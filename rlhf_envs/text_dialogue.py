"""TextDialogue: multi-turn text episodes. Each step is one policy turn; the env replies between turns."""

from __future__ import annotations

from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from rlhf_envs.dialogue_games import ArithmeticChecker, CalculatorGame, GuessNumberGame
from rlhf_envs.dialogue_reference import ReferenceKV, ref_turn_logprobs
from rlhf_envs.text_bandit import check_handed, handed_logprobs
from rlhf_envs.text_common import TextTask, context_length, object_array, vector_info
from rlhf_envs.validation import check_number

__all__ = ["GAMES", "TextDialogueEnv", "TextDialogueVectorEnv"]

GAMES: dict[str, tuple[type, Any]] = {"guess": (GuessNumberGame, None), "calc": (CalculatorGame, ArithmeticChecker)}
"""Built-in games: name -> (game class, its default final-score reward model class or None)."""

_TURN_DEFAULTS = {"max_turns": 8, "max_turn_tokens": 24, "max_context_tokens": 128}
"""Limits for a game that does not set its own (``max_turns``, ... as class attributes)."""


def _zero_score(prompts: list, responses: list) -> np.ndarray:
    return np.zeros(len(responses), dtype=np.float32)


def _resolve_game(game: Any, game_kwargs: dict | None) -> tuple[Callable[[], Any], Any]:
    """``(factory, probe)``: a zero-argument callable making one game per env, and one instance to read limits from."""
    if isinstance(game, str):
        if game not in GAMES:
            raise ValueError(f"unknown game {game!r}; built in: {sorted(GAMES)}, or pass a factory returning an object "
                             "with reset(rng) -> str and reply(text) -> (reply, reward, terminated)")
        cls = GAMES[game][0]
        factory = lambda: cls(**(game_kwargs or {}))  # noqa: E731
    elif callable(game):
        factory = (lambda: game(**game_kwargs)) if game_kwargs else game
    else:
        raise TypeError(f"game must be a built-in name {sorted(GAMES)} or a factory (a class or callable), "
                        f"got {type(game).__name__}")
    probe = factory()
    for method in ("reset", "reply"):
        if not callable(getattr(probe, method, None)):
            raise TypeError(f"game {type(probe).__name__} has no {method}(); a game needs reset(rng) -> str and "
                            "reply(text) -> (reply, reward, terminated[, truncated])")
    return factory, probe


class _Dialogues:
    """``N`` dialogues stepped as one batch: contexts, policy-token masks, games, and the reference's KL.

    Contexts live left-aligned in ``buf [N, C]`` (``length`` tokens each) with ``wrote [N, C]`` True on
    the policy's tokens; :meth:`observations` left-pads them to the observation layout.
    """

    def __init__(self, num_envs: int, game: Any, game_kwargs: dict | None, model: Any, reward_model: Any,
                 max_turns: int | None, max_turn_tokens: int | None, max_context_tokens: int | None,
                 **task_kwargs: Any):
        self.factory, probe = _resolve_game(game, game_kwargs)
        limits = {name: check_number(value, name, int, optional=True) for name, value in
                  (("max_turns", max_turns), ("max_turn_tokens", max_turn_tokens),
                   ("max_context_tokens", max_context_tokens))}
        for name, value in limits.items():
            limits[name] = value if value is not None else getattr(probe, name, _TURN_DEFAULTS[name])
            if limits[name] < 1:
                raise ValueError(f"{name} must be >= 1, got {limits[name]!r}")
        self.max_turns, self.max_turn_tokens, self.max_context_tokens = (
            limits["max_turns"], limits["max_turn_tokens"], limits["max_context_tokens"])
        if model is None:
            model = str(probe.model_dir) if getattr(probe, "model_dir", None) is not None else None
        if reward_model is None:
            default = GAMES[game][1] if isinstance(game, str) else None
            reward_model = default() if default is not None else _zero_score
        opening = probe.reset(np.random.default_rng(0))
        # TextTask's checks then hold for every context: the reference's positions cover max_context_tokens
        room = self.max_context_tokens - self.max_turn_tokens
        if room < 1:
            raise ValueError(f"max_context_tokens={self.max_context_tokens} leaves no room before a turn of "
                             f"max_turn_tokens={self.max_turn_tokens}; raise max_context_tokens")
        self.task = TextTask(model, reward_model, [opening], max_prompt_tokens=None,
                             max_new_tokens=self.max_turn_tokens, **task_kwargs)
        context = context_length(self.task.ref_model)
        if context is not None and self.max_context_tokens > context:
            raise ValueError(f"max_context_tokens={self.max_context_tokens} exceeds the model's context of {context} "
                             "tokens; lower max_context_tokens")
        self.n = num_envs
        self.games = [self.factory() for _ in range(num_envs)]
        self.buf = np.full((num_envs, self.max_context_tokens), self.task.pad_token_id, dtype=np.int64)
        self.wrote = np.zeros((num_envs, self.max_context_tokens), dtype=bool)
        self.length = np.zeros(num_envs, dtype=np.int64)
        self.turn = np.zeros(num_envs, dtype=np.int64)
        self.openings: list[str] = [""] * num_envs
        self._encoded: dict[str, list[int]] = {}
        self._decoded: dict[tuple[int, ...], str] = {}
        self.reference_kv = ReferenceKV.make(self.task, num_envs, self.max_context_tokens)

    def encode(self, text: str) -> list[int]:
        """Token ids of the env's ``text`` (no special tokens added), cached."""
        ids = self._encoded.get(text)
        if ids is None:
            ids = self.task.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            if len(self._encoded) < 65536:
                self._encoded[text] = ids
        return ids

    def decode(self, turn_ids: np.ndarray, n_tokens: np.ndarray) -> list[str]:
        """Text of each turn ``turn_ids[i, :n_tokens[i]]`` (turn-end marker dropped); games repeat turns, so texts are
        cached by token ids and only new turns go through the tokenizer (one batched call)."""
        keys = [tuple(row[:k].tolist()) for row, k in zip(turn_ids, n_tokens)]
        missing = sorted({key for key in keys if key not in self._decoded}, key=keys.index)
        if missing:
            width = self.max_turn_tokens
            ids = torch.full((len(missing), width), self.task.pad_token_id, dtype=torch.long)
            for j, key in enumerate(missing):
                ids[j, :len(key)] = torch.as_tensor(key)
            mask = torch.arange(width)[None, :] < torch.tensor([len(key) for key in missing])[:, None]
            if len(self._decoded) > 65536:
                self._decoded.clear()
            self._decoded.update(zip(missing, self.task.decode(ids, mask)))
        return [self._decoded[key] for key in keys]

    def start(self, rows: np.ndarray, rng: np.random.Generator, group_size: int = 1) -> None:
        """New episodes on ``rows``: each game's opening becomes the context. With ``group_size`` > 1, each block
        of ``group_size`` consecutive rows plays the same episode (its games reset from one shared seed)."""
        room = self.max_context_tokens - self.max_turn_tokens
        seeds = rng.integers(2**63 - 1, size=-(-len(rows) // group_size)) if group_size > 1 else None
        for j, i in enumerate(rows):
            text = self.games[i].reset(rng if seeds is None else np.random.default_rng(seeds[j // group_size]))
            if not isinstance(text, str):
                raise TypeError(f"game reset() must return the opening text (str), got {type(text).__name__}")
            ids = self.encode(text)
            if not 1 <= len(ids) <= room:
                raise ValueError(f"the game's opening {text[:40]!r} is {len(ids)} tokens; it must be 1..{room} "
                                 f"(max_context_tokens - max_turn_tokens); raise max_context_tokens")
            self.buf[i] = self.task.pad_token_id
            self.buf[i, :len(ids)] = ids
            self.wrote[i] = False
            if self.reference_kv is not None:
                self.reference_kv.cached[i] = 0
            self.length[i], self.turn[i] = len(ids), 0
            self.openings[i] = text

    def observations(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(obs [R, C], policy_mask [R, C])`` of ``rows`` (all by default): contexts left-padded."""
        rows = np.arange(self.n) if rows is None else rows
        width = self.max_context_tokens
        source = np.arange(width)[None, :] - (width - self.length[rows])[:, None]
        inside = source >= 0
        source = source.clip(0)
        obs = np.where(inside, self.buf[rows[:, None], source], self.task.pad_token_id)
        return obs, inside & self.wrote[rows[:, None], source]

    def step(self, tokens: np.ndarray, handed: tuple[torch.Tensor, torch.Tensor | None] | None) -> dict[str, Any]:
        """Play one turn on every row (``tokens [N, T]``, checked): the turn's KL against the reference, the
        games' replies, rewards.

        Returns arrays over rows: ``reward``, ``terminated``, ``truncated`` and the info entries.
        """
        task, width = self.task, self.max_turn_tokens
        ids = torch.as_tensor(tokens, device=task.device)
        mask = task.response_mask(ids)
        ids = ids.masked_fill(~mask, task.pad_token_id)
        logprobs, full = handed_logprobs(task, ids, mask, handed, "turn")
        n_tokens = mask.sum(-1).cpu().numpy()
        turn_ids = ids.cpu().numpy()
        # the turn goes into the buffer right after each context; `length` (what counts) moves only below
        inside = np.arange(width)[None, :] < n_tokens[:, None]
        rows, cols = np.nonzero(inside)[0], (self.length[:, None] + np.arange(width)[None, :])[inside]
        self.buf[rows, cols], self.wrote[rows, cols] = turn_ids[inside], True
        if self.reference_kv is not None:
            ref, ref_full = self.reference_kv.logprobs(task, self.buf, self.length, ids, mask, full is not None)
        else:
            obs, _ = self.observations()
            context = torch.as_tensor(obs, device=task.device)
            context_mask = torch.as_tensor(np.arange(obs.shape[1])[None, :] >= obs.shape[1] - self.length[:, None],
                                           device=task.device)
            ref, ref_full = ref_turn_logprobs(task, context, context_mask, ids, mask, full is not None)
        kl_per_token = task.kl_per_token(logprobs, ref, mask, full, ref_full)
        kl = kl_per_token.sum(-1).cpu().numpy().astype(np.float32)
        texts = self.decode(turn_ids, n_tokens)
        turn_reward = np.zeros(self.n, dtype=np.float32)
        terminated, cut = np.zeros(self.n, dtype=bool), np.zeros(self.n, dtype=bool)
        replies = []
        for i in range(self.n):
            out = self.games[i].reply(texts[i])
            turn_reward[i], terminated[i] = float(out[1]), bool(out[2])
            reply_ids = self.encode(out[0])
            start = self.length[i] + n_tokens[i]
            kept = min(len(reply_ids), self.max_context_tokens - start)
            self.buf[i, start:start + kept], self.wrote[i, start:start + kept] = reply_ids[:kept], False
            self.length[i] = start + kept
            cut[i] = (len(out) > 3 and bool(out[3])) or kept < len(reply_ids)
            replies.append(out[0])
        self.turn += 1
        # out of turns, out of room for the whole reply or for a whole next turn: a time limit, not an end
        no_room = self.length + width > self.max_context_tokens
        truncated = ~terminated & (cut | (self.turn >= self.max_turns) | no_room)
        score = np.zeros(self.n, dtype=np.float32)
        if terminated.any():
            done = np.flatnonzero(terminated)
            score[done] = task.reward_model.score([self.openings[i] for i in done], [texts[i] for i in done])
        beta = task.beta
        task.kl_controller.update(float(kl.mean()), self.n)
        if self.reference_kv is not None:
            self.reference_kv.commit()
        obs, policy_mask = self.observations()
        return {
            "obs": obs, "reward": (turn_reward + score - beta * kl).astype(np.float32),
            "terminated": terminated, "truncated": truncated,
            "info": {"turn": self.turn.copy(), "turn_reward": turn_reward, "score": score, "kl": kl,
                     "kl_per_token": kl_per_token.cpu().numpy().astype(np.float32),
                     "logprobs": logprobs.cpu().numpy().astype(np.float32),
                     "ref_logprobs": ref.cpu().numpy().astype(np.float32),
                     "beta": np.full(self.n, beta, dtype=np.float32), "policy_mask": policy_mask,
                     "turn_text": object_array(texts), "reply": object_array(replies),
                     "prompt": object_array(list(self.openings))},
        }


_DOC_ARGS = """
    ## Arguments
    - ``game``: ``"guess"`` (:class:`rlhf_envs.dialogue_games.GuessNumberGame`), ``"calc"``
      (:class:`rlhf_envs.dialogue_games.CalculatorGame`) or a factory returning an object with
      ``reset(rng) -> str`` and ``reply(text) -> (reply, reward, terminated[, truncated])``;
      ``game_kwargs`` go to it (e.g. ``{"tool": False}``).
    - ``model``: the frozen reference; ``None`` = the game's committed task model (``rlhf_envs/assets/dialogue_*``),
      or the embedded default for a game without one; a directory or a ``(model, tokenizer)`` pair.
    - ``reward_model``: the final score on ``(opening, last turn's text)`` when an episode terminates; ``None`` =
      the game's checker (``calc``: :class:`rlhf_envs.dialogue_games.ArithmeticChecker`) or 0.
    - ``max_turns``, ``max_turn_tokens`` (``T``), ``max_context_tokens`` (``C``): the game's own by default.
    - ``beta``, ``kl_estimator``, ``kl_setpoint``, ``kl_horizon``, ``temperature``, ``top_k``, ``top_p``,
      ``device``, ``reward_kwargs``, ``reward_timeout_s``: as in TextBandit.
"""


class TextDialogueEnv(gym.Env):
    """A multi-turn conversation: the policy speaks a whole turn, the env (a game) replies, until the episode ends.

    ## Action Space
    ``MultiDiscrete([V] * T)``: one turn's token ids. The turn runs up to and including the first
    turn-end marker (the tokenizer's EOS, ``<eot>`` in the task models); write padding after it. A turn
    without one runs all ``T`` tokens. Bad shapes, dtypes or ids raise ``gymnasium.error.InvalidAction``.

    ## Observation Space
    ``Box(0, V - 1, (C,), int64)``: the whole context so far (opening, the policy's turns, the env's
    replies), **left-padded** with the pad id as in TextBandit. ``info["policy_mask"] [C]`` is True on
    exactly the tokens the policy wrote; the rest are the env's.

    ## Rewards
    Per step ``turn_reward + score - beta * sum_t kl_t``: ``turn_reward`` from the game (guess: ``-0.1``
    per turn, ``+1`` for the right number), ``score`` the reward model's final score on the episode's last
    turn (only on the step that terminates it), ``kl_t`` the KL estimator on **this turn's tokens only**
    (env tokens are context, never in the KL). The KL mechanism is TextBandit's: hand the turn's
    log-probs over with ``env.unwrapped.set_policy_logprobs(logprobs [T], full_logprobs [T, V] = None)``
    before ``step``; without them the KL is that of a uniform policy (with a warning).

    ## Starting State
    The game's opening (``reset(rng)`` with ``self.np_random``), e.g. ``?`` for guess, ``37*52=`` for calc.

    ## Episode End
    ``terminated`` when the game says so (guess: the right number; calc: an answer). ``truncated`` after
    ``max_turns`` turns, or when the context is full: the env's reply does not fit, or what is left
    is less than a whole turn (``C - length < T``); the reply is cut to fit, the context never overflows.
    """ + _DOC_ARGS + """
    ## Info
    ``turn`` (turns taken), ``policy_mask [C]``, ``turn_reward``, ``score``, ``kl``, ``kl_per_token [T]``,
    ``logprobs [T]``, ``ref_logprobs [T]``, ``beta``, ``turn_text``, ``reply`` and ``prompt`` (the opening).

    ## Version History
    - v0: initial version.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(self, game: Any = "guess", game_kwargs: dict | None = None, model: Any = None,
                 reward_model: Any = None, max_turns: int | None = None, max_turn_tokens: int | None = None,
                 max_context_tokens: int | None = None, render_mode: str | None = None, **task_kwargs: Any):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        self.render_mode = render_mode
        self.dialogues = _Dialogues(1, game, game_kwargs, model, reward_model, max_turns, max_turn_tokens,
                                    max_context_tokens, **task_kwargs)
        self.task = self.dialogues.task
        d = self.dialogues
        self.observation_space = spaces.Box(0, self.task.vocab_size - 1, (d.max_context_tokens,), np.int64)
        self.action_space = spaces.MultiDiscrete([self.task.vocab_size] * d.max_turn_tokens)
        self._handed: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._running = False

    def set_policy_logprobs(self, logprobs: Any, full_logprobs: Any = None) -> None:
        """Hand over the policy's log-probs of the next turn: ``[T]`` and optionally ``[T, V]``."""
        self._handed = check_handed(self.task, logprobs, full_logprobs, ())

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.dialogues.start(np.array([0]), self.np_random)
        self._handed, self._running = None, True
        obs, mask = self.dialogues.observations()
        return obs[0], {"turn": 0, "policy_mask": mask[0], "prompt": self.dialogues.openings[0]}

    def step(self, action):
        if not self._running:
            raise ResetNeeded("the dialogue is over (or never started): call reset() before step()")
        handed = None if self._handed is None else tuple(None if h is None else h[None] for h in self._handed)
        tokens = self.task.check_tokens(action, (self.dialogues.max_turn_tokens,), "action")[None]
        out = self.dialogues.step(tokens, handed)
        self._handed = None
        terminated, truncated = bool(out["terminated"][0]), bool(out["truncated"][0])
        self._running = not (terminated or truncated)
        info = {key: value[0] for key, value in out["info"].items()}
        return out["obs"][0], float(out["reward"][0]), terminated, truncated, info

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        d = self.dialogues
        return self.task.tokenizer.decode(d.buf[0, :d.length[0]].tolist()) + "\n"


class TextDialogueVectorEnv(VectorEnv):
    """``num_envs`` TextDialogue episodes stepped as one batch: one reference forward, one batched reward call.

    Created by ``gym.make_vec("TextDialogue-v0", num_envs=N)``; same arguments as :class:`TextDialogueEnv`.
    Actions ``[N, T]``; ``envs.set_policy_logprobs(logprobs [N, T], full_logprobs [N, T, V] = None)``.
    ``group_size`` > 1 (dividing ``num_envs``): at ``reset``, each block of ``group_size`` consecutive envs plays
    the same episode (same secret, same problem), the groups of GRPO/RLOO; autoreset rows start independent ones.
    Autoreset ``SAME_STEP``: a row whose episode ended comes back with its next opening; its last context is in
    ``info["final_obs"]`` and its policy mask in ``info["final_policy_mask"]`` (``info["policy_mask"]`` is
    aligned with the returned observations). The step's figures are arrays over envs directly in ``info``.
    """

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, num_envs: int = 1, render_mode: str | None = None, game: Any = "guess",
                 game_kwargs: dict | None = None, model: Any = None, reward_model: Any = None,
                 max_turns: int | None = None, max_turn_tokens: int | None = None,
                 max_context_tokens: int | None = None, group_size: int = 1, **task_kwargs: Any):
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        group_size = check_number(group_size, "group_size", int)
        if group_size < 1 or num_envs % group_size:
            raise ValueError(f"group_size must be a positive divisor of num_envs={num_envs}, got {group_size!r}")
        self.group_size = group_size
        if render_mode is not None:
            raise ValueError("the vector TextDialogue does not render; "
                             "use gym.make('TextDialogue-v0', render_mode='ansi')")
        self.num_envs = int(num_envs)
        self.dialogues = _Dialogues(self.num_envs, game, game_kwargs, model, reward_model, max_turns, max_turn_tokens,
                                    max_context_tokens, **task_kwargs)
        self.task = self.dialogues.task
        self.render_mode = None
        d = self.dialogues
        self.single_observation_space = spaces.Box(0, self.task.vocab_size - 1, (d.max_context_tokens,), np.int64)
        self.single_action_space = spaces.MultiDiscrete([self.task.vocab_size] * d.max_turn_tokens)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._handed: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._running = False

    def set_policy_logprobs(self, logprobs: Any, full_logprobs: Any = None) -> None:
        """Hand over the policy's log-probs of the next turns: ``[N, T]`` and optionally ``[N, T, V]``."""
        self._handed = check_handed(self.task, logprobs, full_logprobs, (self.num_envs,))

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        if isinstance(seed, (list, tuple)):
            seed = seed[0]
        super().reset(seed=seed)
        self.dialogues.start(np.arange(self.num_envs), self.np_random, self.group_size)
        self._handed, self._running = None, True
        obs, mask = self.dialogues.observations()
        return obs, vector_info({"turn": self.dialogues.turn.copy(), "policy_mask": mask,
                                 "prompt": object_array(list(self.dialogues.openings))})

    def step(self, actions):
        if not self._running:
            raise ResetNeeded("call reset() before step()")
        tokens = self.task.check_tokens(actions, (self.num_envs, self.dialogues.max_turn_tokens), "actions")
        out = self.dialogues.step(tokens, self._handed)
        self._handed = None
        info, obs = out["info"], out["obs"]
        done = np.flatnonzero(out["terminated"] | out["truncated"])
        info["final_obs"], info["final_policy_mask"] = obs.copy(), info["policy_mask"].copy()
        if len(done):
            self.dialogues.start(done, self.np_random)
            obs[done], info["policy_mask"][done] = self.dialogues.observations(done)
        return obs, out["reward"], out["terminated"], out["truncated"], vector_info(info)
