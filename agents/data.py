"""Training data: reading JSONL and Hugging Face ``datasets`` files, writing JSONL, tokenising once up front.

Files. Every ``data_path`` / ``prompts_path`` is one of: a JSONL file (one JSON object per line; blank
lines are skipped), a ``.jsonl.gz``, a ``.parquet`` file, or a folder written by
``datasets.Dataset.save_to_disk`` (its ``train`` split if it holds a ``DatasetDict``). The last three
are read through the ``datasets`` library (``pip install 'rlhf-gym[data]'``); JSONL needs nothing more.
Other fields are ignored.

Formats. A *text* is a string or, in TRL's conversational format, a list of ``{"role", "content"}`` turns
(rendered with the tokenizer's chat template, :mod:`rlhf_envs.lm.chat`):

- SFT: ``{"prompt": text, "completion": text}``, or ``{"messages": [turns]}`` with the loss on the
  assistant turns only (each assistant turn is one example: the conversation up to it is the prompt);
- preference pairs: ``{"prompt": text, "chosen": text, "rejected": text}``;
- rankings: ``{"prompt": text, "responses": [best, ..., worst]}`` with K >= 2 texts;
  :func:`read_rankings` also accepts pair lines (as ``responses = [chosen, rejected]``);
- prompts: ``{"prompt": text}``.

A conversational prompt's completions are assistant turns: a string, or a list of turns. Every error
names the file and the row (``path:LINE`` for JSONL, 1-based; ``path: row I`` for the datasets forms,
0-based as ``dataset[I]``): invalid UTF-8, malformed JSON, a missing field, a wrong type, K < 2, an
empty dataset.

Tokenisation. SFT and DPO examples are the prompt's tokens followed by the response's tokens
(tokenised separately, so the prompt tokens are those a sampler conditions on) and the EOS
token. A conversation's prompt is rendered with the template's generation prompt and its response is
the rest of the rendered whole, which ends with the template's own end-of-turn marker (no EOS is
added, nor a second BOS: see :mod:`rlhf_envs.lm.chat`). Truncation policy for ``prompt + response >
max_length``: the prompt gives way first, losing tokens from its start (the words next to the
response are kept) down to ``min(len(prompt), max_length // 2)`` tokens; then the response loses
tokens from its end. The chosen and rejected responses of one pair share one truncated prompt.
Reward-model inputs are the string ``prompt + response`` tokenised as one text (the format the
``learned`` reward plugin scores), with no EOS added, or the rendered conversation with its reply;
longer texts keep their last ``max_length`` tokens, because the score is read at the last token.
"""

from __future__ import annotations

import functools
import json
import operator
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_envs.lm.chat import chat_reward_text, check_conversation, prompt_and_response_text


class DataError(ValueError):
    """A dataset file is unreadable or malformed; the message names the file and the row."""


TEXT = "text"
"""A field kind: a string, or a conversation (a list of role/content turns)."""

_SFT = {"prompt": TEXT, "completion": TEXT}
_PAIR = {"prompt": TEXT, "chosen": TEXT, "rejected": TEXT}
_DATASETS_SUFFIXES = (".parquet", ".jsonl.gz", ".json.gz")


def _jsonl_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``("path:LINE", object)`` for every non-blank line of a JSONL file."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read the dataset ({err.strerror})") from err
    records = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}:{number}: invalid UTF-8 at byte {err.start} of the line: "
                            "save the file as UTF-8") from err
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno})") from err
        if not isinstance(value, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
        records.append((f"{path}:{number}", value))
    return records


def _dataset_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``("path: row I", row)`` for every row of a ``datasets`` folder, parquet or gzipped JSONL file."""
    try:
        import datasets
    except ImportError as err:
        raise DataError(f"{path}: reading a datasets folder, a parquet or a .jsonl.gz file needs the datasets package: "
                        "pip install 'rlhf-gym[data]' (or pip install datasets), or give a plain JSONL file") from err
    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                if "train" not in table:
                    raise DataError(f"{path}: a DatasetDict without a 'train' split (it has {sorted(table)}): "
                                    "save the split to train on alone with Dataset.save_to_disk")
                table = table["train"]
        elif path.name.endswith(".parquet"):
            table = datasets.Dataset.from_parquet(str(path))
        else:
            table = datasets.Dataset.from_json(str(path))
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: cannot read the dataset ({type(err).__name__}: {err})") from err
    return [(f"{path}: row {i}", row) for i, row in enumerate(table)]


def read_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for every row of a dataset in any of the module's file forms; ``where`` names the row."""
    path = Path(path)
    if path.is_dir() or path.name.endswith(_DATASETS_SUFFIXES):
        if not path.exists():
            raise DataError(f"{path}: cannot read the dataset (No such file or directory)")
        return _dataset_rows(path)
    return _jsonl_lines(path)


def _check_text(where: str, name: str, value: Any) -> None:
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        raise DataError(f"{where}: field {name!r} must be a str, got {type(value).__name__} "
                        "(or, in the conversational format, a list of role/content turns)")
    try:
        check_conversation(value, f"field {name!r}")
    except ValueError as err:
        raise DataError(f"{where}: {err}") from err


def _check_fields(where: str, record: dict[str, Any], fields: dict[str, Any]) -> None:
    for name, kind in fields.items():
        if name not in record:
            raise DataError(f"{where}: missing field {name!r} (a line needs {sorted(fields)})")
        if kind is TEXT:
            _check_text(where, name, record[name])
        elif not isinstance(record[name], kind):
            raise DataError(f"{where}: field {name!r} must be a {kind.__name__}, got {type(record[name]).__name__}")
    if "prompt" in fields and isinstance(record["prompt"], str):
        for name in (n for n, kind in fields.items() if kind is TEXT and n != "prompt"):
            if not isinstance(record[name], str):
                raise DataError(f"{where}: field {name!r} is a list of turns but the prompt is a plain string: "
                                "make the prompt a list of turns too (TRL's conversational format), or both strings")


def _require_records(path: str | Path, records: list, fields: str) -> None:
    if not records:
        raise DataError(f"{path}: the dataset is empty: write one JSON object per line with {fields}")


def read_sft(path: str | Path) -> list[dict[str, Any]]:
    """``[{"prompt", "completion"}]`` and ``[{"messages"}]`` (conversations with at least one assistant turn)."""
    records = []
    for where, record in read_rows(path):
        if "messages" in record and "prompt" not in record:
            _check_fields(where, record, {"messages": list})
            _check_text(where, "messages", record["messages"])
            if not any(turn["role"] == "assistant" for turn in record["messages"]):
                raise DataError(f"{where}: 'messages' has no assistant turn, so nothing to train on: "
                                "the loss covers the assistant turns only")
            records.append({"messages": record["messages"]})
            continue
        _check_fields(where, record, _SFT)
        records.append({"prompt": record["prompt"], "completion": record["completion"]})
    _require_records(path, records, "fields prompt, completion (or messages)")
    return records


def read_prompts(path: str | Path) -> list[str | list[dict[str, str]]]:
    """``[prompt, ...]`` (strings or conversations) from rows with a ``prompt`` field (other fields are ignored)."""
    prompts = []
    for where, record in read_rows(path):
        _check_fields(where, record, {"prompt": TEXT})
        prompts.append(record["prompt"])
    _require_records(path, prompts, "a prompt field")
    return prompts


def read_preferences(path: str | Path) -> list[dict[str, Any]]:
    """``[{"prompt", "chosen", "rejected"}]``."""
    records = []
    for where, record in read_rows(path):
        _check_fields(where, record, _PAIR)
        records.append({"prompt": record["prompt"], "chosen": record["chosen"], "rejected": record["rejected"]})
    _require_records(path, records, "fields prompt, chosen, rejected")
    return records


def read_rankings(path: str | Path) -> list[dict[str, Any]]:
    """``[{"prompt", "responses": [best, ..., worst]}]``; pair rows become ``[chosen, rejected]``."""
    records = []
    for where, record in read_rows(path):
        if "responses" in record:
            _check_fields(where, record, {"prompt": TEXT, "responses": list})
            responses = record["responses"]
            if len(responses) < 2:
                raise DataError(f"{where}: 'responses' has {len(responses)} entries, a ranking needs K >= 2")
            for k, response in enumerate(responses):
                if not isinstance(response, str) and isinstance(record["prompt"], str):
                    raise DataError(f"{where}: responses[{k}] must be a str, got {type(response).__name__}")
                _check_text(where, f"responses[{k}]", response)
        else:
            _check_fields(where, record, _PAIR)
            responses = [record["chosen"], record["rejected"]]
        records.append({"prompt": record["prompt"], "responses": list(responses)})
    _require_records(path, records, "fields prompt, responses (or prompt, chosen, rejected)")
    return records


def prompt_key(prompt: str | list[dict[str, str]]) -> str:
    """A hashable key of a prompt (a string, or a conversation as its JSON), e.g. to hold out by prompt."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    """Write records as JSON lines, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    """The objects of a JSONL file this project wrote (metrics, generated data), unchecked."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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
    record_index: list[int] | None = None
    """the record each sequence came from, where a record gives several (an SFT conversation's assistant turns)."""


def _encode(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


def _prompt_response_ids(tokenizer: Any, prompts: list, responses: list[list]
                         ) -> list[tuple[list[int], list[list[int]]]]:
    """Per prompt, its token ids and its responses' (see the module's tokenisation rules), untruncated."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    plain = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    out: list = [None] * len(prompts)
    prompt_ids = _encode(tokenizer, [prompts[i] for i in plain], special=True)
    response_ids = iter(_encode(tokenizer, [r for i in plain for r in responses[i]], special=False))
    for i, p_ids in zip(plain, prompt_ids):
        out[i] = (p_ids, [next(response_ids) + eos for _ in responses[i]])
    for i in (i for i, p in enumerate(prompts) if not isinstance(p, str)):
        texts = [prompt_and_response_text(tokenizer, prompts[i], r) for r in responses[i]]
        # every response shares the rendered prompt: it is the same conversation up to the generation prompt
        out[i] = (_encode(tokenizer, [texts[0][0]], special=False)[0],
                  _encode(tokenizer, [t[1] for t in texts], special=False))
    return out


def tokenize_prompt_responses(
    tokenizer: Any, prompts: list, responses: list[list], max_length: int
) -> TokenizedSequences:
    """Tokenise ``prompts[i]`` with each of ``responses[i]`` (+ EOS), truncated jointly per prompt.

    Prompts are strings or conversations (then each response is an assistant reply). Returns the
    sequences flattened in order (prompt 0's responses, then prompt 1's, ...).
    """
    sequences, prompt_lengths, truncated = [], [], 0
    for p_ids, r_ids in _prompt_response_ids(tokenizer, prompts, responses):
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


def sft_examples(records: list[dict[str, Any]]) -> tuple[list, list, list[int]]:
    """``(prompts, completions, record_index)``: one example per plain record and per assistant turn of a
    ``messages`` record (the turns before it are its prompt, the turn itself its completion)."""
    prompts, completions, index = [], [], []
    for i, record in enumerate(records):
        if "messages" not in record:
            prompts.append(record["prompt"])
            completions.append(record["completion"])
            index.append(i)
            continue
        turns = record["messages"]
        for k, turn in enumerate(turns):
            if turn["role"] == "assistant":
                prompts.append(turns[:k])
                completions.append([turn])
                index.append(i)
    return prompts, completions, index


def tokenize_sft(tokenizer: Any, records: list[dict[str, Any]], max_length: int) -> TokenizedSequences:
    """One sequence per example of :func:`sft_examples`: prompt tokens, completion tokens, EOS (or the template's
    end of turn). The loss covers the completion and that last token: a conversation's assistant turns only."""
    prompts, completions, index = sft_examples(records)
    data = tokenize_prompt_responses(tokenizer, prompts, [[c] for c in completions], max_length)
    data.record_index = index
    return data


def tokenize_pairs(tokenizer: Any, records: list[dict[str, Any]], max_length: int) -> TokenizedSequences:
    """Two sequences per record, chosen then rejected (indices ``2i`` and ``2i + 1``)."""
    return tokenize_prompt_responses(
        tokenizer, [r["prompt"] for r in records], [[r["chosen"], r["rejected"]] for r in records], max_length
    )


def tokenize_texts(tokenizer: Any, texts: list[str], max_length: int, special: bool = True
                   ) -> tuple[list[torch.Tensor], int]:
    """Whole texts (special tokens as the tokenizer adds them, unless ``special`` is False), keeping each one's
    last ``max_length`` tokens.

    Returns the 1-D int64 tensors and how many were truncated.
    """
    ids = _encode(tokenizer, texts, special=special)
    truncated = sum(len(x) > max_length for x in ids)
    _warn_truncated(truncated, len(texts), max_length)
    return [torch.tensor(x[-max_length:] if x else [tokenizer.pad_token_id], dtype=torch.long) for x in ids], truncated


def tokenize_rankings(tokenizer: Any, records: list[dict[str, Any]], max_length: int) -> list[list[torch.Tensor]]:
    """Per ranking record, its K reward-model inputs (best first): ``prompt + response`` as one text, or the
    conversation rendered with the response as its reply (see the module's tokenisation rules)."""
    plain = [i for i, r in enumerate(records) if isinstance(r["prompt"], str)]
    chat = [i for i, r in enumerate(records) if not isinstance(r["prompt"], str)]
    groups: list = [None] * len(records)
    chat_text = functools.partial(chat_reward_text, tokenizer)
    for rows, special, text in [(plain, True, operator.add), (chat, False, chat_text)]:
        inputs = [text(records[i]["prompt"], y) for i in rows for y in records[i]["responses"]]
        texts, _ = tokenize_texts(tokenizer, inputs, max_length, special=special)
        flat = iter(texts)
        for i in rows:
            groups[i] = [next(flat) for _ in records[i]["responses"]]
    return groups
