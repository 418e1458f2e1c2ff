"""Reward models are plugins behind one batched interface.

A reward model is anything with ``score(prompts: list[str], responses: list[str]) -> np.ndarray``
(float32, shape ``[B]``), or a plain callable with that signature. Sources, in lookup order:

1. the built-ins: ``sentiment`` (VADER compound score of the response, in [-1, 1]),
   ``learned`` (``path=`` a Hugging Face sequence-classification checkpoint with one label) and
   ``verifier`` (an exact checker: 1 for a right answer, 0 otherwise, plus an optional format reward;
   :class:`VerifierReward`, by default :mod:`rlhf_envs.text_arithmetic`'s);
2. factories added with :func:`register`;
3. the entry point group ``rlhf_envs.reward_models`` of installed distributions: each entry point
   loads to a factory. They are read lazily, at the first lookup of an unknown name; a plugin
   whose import fails breaks nothing else, and asking for it by name is an error saying it failed
   to load, and why.

A factory is called with the keyword arguments of :func:`make_reward_model` and returns an object
with ``.score`` or a scoring callable. :func:`make_reward_model` wraps the result in
:class:`ValidatedRewardModel`, which turns an exception, a NaN/inf or a wrong shape into a
:class:`RewardModelError` naming the plugin.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import os
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "ENTRY_POINT_GROUP",
    "LearnedReward",
    "RewardModel",
    "RewardModelError",
    "SentimentReward",
    "ValidatedRewardModel",
    "VerifierReward",
    "available_reward_models",
    "make_reward_model",
    "register",
]

ENTRY_POINT_GROUP = "rlhf_envs.reward_models"


@runtime_checkable
class RewardModel(Protocol):
    """The plugin interface."""

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """Scores ``[B]`` (float32) for ``B`` (prompt, response) pairs."""


class RewardModelError(RuntimeError):
    """A reward model failed or returned something unusable; the message names the plugin."""


class SentimentReward:
    """VADER compound sentiment of the response text, in [-1, 1] (the prompt is ignored).

    VADER is a lexicon of human-rated word valences plus rules (negation, intensifiers,
    punctuation); see the ``vaderSentiment`` package.
    """

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        polarity = self._analyzer.polarity_scores
        return np.fromiter((polarity(r)["compound"] for r in responses), dtype=np.float32, count=len(responses))


class LearnedReward:
    """A Hugging Face ``AutoModelForSequenceClassification`` checkpoint with one label.

    Scores ``logits[:, 0]`` of ``prompt + response`` (responses start with a space), normalised by the
    ``reward_normalization.json`` that ``rlhf rm`` writes beside the weights (when present), in batches of
    ``batch_size``. Loaded offline (``local_files_only``). Texts are right-padded and position ids
    come from the attention mask, so a padded row scores exactly like the same text alone; the
    model pools the last non-pad token (GPT-2 style), for which ``config.pad_token_id`` is set
    from the tokenizer when missing. A directory whose config has ``auto_map`` (model code shipped
    with it) is refused unless ``trust_remote_code=True``.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", batch_size: int = 64,
                 max_length: int | None = None,
                 normalize: bool = True, trust_remote_code: bool = False):
        import json

        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"learned reward model: {str(path)!r} is not a directory; pass path= a checkpoint saved with "
                "save_pretrained (e.g. by `rlhf rm`)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        from rlhf_envs.lm.loading import check_remote_code

        check_remote_code(path, trust_remote_code=trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"learned reward model at {str(path)!r} has num_labels={self.model.config.num_labels}; "
                "a reward model needs exactly one output (train it with num_labels=1)")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        # ``rlhf rm`` writes the mean and spread of its scores over its training responses; with
        # ``normalize`` the plugin reports (logit - mean) / std, InstructGPT's normalised reward.
        self.shift, self.scale = 0.0, 1.0
        stats_path = os.path.join(path, "reward_normalization.json")
        if normalize and os.path.isfile(stats_path):
            with open(stats_path) as f:
                stats = json.load(f)
            self.shift, self.scale = float(stats["mean"]), float(stats["std"])
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self._torch = torch

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        torch = self._torch
        texts, special = _reward_texts(self.tokenizer, prompts, responses)
        out = np.empty(len(texts), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                    truncation=self.max_length is not None, max_length=self.max_length, add_special_tokens=special,
                ).to(self.device)
                mask = batch["attention_mask"]
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = self.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions).logits
                out[start : start + len(logits)] = logits[:, 0].float().cpu().numpy()
        return (out - self.shift) / self.scale


def _reward_texts(tokenizer: Any, prompts: list, responses: list[str]) -> tuple[list[str], bool]:
    """The texts a learned reward model reads, and whether the tokenizer adds its special tokens: ``prompt +
    response`` for plain prompts, or the conversation rendered with the response as the assistant's reply (its
    template writes its own special tokens), as ``rlhf rm`` trained on them (:mod:`agents.data`)."""
    from rlhf_envs.lm.chat import chat_reward_text

    chat = [not isinstance(p, str) for p in prompts]
    if not any(chat):
        return [p + r for p, r in zip(prompts, responses)], True
    if not all(chat):
        raise ValueError("learned reward model: prompts mix plain strings and conversations in one call; give one kind")
    return [chat_reward_text(tokenizer, p, r) for p, r in zip(prompts, responses)], False


class VerifierReward:
    """An exact checker as a reward plugin: ``1`` when the response's answer is right, else ``0``, plus
    ``format_reward`` when the response is well formed.

    ``answer(prompt) -> str`` gives the reference answer, ``extract(response) -> str | None`` the
    response's answer and ``well_formed(response) -> bool`` the format check. Left ``None``, each is
    the arithmetic task's (:func:`rlhf_envs.text_arithmetic.solve`, ``extract_answer``, ``is_well_formed``);
    pass your own to check another task: ``make_reward_model("verifier", answer=..., extract=...)``.
    """

    def __init__(self, format_reward: float = 0.0, answer: Callable[[str], str] | None = None,
                 extract: Callable[[str], str | None] | None = None,
                 well_formed: Callable[[str], bool] | None = None):
        from rlhf_envs import text_arithmetic
        from rlhf_envs.validation import check_number

        self.format_reward = check_number(format_reward, "format_reward")
        self.answer = answer or text_arithmetic.solve
        self.extract = extract or text_arithmetic.extract_answer
        self.well_formed = well_formed or text_arithmetic.is_well_formed

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        scores = np.fromiter((self.extract(r) == self.answer(p) for p, r in zip(prompts, responses)),
                             dtype=np.float32, count=len(responses))
        if self.format_reward:
            scores += self.format_reward * np.fromiter(map(self.well_formed, responses), dtype=np.float32,
                                                       count=len(responses))
        return scores


class _CallableReward:
    """Adapts a plain ``f(prompts, responses) -> array`` to the plugin interface."""

    def __init__(self, fn: Callable[[list[str], list[str]], Any]):
        self.fn = fn

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        return self.fn(prompts, responses)


_BUILTINS: dict[str, Callable[..., Any]] = {"sentiment": SentimentReward, "learned": LearnedReward,
                                            "verifier": VerifierReward}
_REGISTERED: dict[str, Callable[..., Any]] = {}


def register(name: str, factory: Callable[..., Any], *, overwrite: bool = False) -> None:
    """Make ``make_reward_model(name, **kwargs)`` call ``factory(**kwargs)``.

    ``factory`` returns an object with ``.score(prompts, responses)`` or a scoring callable.
    Re-registering a name raises unless ``overwrite=True``; built-in names cannot be replaced.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward model name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory for reward model {name!r} must be callable, got {type(factory).__name__}")
    if name in _BUILTINS:
        raise ValueError(f"{name!r} is a built-in reward model; register yours under another name")
    if name in _REGISTERED and not overwrite:
        raise ValueError(f"reward model {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTERED[name] = factory


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_reward_models() -> list[str]:
    """Every known name: built-ins, registered factories and installed entry points (not loaded)."""
    return sorted(set(_BUILTINS) | set(_REGISTERED) | set(_entry_points()))


def _factory(name: str) -> Callable[..., Any]:
    if name in _BUILTINS:
        return _BUILTINS[name]
    if name in _REGISTERED:
        return _REGISTERED[name]
    entry_points = _entry_points()
    if name in entry_points:
        entry_point = entry_points[name]
        try:
            factory = entry_point.load()
        except Exception as exc:
            # asked for by name: say that it failed to load, and why, rather than that it is unknown
            raise ValueError(
                f"reward model plugin {name!r} ({entry_point.value}) failed to load: {type(exc).__name__}: {exc}; "
                "fix or reinstall the plugin, or pick another reward model") from exc
        _REGISTERED[name] = factory
        return factory
    raise ValueError(
        f"unknown reward model {name!r}; known: {available_reward_models()}. Register one with "
        f"rlhf_envs.rewards.register(name, factory) or the entry point group {ENTRY_POINT_GROUP!r}, "
        "or pass a callable f(prompts, responses)")


class ValidatedRewardModel:
    """Wraps a plugin and checks every call: ``[B]`` finite float32 scores, within ``timeout_s``.

    Failures raise :class:`RewardModelError` naming the plugin and the problem; the wrapper (and the
    env holding it) stays usable. With ``timeout_s`` the plugin runs in a worker thread and a call
    over the limit raises; the stuck call cannot be interrupted and finishes in the background.
    """

    def __init__(self, inner: RewardModel, name: str, timeout_s: float | None = None):
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds or None, got {timeout_s!r}")
        self.inner = inner
        self.name = name
        self.timeout_s = timeout_s
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1) if timeout_s is not None else None

    def __repr__(self) -> str:
        return f"ValidatedRewardModel({self.name!r})"

    def score(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """Validated scores ``[B]`` float32."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")
        try:
            if self._pool is None:
                raw = self.inner.score(list(prompts), list(responses))
            else:
                raw = self._pool.submit(self.inner.score, list(prompts), list(responses)).result(self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise RewardModelError(
                f"reward model {self.name!r} took longer than timeout_s={self.timeout_s} s for {len(prompts)} "
                "responses; raise timeout_s or make it faster") from None
        except Exception as exc:
            raise RewardModelError(f"reward model {self.name!r} raised {type(exc).__name__}: {exc}") from exc
        try:
            scores = np.asarray(raw, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise RewardModelError(
                f"reward model {self.name!r} returned {type(raw).__name__}, not numbers: {exc}") from exc
        if scores.shape != (len(prompts),):
            raise RewardModelError(
                f"reward model {self.name!r} returned shape {scores.shape} for {len(prompts)} responses; "
                f"expected one score per response, shape ({len(prompts)},)")
        bad = ~np.isfinite(scores)
        if bad.any():
            rows = np.flatnonzero(bad)[:5].tolist()
            raise RewardModelError(
                f"reward model {self.name!r} returned non-finite scores (NaN/inf) at rows {rows} "
                f"(values {scores[rows].tolist()}); scores must be finite")
        return scores


def make_reward_model(spec: str | Callable[..., Any] | RewardModel, *, timeout_s: float | None = None,
                      **kwargs: Any) -> ValidatedRewardModel:
    """A validated reward model from a registered name, a scoring callable or an object with ``.score``.

    ``kwargs`` go to the factory of a named model (e.g. ``make_reward_model("learned", path=...)``).
    """
    if isinstance(spec, ValidatedRewardModel):
        return spec if timeout_s is None else ValidatedRewardModel(spec.inner, spec.name, timeout_s)
    if isinstance(spec, str):
        inner = _factory(spec)(**kwargs)
        name = spec
    else:
        if kwargs:
            raise TypeError(f"keyword arguments {sorted(kwargs)} only apply to a reward model given by name")
        inner, name = spec, getattr(spec, "__name__", type(spec).__name__)
    if not isinstance(inner, RewardModel):
        if not callable(inner):
            raise TypeError(
                f"reward model {name!r} is a {type(inner).__name__}: expected an object with "
                ".score(prompts, responses) or a callable f(prompts, responses)")
        inner = _CallableReward(inner)
    return ValidatedRewardModel(inner, name, timeout_s)
