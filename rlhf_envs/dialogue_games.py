"""The games TextDialogue hosts: the env's side of a conversation, one reply per policy turn.

A game is any object with ``reset(rng) -> str`` (the opening text) and ``reply(text) -> (reply, reward,
terminated)`` or ``(reply, reward, terminated, truncated)``: the env's answer to the policy's turn
``text`` (turn-end marker excluded), the turn's reward, and whether the episode is over.

Built in:

* :class:`GuessNumberGame` (``"guess"``): a secret in ``1..high``; the policy guesses, the env says
  ``higher``, ``lower`` or ``correct``. Its optimum is binary search; :func:`optimal_guess_turns`
  gives the exact minimal expected number of turns.
* :class:`CalculatorGame` (``"calc"``): a product ``a*b=`` of two two-digit numbers; the policy may
  call the tool, ``calc(a*b)``, and the env replies ``=<value>;`` (``=?;`` with the tool off); the
  first turn that is not a call is the answer, scored by :class:`ArithmeticChecker`.
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["ASSETS", "ArithmeticChecker", "CalculatorGame", "GuessNumberGame", "evaluate_expression",
           "make_word_tokenizer", "optimal_guess_turns"]

ASSETS = Path(__file__).resolve().parent / "assets"
EOT, PAD, UNK = "<eot>", "<pad>", "<unk>"
"""The turn-end marker (the tokenizer's EOS), padding and unknown text."""


def make_word_tokenizer(words: Sequence[str]) -> Any:
    """A tokenizer whose tokens are exactly ``words`` (longest match first) plus ``<eot>`` (EOS), ``<pad>``, ``<unk>``.

    Text is split on the words themselves, no spaces needed (``"calc(12*7)"`` is ``calc( 1 2 * 7 )``);
    anything else is ``<unk>``. Decoding concatenates the words. No special tokens are added when encoding.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*words, EOT, PAD, UNK])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    pattern = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOT, pad_token=PAD, unk_token=UNK,
                                   padding_side="left")


def optimal_guess_turns(high: int) -> Fraction:
    """The exact minimal expected number of turns to find a secret uniform on ``1..high`` from
    higher/lower feedback (each guess, the last included, is one turn).

    Dynamic programming over interval sizes: ``cost(n) = n + min_g cost(g - 1) + cost(n - g)`` is the
    least total number of guesses over the ``n`` secrets of an interval; the answer is ``cost(high) / high``
    (``16 -> 27/8 = 3.375``, binary search's expected depth).
    """
    if not isinstance(high, int) or high < 1:
        raise ValueError(f"high must be a positive int, got {high!r}")
    cost = [0] * (high + 1)
    for n in range(1, high + 1):
        cost[n] = n + min(cost[g - 1] + cost[n - g] for g in range(1, n + 1))
    return Fraction(cost[high], high)


class GuessNumberGame:
    """Guess-the-number: the opening is ``?``; each turn the policy names a number (``7``), the env replies
    ``higher``, ``lower``, ``correct`` (episode over) or ``invalid`` (not a number in ``1..high``).

    Rewards: ``-turn_cost`` every turn, ``+1`` on the turn that finds the secret, so the optimal policy is
    the one with the fewest expected turns, binary search (:func:`optimal_guess_turns`).
    """

    model_dir = ASSETS / "dialogue_guess"
    max_turns = 8
    max_turn_tokens = 2
    max_context_tokens = 31

    def __init__(self, high: int = 16, turn_cost: float = 0.1):
        if not isinstance(high, int) or not 2 <= high <= 16:
            raise ValueError(f"high must be an int in 2..16 (the task model's numbers), got {high!r}")
        self.high, self.turn_cost = high, float(turn_cost)
        self.secret = 1

    @staticmethod
    def words(high: int = 16) -> list[str]:
        return ["?", "higher", "lower", "correct", "invalid", *(str(n) for n in range(1, high + 1))]

    def reset(self, rng: np.random.Generator) -> str:
        self.secret = int(rng.integers(1, self.high + 1))
        return "?"

    def reply(self, text: str) -> tuple[str, float, bool]:
        guess = int(text) if text.isdigit() else 0
        if not 1 <= guess <= self.high:
            return "invalid", -self.turn_cost, False
        if guess == self.secret:
            return "correct", 1.0 - self.turn_cost, True
        return ("higher" if guess < self.secret else "lower"), -self.turn_cost, False


def evaluate_expression(expression: str) -> int | None:
    """The value of an integer expression of ``+ - *`` and parentheses, or None when it is not one (never ``eval``)."""
    try:
        tree = ast.parse(expression, mode="eval").body
    except (SyntaxError, ValueError):
        return None
    operators = {ast.Add: int.__add__, ast.Sub: int.__sub__, ast.Mult: int.__mul__}

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in operators:
            return operators[type(node.op)](value(node.left), value(node.right))
        raise ValueError("not an integer expression")

    try:
        result = value(tree)
    except ValueError:
        return None
    return result if abs(result) < 10**12 else None


_CALL = re.compile(r"calc\((.*)\)")


class CalculatorGame:
    """Arithmetic with a calculator tool: the opening is ``a*b=`` (``a, b`` uniform in ``10..99``).

    A turn ``calc(<expression>)`` is a tool call: the env replies ``=<value>;`` (``=?;`` when the tool is off
    or the expression is not one of integers, ``+ - *`` and parentheses) and the episode goes on. Any other
    turn is the answer and ends the episode; :class:`ArithmeticChecker` scores it (1 if right). Turns carry
    no reward of their own.
    """

    model_dir = ASSETS / "dialogue_calc"
    max_turns = 3
    max_turn_tokens = 12
    max_context_tokens = 47

    def __init__(self, tool: bool = True, low: int = 10, high: int = 99):
        if not isinstance(tool, bool):
            raise TypeError(f"tool must be a bool, got {type(tool).__name__} {tool!r}")
        if not 0 <= low <= high:
            raise ValueError(f"need 0 <= low <= high, got low={low!r}, high={high!r}")
        self.tool, self.low, self.high = tool, low, high

    @staticmethod
    def words() -> list[str]:
        return [*"0123456789", "*", "+", "-", "=", "?", ";", "calc(", "(", ")"]

    def reset(self, rng: np.random.Generator) -> str:
        a, b = rng.integers(self.low, self.high + 1, size=2)
        return f"{a}*{b}="

    def reply(self, text: str) -> tuple[str, float, bool]:
        call = _CALL.fullmatch(text)
        if call is None:
            return "", 0.0, True
        result = evaluate_expression(call.group(1)) if self.tool else None
        return f"={'?' if result is None else result};", 0.0, False


class ArithmeticChecker:
    """Reward plugin (:mod:`rlhf_envs.rewards` interface): 1.0 where the response is the integer value of the
    prompt's expression (``"12*7="`` and ``"84"``), else 0.0; float32 ``[N]``."""

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        out = np.zeros(len(responses), dtype=np.float32)
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            truth = _truth(prompt)
            out[i] = float(truth is not None and response.strip().lstrip("-").isdigit() and int(response) == truth)
        return out


@lru_cache(maxsize=65536)
def _truth(prompt: str) -> int | None:
    return evaluate_expression(prompt.rstrip("="))
