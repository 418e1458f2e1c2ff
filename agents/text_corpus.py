"""``rlhf pipeline --corpus FILE...``: a user's own plain text as the whole recipe's data.

The pipeline pretrains a base model on the text (:mod:`agents.pretrain`), then cuts
demonstrations and prompts out of the same text:

1. **Passages.** The text is cut into passages exactly as pretraining cuts it
   (:func:`agents.pretrain.corpus_passages`: blocks between blank lines, a speech or a paragraph,
   longer ones cut at line ends into pieces of at most 400 characters).
2. **Examples.** A passage of at least :data:`MIN_WORDS` words gives one example. Its prompt is
   the passage's first k words as written, line breaks included (``"First Citizen:\\nBefore we
   proceed"``), with k drawn uniformly from :data:`PROMPT_WORDS` by the seed and leaving at least
   two words; its completion is the whitespace after the prompt and the next words, at most
   :data:`COMPLETION_WORDS` of them (about 20 tokens, within the 24-token response limit), ending
   at the passage's end.
3. **Splits.** The examples are shuffled with the seed and dealt out in two halves: the first
   gives the SFT demonstrations, the second the prompts (their prompt text alone), which the
   pipeline deals out, each distinct prompt once, to preferences, PPO, validation and the
   evaluation (:func:`agents.pipeline._prompt_splits`). A demonstration whose prompt is also a
   validation or evaluation prompt is dropped, so no stage trains on a held-out prompt.

Pretraining reads every passage (the held-out ones of its own loss excepted), prompts' passages
included: it learns the language, the later stages learn the task on their own splits.

Settings. ``--corpus`` replaces the fields still at their embedded-model defaults by
:data:`CORPUS_RECIPE`: the values that worked on tinyshakespeare (``benchmarks/bench_corpus.py``);
``--no-corpus-recipe`` keeps every value as given.
"""

from __future__ import annotations

import functools
import re
from dataclasses import fields
from typing import Callable

import numpy as np

MIN_WORDS = 6
PROMPT_WORDS = (4, 8)
COMPLETION_WORDS = 14
MAX_CHARS = 400

CORPUS_RECIPE: dict[str, object] = {
    "n_demonstrations": 2000,
    "sft_epochs": 2,
    "n_preference_prompts": 1600,
    "rm_epochs": 4,
    "rm_learning_rate": 1e-3,
    "ppo_episodes": 2048,
    "kl_horizon": 500.0,
    "dpo_epochs": 4,
}
"""Values that worked on a small model pretrained on tinyshakespeare, where they differ from the embedded
model's. A new base model's SFT needs two epochs; the reward model 4 epochs at 1e-3 (at 2 epochs of 5e-4 its
held-out accuracy stayed near 0.56, and PPO exploited a proxy near chance: gold win rate 0.46 against SFT,
0.74 with these); PPO reaches the KL budget in 2,048 episodes with the controller's horizon at 500. With 1,200
preference prompts the reward model reached 0.635 held out; 1,600 give it a third more rankings, the cheapest
lever (sampling and ranking them and training the reward model took 32 s of that run's 388)."""


def apply_corpus_recipe(config) -> list[str]:
    """Set every field of :data:`CORPUS_RECIPE` that ``config`` still holds at its default; returns their names."""
    defaults = {f.name: f.default for f in fields(config)}
    changed = [name for name, value in CORPUS_RECIPE.items() if getattr(config, name) == defaults[name]]
    for name in changed:
        setattr(config, name, CORPUS_RECIPE[name])
    return changed


def cut_examples(passages: list[str], seed: int) -> list[dict[str, str]]:
    """``{prompt, completion}`` per passage of at least :data:`MIN_WORDS` words (see the module docstring)."""
    rng = np.random.default_rng(seed)
    examples = []
    for passage in passages:
        words = list(re.finditer(r"\S+", passage))
        if len(words) < MIN_WORDS:
            continue
        k = int(rng.integers(PROMPT_WORDS[0], min(PROMPT_WORDS[1], len(words) - 2) + 1))
        last = words[min(len(words), k + COMPLETION_WORDS) - 1]
        examples.append({"prompt": passage[:words[k - 1].end()], "completion": passage[words[k - 1].end():last.end()]})
    return examples


def corpus_examples(paths: list[str], seed: int) -> tuple[list[dict[str, str]], list[str]]:
    """Demonstrations and prompts of the corpus: the two seeded halves of its examples (cached: the pipeline
    asks for them in its checks, its splits and its SFT stage)."""
    return _examples(tuple(str(p) for p in paths), seed)


@functools.lru_cache(maxsize=4)
def _examples(paths: tuple[str, ...], seed: int) -> tuple[list[dict[str, str]], list[str]]:
    from agents.pretrain import corpus_passages

    examples = cut_examples(corpus_passages(list(paths), MAX_CHARS), seed)
    order = np.random.default_rng(seed + 1).permutation(len(examples))
    half = len(examples) // 2
    return [examples[i] for i in order[:half]], [examples[i]["prompt"] for i in order[half:]]


def check_corpus(config, prompt_splits: Callable) -> None:
    """Validate a :class:`agents.pipeline.PipelineConfig` with ``corpus_paths``, before anything is written: the
    files (text, not empty, not binary), the recipe's settings, and a corpus big enough for the splits asked for.

    ``prompt_splits(config)`` is the pipeline's split of the prompts (preferences, PPO, validation, evaluation).
    """
    from agents.pretrain import PretrainConfig

    if isinstance(config.corpus_paths, str) or not config.corpus_paths:
        raise TypeError(f"PipelineConfig.corpus_paths must be a non-empty list of files, got {config.corpus_paths!r}")
    if config.demonstrations_path is not None or config.prompts_path is not None:
        raise ValueError("corpus_paths derives the demonstrations and prompts from the text: drop demonstrations_path "
                         "and prompts_path, or corpus_paths")
    config.corpus_paths = [str(p) for p in config.corpus_paths]
    if config.corpus_recipe:
        apply_corpus_recipe(config)
    # a missing, empty, binary or non-UTF-8 file fails here, and so do bad pretraining settings
    PretrainConfig(corpus_paths=config.corpus_paths, model_path=config.model_path, size=config.pretrain_size,
                   max_steps=config.pretrain_steps)
    demonstrations, prompts = corpus_examples(config.corpus_paths, config.seed)
    n_examples = len(demonstrations) + len(prompts)
    try:
        pref, _, validation, evaluation = prompt_splits(config)
    except ValueError as err:
        raise ValueError(f"the corpus {config.corpus_paths} gives {n_examples} examples (passages of >= {MIN_WORDS} "
                         f"words), {len(prompts)} of them prompts: {err}") from err
    held_out = set(validation) | set(evaluation)
    n_demos = sum(d["prompt"] not in held_out for d in demonstrations)
    short = []
    if n_demos < config.n_demonstrations:
        short.append(f"{n_demos} demonstrations for n_demonstrations={config.n_demonstrations}")
    if len(evaluation) < config.n_eval_prompts:
        short.append(f"{len(evaluation)} evaluation prompts for n_eval_prompts={config.n_eval_prompts} (the evaluation "
                     "takes at most a quarter of the distinct prompts)")
    if len(pref) < config.n_preference_prompts:
        short.append(f"{len(pref)} preference prompts for n_preference_prompts={config.n_preference_prompts}")
    if short:
        raise ValueError(f"the corpus {config.corpus_paths} is too small for the splits asked for: its {n_examples} "
                         f"examples (passages of >= {MIN_WORDS} words, half demonstrations, half prompts) give "
                         f"{'; '.join(short)}. Give more text, or lower those settings")
