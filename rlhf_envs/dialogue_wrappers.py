"""TextDialogue for your own agent loop and your own game: a string-in/string-out view, and a game adapter.

:class:`DialogueStrings` turns ``TextDialogue-v0`` (token ids) into a plain-text Gymnasium env::

    env = DialogueStrings(gym.make("TextDialogue-v0"))
    text, info = env.reset(seed=0)            # "?" (the opening)
    reply, reward, terminated, truncated, info = env.step("8")   # "higher"; info["context"]: the whole dialogue

:func:`register_dialogue_env` makes a registered env (single and natively batched) from a class with
``reset()`` and ``step(text)``::

    class Echo:
        def reset(self, seed=None): return "say hi"
        def step(self, text): return ("hi back", 1.0, True) if "hi" in text else ("again", 0.0, False)

    register_dialogue_env("Echo-v0", Echo)     # then gym.make("Echo-v0") / gym.make_vec("Echo-v0", num_envs=64)
"""

from __future__ import annotations

import inspect
import string
from typing import Any, Callable

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.registration import register

__all__ = ["DialogueStrings", "UserGame", "register_dialogue_env"]


class DialogueStrings(gym.Wrapper):
    """A string view of a TextDialogue env: observations are the env's latest message, actions the policy's turn text.

    ``step(text)`` encodes ``text`` (no special tokens), appends the turn-end marker and pads to the turn
    length; a text longer than ``max_turn_tokens - 1`` tokens raises ``ValueError``. ``info["context"]`` is
    the whole dialogue so far as text. Log-probs are still handed over through
    ``env.unwrapped.set_policy_logprobs`` for the KL; a loop that has none should use ``beta=0``.
    """

    def __init__(self, env: gym.Env, max_length: int = 4096):
        super().__init__(env)
        charset = string.printable
        self.observation_space = spaces.Text(max_length, min_length=0, charset=charset)
        self.action_space = spaces.Text(max_length, min_length=0, charset=charset)
        self._tokenizer = env.unwrapped.task.tokenizer

    def _context(self, obs: np.ndarray) -> str:
        task = self.env.unwrapped.task
        real = np.cumsum(obs != task.pad_token_id) > 0
        return self._tokenizer.decode(obs[real].tolist(), skip_special_tokens=True)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        return info["prompt"], {**info, "context": self._context(obs)}

    def step(self, action: str):
        task, d = self.env.unwrapped.task, self.env.unwrapped.dialogues
        if not isinstance(action, str):
            raise TypeError(f"DialogueStrings.step takes the turn as a str, got {type(action).__name__}")
        ids = self._tokenizer(action, add_special_tokens=False)["input_ids"] if action else []
        if len(ids) > d.max_turn_tokens - 1:
            raise ValueError(f"the turn {action[:40]!r} is {len(ids)} tokens; at most max_turn_tokens - 1 = "
                             f"{d.max_turn_tokens - 1} fit before the turn-end marker; shorten it or raise "
                             "max_turn_tokens")
        tokens = np.full(d.max_turn_tokens, task.pad_token_id, dtype=np.int64)
        tokens[:len(ids) + 1] = [*ids, task.eos_token_id]
        obs, reward, terminated, truncated, info = self.env.step(tokens)
        return str(info["reply"]), reward, terminated, truncated, {**info, "context": self._context(obs)}


class UserGame:
    """Adapts a user's object with ``reset(seed=None) -> str`` (or ``(str, info)``) and ``step(text)`` returning
    ``(reply, reward, done)``, ``(reply, reward, terminated, truncated)`` or Gymnasium's 5-tuple, to the game
    interface of :mod:`rlhf_envs.dialogue_games` (``reset(rng)``, ``reply(text)``)."""

    def __init__(self, inner: Any):
        for method in ("reset", "step"):
            if not callable(getattr(inner, method, None)):
                raise TypeError(f"{type(inner).__name__} has no {method}(); a user game needs reset() -> str and "
                                "step(text) -> (reply, reward, done)")
        self.inner = inner
        self._seeded = "seed" in inspect.signature(inner.reset).parameters

    @classmethod
    def factory(cls, user_class: Callable[..., Any], **kwargs: Any) -> Callable[[], UserGame]:
        """A zero-argument callable making ``UserGame(user_class(**kwargs))``, one per env."""
        return _Factory(cls, user_class, kwargs)

    def reset(self, rng: np.random.Generator) -> str:
        out = self.inner.reset(seed=int(rng.integers(2**31 - 1))) if self._seeded else self.inner.reset()
        text = out[0] if isinstance(out, tuple) else out
        if not isinstance(text, str):
            raise TypeError(f"{type(self.inner).__name__}.reset() must return the opening text, "
                            f"got {type(text).__name__}")
        return text

    def reply(self, text: str) -> tuple[str, float, bool, bool]:
        out = self.inner.step(text)
        if not isinstance(out, tuple) or len(out) not in (3, 4, 5):
            raise TypeError(f"{type(self.inner).__name__}.step(text) must return (reply, reward, done), "
                            f"(reply, reward, terminated, truncated) or a Gymnasium 5-tuple, got {out!r:.80}")
        reply, reward = out[0], out[1]
        if not isinstance(reply, str):
            raise TypeError(f"{type(self.inner).__name__}.step(text) must reply with a str, got {type(reply).__name__}")
        truncated = len(out) > 3 and not isinstance(out[3], dict) and bool(out[3])
        return reply, float(reward), bool(out[2]), truncated


class _Factory:
    """``UserGame(user_class(**kwargs))`` on call; a plain object so that registered kwargs deep-copy and pickle."""

    def __init__(self, adapter: type, user_class: Callable[..., Any], kwargs: dict):
        self.adapter, self.user_class, self.kwargs = adapter, user_class, kwargs

    def __call__(self) -> UserGame:
        return self.adapter(self.user_class(**self.kwargs))


def register_dialogue_env(env_id: str, user_class: Callable[..., Any], *, game_kwargs: dict | None = None,
                          **env_kwargs: Any) -> None:
    """Register ``env_id`` as a TextDialogue env (``gym.make`` and the batched ``gym.make_vec``) over ``user_class``.

    ``game_kwargs`` go to ``user_class`` (one instance per env); ``env_kwargs`` to
    :class:`rlhf_envs.text_dialogue.TextDialogueEnv` (``model``: the embedded default unless given,
    ``max_turns``, ``max_turn_tokens``, ``max_context_tokens``, ``reward_model``, ``beta``, ...).
    """
    if not callable(user_class):
        raise TypeError(f"user_class must be a class (or factory) with reset() and step(text), got {user_class!r}")
    register(id=env_id, entry_point="rlhf_envs.text_dialogue:TextDialogueEnv",
             vector_entry_point="rlhf_envs.text_dialogue:TextDialogueVectorEnv",
             kwargs={"game": UserGame.factory(user_class, **(game_kwargs or {})), **env_kwargs})
