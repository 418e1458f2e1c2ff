"""Dataset readers (errors name file and line) and tokenisation (masks, truncation policy).

``make_tiny_lm`` builds the tiny word-level GPT-2 the agent tests train; the other agent test
files import it from here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from agents.data import (
    DataError,
    fit_lengths,
    read_preferences,
    read_rankings,
    read_sft,
    tokenize_pairs,
    tokenize_sft,
    tokenize_texts,
)
from rlhf_envs.lm.loading import load_tokenizer
from rlhf_envs.lm.padded import batch_sequences

WORDS = ("the a food film hotel was is and but very not good great bad awful fine okay plain service room "
         "story I liked it hated loved yes no really quite").split()


def make_tiny_lm(path: Path, *, n_embd: int = 32, n_layer: int = 2, seed: int = 0, dropout: float = 0.0) -> Path:
    """A word-level tokenizer over ``WORDS`` (with [PAD], [EOS], [UNK]) and a random tiny GPT-2, saved to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=n_embd, n_layer=n_layer, n_head=2,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        pad_token_id=0, eos_token_id=1, bos_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(
    ("content", "reader", "message"),
    [
        (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', read_sft, ":2: malformed JSON"),
        (b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"}\n', read_sft, ":3: missing field 'completion'"),
        (b'{"prompt": "a", "completion": 3}\n', read_sft, ":1: field 'completion' must be a str, got int"),
        (
            b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n',
            read_sft,
            ":2: invalid UTF-8",
        ),
        (b'["prompt", "completion"]\n', read_sft, ":1: expected a JSON object, got list"),
        (b"\n  \n", read_sft, "the dataset is empty"),
        (b'{"prompt": "a", "chosen": "b"}\n', read_preferences, ":1: missing field 'rejected'"),
        (
            b'{"prompt": "a", "chosen": "b", "rejected": null}\n',
            read_preferences,
            ":1: field 'rejected' must be a str, got NoneType",
        ),
        (
            b'{"prompt": "a", "responses": ["b", "c"]}\n{"prompt": "a", "responses": ["b"]}\n',
            read_rankings,
            ":2: 'responses' has 1 entries, a ranking needs K >= 2",
        ),
        (b'{"prompt": "a", "responses": ["b", 7]}\n', read_rankings, ":1: responses[1] must be a str, got int"),
        (b'{"prompt": "a", "responses": "bc"}\n', read_rankings, ":1: field 'responses' must be a list, got str"),
        (b"", read_rankings, "the dataset is empty"),
    ],
)
def test_data_errors_name_file_and_line(tmp_path, content, reader, message):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        reader(path)
    assert str(info.value).startswith(str(path))
    assert message in str(info.value)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_sft(tmp_path / "nope.jsonl")


def test_readers_return_records_and_rankings_accept_pairs(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "p", "chosen": "c", "rejected": "r", "extra": 1},
            {"prompt": "q", "responses": ["x", "y", "z"]},
        ],
    )
    assert read_rankings(path) == [
        {"prompt": "p", "responses": ["c", "r"]},
        {"prompt": "q", "responses": ["x", "y", "z"]},
    ]
    assert read_sft(write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "completion": "c"}])) == [
        {"prompt": "p", "completion": "c"}
    ]


def test_truncation_policy():
    assert fit_lengths(5, [3], 10) == (5, [3])
    # the prompt gives way first, down to max_length // 2 ...
    assert fit_lengths(8, [4], 10) == (6, [4])
    assert fit_lengths(8, [9], 10) == (5, [5])
    # ... a short prompt is kept whole and the response is cut
    assert fit_lengths(2, [20], 10) == (2, [8])
    # both responses of a pair share the prompt truncation set by the longer one
    assert fit_lengths(8, [3, 6], 10) == (5, [3, 5])


def test_sft_tokenisation_masks_completion_only(tmp_path):
    tokenizer = load_tokenizer(str(make_tiny_lm(tmp_path / "lm")))
    with pytest.warns(UserWarning, match="1 of 2 examples are longer than max_length=6"):
        data = tokenize_sft(
            tokenizer,
            [
                {"prompt": "the food was", "completion": "very good"},
                {"prompt": "I liked the hotel and the story and the film", "completion": "yes"},
            ],
            max_length=6,
        )
    ids = [tokenizer.convert_ids_to_tokens(x.tolist()) for x in data.input_ids]
    assert ids[0] == ["the", "food", "was", "very", "good", "[EOS]"]
    # 10 prompt words + "yes" + EOS > 6: the prompt keeps its last max(6 - 2, 3) = 4 words
    assert ids[1] == ["story", "and", "the", "film", "yes", "[EOS]"]
    assert data.prompt_lengths.tolist() == [3, 4]
    assert data.num_truncated == 1
    input_ids, mask, target = batch_sequences(
        data.input_ids, data.prompt_lengths, tokenizer.pad_token_id, torch.device("cpu")
    )
    assert target.tolist() == [[False, False, False, True, True, True], [False, False, False, False, True, True]]
    assert mask.tolist() == [[1] * 6, [1] * 6]


def test_pair_tokenisation_and_reward_texts(tmp_path):
    tokenizer = load_tokenizer(str(make_tiny_lm(tmp_path / "lm")))
    data = tokenize_pairs(
        tokenizer, [{"prompt": "the film was", "chosen": "good", "rejected": "very very bad"}], max_length=16
    )
    assert [x.tolist()[-1] for x in data.input_ids] == [tokenizer.eos_token_id] * 2
    assert [len(x) for x in data.input_ids] == [5, 7] and data.prompt_lengths.tolist() == [3, 3]
    with pytest.warns(UserWarning, match="1 of 2 examples"):
        texts, truncated = tokenize_texts(tokenizer, ["the film was good", "the film was very very bad"], max_length=4)
    assert tokenizer.convert_ids_to_tokens(texts[1].tolist()) == ["was", "very", "very", "bad"]
    assert truncated == 1
