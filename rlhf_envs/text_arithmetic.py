"""TextArithmetic: a text bandit with an exact checker (a verifiable reward).

Problems such as ``"37+45="``, ``"402-87="`` or ``"23*7="`` (three operations, one to three digits),
split by a hash of the problem into a training and a held-out set. The response is the answer's
digits then EOS; :func:`extract_answer` reads the leading integer of the response and the
``verifier`` reward plugin (:class:`rlhf_envs.rewards.VerifierReward`) scores 1 for the right answer, 0 otherwise, plus
an optional format reward for a response that is exactly an integer.

The default model (``rlhf_envs/assets/arithmetic``) is a small GPT-2 with a character tokenizer (every
digit is one token) pretrained on the training split's ``problem=answer`` texts by
``python -m rlhf_envs.lm.build_arithmetic`` (seeded, a few minutes on one CPU thread).
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rlhf_envs.rewards import VerifierReward
from rlhf_envs.text_bandit import TextBanditEnv, TextBanditVectorEnv
from rlhf_envs.text_common import check_group_size

__all__ = ["ASSET_DIR", "OPERATIONS", "SPLITS", "TextArithmeticEnv", "TextArithmeticVectorEnv",
           "demonstrations", "extract_answer", "is_well_formed", "make_arithmetic_tokenizer", "make_problems", "solve"]

ASSET_DIR: Path = Path(__file__).resolve().parent / "assets" / "arithmetic"
BOS_EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHARACTERS = "0123456789+-*="
OPERATIONS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "+": ((1, 2), (1, 2)),
    "-": ((1, 2), (1, 2)),
    "*": ((1, 2), (1,)),
}
"""Per operation, the digit counts of the left and right operands (each drawn uniformly). A difference
is never negative (the operands are swapped when the left one is smaller)."""
SPLITS = ("train", "test")
HELD_OUT_EVERY = 5
"""A problem is held out (``split="test"``) when the CRC-32 of its text is divisible by this: 20%."""
_PROBLEM = re.compile(r"^(\d+)([+\-*])(\d+)=$")
_LEADING_INTEGER = re.compile(r"\s*(-?\d+)")
_INTEGER = re.compile(r"-?\d+")


def split_of(problem: str) -> str:
    """``"test"`` for the held-out fifth of all problems (by a stable hash of the text), else ``"train"``."""
    return "test" if zlib.crc32(problem.encode()) % HELD_OUT_EVERY == 0 else "train"


def _operand(rng: np.random.Generator, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return int(rng.integers(low, 10**digits))


def make_problems(n: int, seed: int = 0, split: str = "train") -> list[str]:
    """``n`` distinct problems of ``split`` (``"train"`` or ``"test"``), drawn with ``seed``.

    The operation is uniform over :data:`OPERATIONS`, then each operand's digit count, then the operand.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng(seed)
    problems: dict[str, None] = {}
    ops = list(OPERATIONS)
    for _ in range(50 * n + 1000):
        if len(problems) == n:
            break
        op = ops[int(rng.integers(len(ops)))]
        left_digits, right_digits = OPERATIONS[op]
        a = _operand(rng, int(rng.choice(left_digits)))
        b = _operand(rng, int(rng.choice(right_digits)))
        if op == "-" and a < b:
            a, b = b, a
        problem = f"{a}{op}{b}="
        if split_of(problem) == split:
            problems[problem] = None
    if len(problems) < n:
        raise ValueError(f"only {len(problems)} distinct {split} problems could be drawn, asked for {n}; ask for fewer")
    return list(problems)


def solve(problem: str) -> str:
    """The exact answer of ``"a<op>b="`` as text (``"-12"`` for a negative one)."""
    match = _PROBLEM.match(problem)
    if match is None:
        raise ValueError(f"{problem!r} is not an arithmetic problem 'a+b=', 'a-b=' or 'a*b='")
    a, op, b = int(match[1]), match[2], int(match[3])
    return str({"+": a + b, "-": a - b, "*": a * b}[op])


def extract_answer(response: str) -> str | None:
    """The leading integer of ``response`` (``"82"`` from ``"82"`` or ``"82-1"``), or ``None``."""
    match = _LEADING_INTEGER.match(response)
    return None if match is None else str(int(match[1]))


def is_well_formed(response: str) -> bool:
    """Whether ``response`` is exactly one integer (what the format reward pays for)."""
    return _INTEGER.fullmatch(response) is not None


def demonstrations(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` SFT records ``{"prompt", "completion"}`` of training problems with their exact answers."""
    return [{"prompt": p, "completion": solve(p)} for p in make_problems(n, seed, "train")]


def make_arithmetic_tokenizer() -> Any:
    """One token per character of :data:`CHARACTERS` (every digit alone), ``<|endoftext|>`` (id 0: BOS,
    prepended to every encoding, and EOS) and ``<|pad|>`` (id 1); left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {BOS_EOS: 0, PAD: 1, **{c: i + 2 for i, c in enumerate(CHARACTERS)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS_EOS} $A", pair=f"{BOS_EOS} $A $B",
                                                           special_tokens=[(BOS_EOS, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS_EOS, eos_token=BOS_EOS, pad_token=PAD,
                                   padding_side="left")


def _task_kwargs(split: str, n_prompts: int, prompt_seed: int, format_reward: float, prompts: Sequence[str] | None,
                 model: Any, **kwargs: Any) -> dict:
    if model is None:
        if not ASSET_DIR.is_dir():
            raise FileNotFoundError(f"the arithmetic model {ASSET_DIR} is missing: rebuild it with "
                                    "`python -m rlhf_envs.lm.build_arithmetic`")
        model = str(ASSET_DIR)
    if prompts is None:
        prompts = make_problems(n_prompts, prompt_seed, split)
    reward = VerifierReward(format_reward, solve, extract_answer, is_well_formed)
    return dict(model=model, reward_model=reward, prompts=list(prompts), **kwargs)


class TextArithmeticEnv(TextBanditEnv):
    """:class:`rlhf_envs.text_bandit.TextBanditEnv` on arithmetic problems scored by an exact checker.

    ## Action Space
    ``MultiDiscrete([16] * max_new_tokens)``: token ids of the response (``0`` is EOS, ``1`` pad,
    ``2..11`` the digits, then ``+ - * =``). The response runs up to and including the first EOS.

    ## Observation Space
    ``Box(0, 15, (max_prompt_tokens,), int64)``: BOS and the problem's characters, left-padded.

    ## Rewards
    ``score - beta * KL`` as in TextBandit, with ``score`` from the ``verifier`` plugin: 1 when the
    leading integer of the response is the exact answer, else 0, plus ``format_reward`` when the
    response is exactly one integer. ``beta`` defaults to 0 (no KL term in the reward).

    ## Starting State
    A problem drawn uniformly from ``n_prompts`` problems of ``split`` (``"train"``, or ``"test"``: the
    held-out fifth of all problems, never in the training split or the build's pretraining text).

    ## Episode End
    One step, as TextBandit.

    ## Arguments
    ``split``, ``n_prompts``, ``prompt_seed``, ``format_reward`` (above); ``prompts`` replaces the
    drawn problems; ``model`` (``None``: the committed arithmetic GPT-2), ``beta``, ``kl_estimator``,
    ``kl_setpoint``, ``max_new_tokens`` (default 6), ``temperature``, ``top_k``, ``top_p``, ``device``,
    ``skip_reference``, ``render_mode`` as in TextBandit.

    ## Info
    As TextBandit; ``score`` is the verifier's.

    ## Version History
    - v0: initial version.
    """

    def __init__(self, split: str = "train", n_prompts: int = 2000, prompt_seed: int = 0, format_reward: float = 0.0,
                 prompts: Sequence[str] | None = None, model: Any = None, beta: float = 0.0, kl_estimator: str = "k1",
                 kl_setpoint: float | None = None, max_new_tokens: int = 6, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, device: str = "cpu", skip_reference: bool = False,
                 render_mode: str | None = None):
        super().__init__(**_task_kwargs(split, n_prompts, prompt_seed, format_reward, prompts, model, beta=beta,
                                        kl_estimator=kl_estimator, kl_setpoint=kl_setpoint,
                                        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                        top_p=top_p, device=device, skip_reference=skip_reference),
                         render_mode=render_mode)


class TextArithmeticVectorEnv(TextBanditVectorEnv):
    """``num_envs`` TextArithmetic episodes as one batch (:class:`rlhf_envs.text_bandit.TextBanditVectorEnv`),
    group sampling included (``group_size``)."""

    def __init__(self, num_envs: int = 1, render_mode: str | None = None, group_size: int = 1, split: str = "train",
                 n_prompts: int = 2000, prompt_seed: int = 0, format_reward: float = 0.0,
                 prompts: Sequence[str] | None = None, model: Any = None, beta: float = 0.0,
                 max_new_tokens: int = 6, **kwargs: Any):
        check_group_size(group_size, num_envs)  # before the model loads
        super().__init__(num_envs, render_mode, group_size,
                         **_task_kwargs(split, n_prompts, prompt_seed, format_reward, prompts, model, beta=beta,
                                        max_new_tokens=max_new_tokens, **kwargs))
