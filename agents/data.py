"""JSONL datasets for SFT, preferences and rankings, validated and tokenised once up front.

Formats (one JSON object per line; blank lines are skipped; other fields are ignored):

- SFT: ``{"prompt": str, "completion": str}``
- preference pairs: ``{"prompt": str, "chosen": str, "rejected": str}``
- rankings: ``{"prompt": str, "responses": [best, ..., worst]}`` with K >= 2 strings;
  :func:`read_rankings` also accepts pair lines (as ``responses = [chosen, rejected]``).

Every error names the file and the 1-based line number: invalid UTF-8, malformed JSON, a
missing field, a wrong type, K < 2, an empty dataset.

Tokenisation. SFT and DPO examples are the prompt's tokens followed by the response's tokens
(tokenised separately, so the prompt tokens are those a sampler conditions on) and the EOS
token. Truncation policy for ``prompt + response > max_length``: the prompt gives way first,
losing tokens from its start (the words next to the response are kept) down to
``min(len(prompt), max_length // 2)`` tokens; then the response loses tokens from its end. The
chosen and rejected responses of one pair share one truncated prompt. Reward-model inputs are
the string ``prompt + response`` tokenised as one text (the format the ``learned`` reward plugin
scores), with no EOS added; longer texts keep their last ``max_length`` tokens, because the
score is read at the last token.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class DataError(ValueError):
    """A dataset file is unreadable or malformed; the message names the file and line."""


_SFT = {"prompt": str, "completion": str}
_PAIR = {"prompt": str, "chosen": str, "rejected": str}


def _lines(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line_number, object)`` for every non-blank line of a JSONL file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read the dataset ({err.strerror})") from err
    records = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}:{number}: invalid UTF-8 at byte {err.start} of the line: save the file as UTF-8") from err
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno})") from err
        if not isinstance(value, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
        records.append((number, value))
    return records


def _check_fields(path: Path, number: int, record: dict[str, Any], fields: dict[str, type]) -> None:
    for name, kind in fields.items():
        if name not in record:
            raise DataError(f"{path}:{number}: missing field {name!r} (a line needs {sorted(fields)})")
        if not isinstance(record[name], kind):
            raise DataError(f"{path}:{number}: field {name!r} must be a {kind.__name__}, got {type(record[name]).__name__}")


def _require_records(path: Path, records: list, fields: str) -> None:
    if not records:
        raise DataError(f"{path}: the dataset is empty: write one JSON object per line with {fields}")


def read_sft(path: str | Path) -> list[dict[str, str]]:
    """``[{"prompt", "completion"}]`` from a JSONL file."""
    path = Path(path)
    records = []
    for number, record in _lines(path):
        _check_fields(path, number, record, _SFT)
        records.append({"prompt": record["prompt"], "completion": record["completion"]})
    _require_records(path, records, "fields prompt, completion")
    return records


def read_prompts(path: str | Path) -> list[str]:
    """``["prompt", ...]`` from a JSONL file of ``{"prompt": ...}`` lines (other fields are ignored)."""
    path = Path(path)
    prompts = []
    for number, record in _lines(path):
        _check_fields(path, number, record, {"prompt": str})
        prompts.append(record["prompt"])
    _require_records(path, prompts, "a prompt field")
    return prompts


def read_preferences(path: str | Path) -> list[dict[str, str]]:
    """``[{"prompt", "chosen", "rejected"}]`` from a JSONL file."""
    path = Path(path)
    records = []
    for number, record in _lines(path):
        _check_fields(path, number, record, _PAIR)
        records.append({"prompt": record["prompt"], "chosen": record["chosen"], "rejected": record["rejected"]})
    _require_records(path, records, "fields prompt, chosen, rejected")
    return records


def read_rankings(path: str | Path) -> list[dict[str, Any]]:
    """``[{"prompt", "responses": [best, ..., worst]}]``; pair lines become ``[chosen, rejected]``."""
    path = Path(path)
    records = []
    for number, record in _lines(path):
        if "responses" in record:
            _check_fields(path, number, record, {"prompt": str, "responses": list})
            responses = record["responses"]
            if len(responses) < 2:
                raise DataError(f"{path}:{number}: 'responses' has {len(responses)} entries, a ranking needs K >= 2")
            for k, response in enumerate(responses):
                if not isinstance(response, str):
                    raise DataError(f"{path}:{number}: responses[{k}] must be a str, got {type(response).__name__}")
        else:
            _check_fields(path, number, record, _PAIR)
            responses = [record["chosen"], record["rejected"]]
        records.append({"prompt": record["prompt"], "responses": list(responses)})
    _require_records(path, records, "fields prompt, responses (or prompt, chosen, rejected)")
    return records


def fit_lengths(prompt_len: int, response_lens: list[int], max_length: int) -> tuple[int, list[int]]:
    """Token counts ``(prompt, [responses])`` kept by the truncation policy (see the module docstring)."""
    longest = max(response_lens)
    if prompt_len + longest <= max_length:
        return prompt_len, list(response_lens)
    keep_prompt = min(prompt_len, max(max_length - longest, max_length // 2))
    return keep_prompt, [min(n, max_length - keep_prompt) for n in response_lens]


@dataclass
class TokenizedSequences:
    """Prompt + response token sequences (1-D int64 tensors) and where each response starts."""

    input_ids: list[torch.Tensor]
    prompt_lengths: torch.Tensor
    """``[N]`` int64: tokens of the (truncated) prompt in each sequence."""
    num_truncated: int
    """how many examples were cut to ``max_length``."""


def _encode(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


def tokenize_prompt_responses(
    tokenizer: Any, prompts: list[str], responses: list[list[str]], max_length: int
) -> TokenizedSequences:
    """Tokenise ``prompts[i]`` with each of ``responses[i]`` (+ EOS), truncated jointly per prompt.

    Returns the sequences flattened in order (prompt 0's responses, then prompt 1's, ...).
    """
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    prompt_ids = _encode(tokenizer, prompts, special=True)
    flat = [r for group in responses for r in group]
    response_ids = iter(_encode(tokenizer, flat, special=False))
    sequences, prompt_lengths, truncated = [], [], 0
    for p_ids, group in zip(prompt_ids, responses):
        r_ids = [next(response_ids) + eos for _ in group]
        keep_p, keep_r = fit_lengths(len(p_ids), [len(r) for r in r_ids], max_length)
        truncated += keep_p < len(p_ids) or keep_r != [len(r) for r in r_ids]
        p_kept = p_ids[len(p_ids) - keep_p :]
        for r, n in zip(r_ids, keep_r):
            sequences.append(torch.tensor(p_kept + r[:n], dtype=torch.long))
            prompt_lengths.append(keep_p)
    _warn_truncated(truncated, len(prompts), max_length)
    return TokenizedSequences(sequences, torch.tensor(prompt_lengths, dtype=torch.long), truncated)


def _warn_truncated(truncated: int, total: int, max_length: int) -> None:
    if truncated:
        warnings.warn(f"{truncated} of {total} examples are longer than max_length={max_length} tokens and were "
                      "truncated (policy: agents.data); raise max_length to keep them whole", stacklevel=3)


def tokenize_sft(tokenizer: Any, records: list[dict[str, str]], max_length: int) -> TokenizedSequences:
    """One sequence per record: prompt tokens, completion tokens, EOS. The loss covers the completion and EOS."""
    return tokenize_prompt_responses(tokenizer, [r["prompt"] for r in records], [[r["completion"]] for r in records], max_length)


def tokenize_pairs(tokenizer: Any, records: list[dict[str, str]], max_length: int) -> TokenizedSequences:
    """Two sequences per record, chosen then rejected (indices ``2i`` and ``2i + 1``)."""
    return tokenize_prompt_responses(
        tokenizer, [r["prompt"] for r in records], [[r["chosen"], r["rejected"]] for r in records], max_length
    )


def tokenize_texts(tokenizer: Any, texts: list[str], max_length: int) -> tuple[list[torch.Tensor], int]:
    """Whole texts (special tokens as the tokenizer adds them), keeping each one's last ``max_length`` tokens.

    Returns the 1-D int64 tensors and how many were truncated.
    """
    ids = _encode(tokenizer, texts, special=True)
    truncated = sum(len(x) > max_length for x in ids)
    _warn_truncated(truncated, len(texts), max_length)
    return [torch.tensor(x[-max_length:] if x else [tokenizer.pad_token_id], dtype=torch.long) for x in ids], truncated
