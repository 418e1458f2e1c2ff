"""Chat templates and conversational data (TRL's formats), and every dataset file form loading into the same rows."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from agents.data import (
    DataError,
    read_preferences,
    read_prompts,
    read_rankings,
    read_sft,
    tokenize_pairs,
    tokenize_rankings,
    tokenize_sft,
    write_jsonl,
)
from rlhf_envs.lm.chat import chat_reward_text, encode_prompt, prompt_and_response_text
from rlhf_envs.lm.loading import load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You review films."},
    {"role": "user", "content": "How was the film?"},
    {"role": "assistant", "content": "a great film with lovely acting"},
    {"role": "user", "content": "And the story?"},
    {"role": "assistant", "content": "the story was dull"},
]
PAIRS = [{"prompt": [{"role": "user", "content": "How was the film?"}],
          "chosen": [{"role": "assistant", "content": "a great film"}],
          "rejected": [{"role": "assistant", "content": "a terrible film"}]},
         {"prompt": [{"role": "user", "content": "And the acting?"}],
          "chosen": [{"role": "assistant", "content": "wonderful acting"}],
          "rejected": [{"role": "assistant", "content": "awful acting"}]}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)  # the embedded tokenizer and its chat template


def test_the_embedded_template_splits_prompt_and_reply(tokenizer):
    head, reply = prompt_and_response_text(tokenizer, CONVERSATION[1:2], "a great film")
    assert head == "<|endoftext|>user: How was the film?\nassistant:" and reply == " a great film<|endoftext|>"
    ids = encode_prompt(tokenizer, CONVERSATION[1:2])
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1  # no second BOS
    # a sampled reply carries its leading space: it renders exactly as the generation prompt plus the reply
    assert chat_reward_text(tokenizer, CONVERSATION[1:2], " a great film") == head + reply


def test_chat_sft_masks_everything_but_assistant_tokens(tokenizer):
    whole = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    encoded = tokenizer(whole, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    spans = []  # the characters of each assistant turn: its reply and end-of-turn marker
    for k, turn in enumerate(CONVERSATION):
        if turn["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(CONVERSATION[:k], tokenize=False, add_generation_prompt=True))
            spans.append((start, len(tokenizer.apply_chat_template(CONVERSATION[: k + 1], tokenize=False))))
    assistant = {i for i, (a, b) in enumerate(offsets) if any(s <= a and b <= e for s, e in spans)}

    data = tokenize_sft(tokenizer, [{"messages": CONVERSATION}], max_length=128)
    assert len(data.input_ids) == 2 and data.record_index == [0, 0]  # one example per assistant turn
    targets = set()
    for seq, prompt_length in zip(data.input_ids, data.prompt_lengths.tolist()):
        assert seq.tolist() == ids[: len(seq)]  # each example is the conversation up to the end of its turn
        targets |= set(range(prompt_length, len(seq)))
    assert targets == assistant  # token by token: the loss covers the assistant turns and nothing else
    replies = ["a great film with lovely acting", "the story was dull"]
    for seq, prompt_length, turn in zip(data.input_ids, data.prompt_lengths.tolist(), replies):
        assert tokenizer.decode(seq[prompt_length:]) == " " + turn + "<|endoftext|>"


def test_chat_sft_trains(tmp_path):
    from agents.sft import SFTConfig, train_sft

    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 16)
    result = train_sft(SFTConfig(data_path=str(data), output_dir=str(tmp_path / "sft"), batch_size=8, max_steps=6,
                                 log_every=1, learning_rate=3e-3, eval_fraction=0.0, torch_threads=1, progress=False,
                                 device="cpu"))
    lines = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert result.global_step == 6 and lines[-1]["loss"] < lines[0]["loss"]


def test_conversational_pairs_tokenise_as_the_policy_sees_them(tokenizer):
    data = tokenize_pairs(tokenizer, PAIRS, max_length=64)
    head, reply = prompt_and_response_text(tokenizer, PAIRS[0]["prompt"], PAIRS[0]["chosen"])
    expected = [*tokenizer(head, add_special_tokens=False)["input_ids"], *tokenizer(reply,
                                                                                    add_special_tokens=False)["input_ids"]]
    assert data.input_ids[0].tolist() == expected and data.input_ids[0].tolist().count(tokenizer.eos_token_id) == 2
    assert int(data.prompt_lengths[0]) == len(tokenizer(head, add_special_tokens=False)["input_ids"])
    groups = tokenize_rankings(tokenizer, [{"prompt": p["prompt"], "responses": [p["chosen"], p["rejected"]]}
                                           for p in PAIRS], max_length=64)
    text = chat_reward_text(tokenizer, PAIRS[1]["prompt"], PAIRS[1]["rejected"])
    assert groups[1][1].tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_conversational_dpo_and_reward_model_train(tmp_path):
    from agents.dpo import DPOConfig, train_dpo
    from agents.reward_model import RewardModelConfig, train_reward_model
    from rlhf_envs.rewards import LearnedReward

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 8)
    common = dict(data_path=str(data), batch_size=8, eval_fraction=0.0, torch_threads=1, progress=False, device="cpu")
    dpo = train_dpo(DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=4, learning_rate=1e-3, **common))
    assert dpo.metrics["rewards/margins"] > 0
    train_reward_model(RewardModelConfig(output_dir=str(tmp_path / "rm"), num_epochs=4, learning_rate=1e-3, **common))
    reward = LearnedReward(str(tmp_path / "rm"))  # scores a conversation as the trainer read it
    prompts = [p["prompt"] for p in PAIRS]
    chosen = reward.score(prompts, [" " + p["chosen"][0]["content"] for p in PAIRS])
    rejected = reward.score(prompts, [" " + p["rejected"][0]["content"] for p in PAIRS])
    assert (chosen > rejected).all(), (chosen, rejected)


def test_the_env_takes_conversational_prompts(tokenizer):
    import gymnasium as gym

    import rlhf_envs  # noqa: F401

    prompts = [[{"role": "user", "content": "How was the film?"}], [{"role": "user", "content": "And the acting?"}]]
    envs = gym.make_vec("TextBandit-v0", num_envs=2, prompts=prompts, max_new_tokens=6)
    obs, info = envs.reset(seed=0, options=None)
    task = envs.unwrapped.task
    for row, prompt in zip(obs, info["prompt"]):
        ids = encode_prompt(tokenizer, prompt)
        assert row[-len(ids):].tolist() == ids and isinstance(prompt, list)
    with pytest.warns(RuntimeWarning, match="no policy log-probs"):  # random actions: the KL is for a uniform policy
        _, _, _, _, info = envs.step(envs.action_space.sample())
    assert info["response"].shape == (2,) and all(isinstance(r, str) for r in info["response"])
    assert info["prompt"].shape == (2,) and task.prompt_texts[0].endswith("assistant:")
    env = gym.make("TextBandit-v0", prompts=prompts, max_new_tokens=6, render_mode="ansi")
    env.reset(seed=0)
    assert "user: " in env.render()


ROWS = {
    "sft": ([{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION[1:]}], read_sft),
    "plain_sft": ([{"prompt": "the film", "completion": " was great"}, {"prompt": "a", "completion": " b"}], read_sft),
    "pairs": (PAIRS, read_preferences),
    "rankings": ([{"prompt": "the film", "responses": [" great", " fine", " dull"]}], read_rankings),
    "prompts": ([{"prompt": [{"role": "user", "content": "hi"}]}, {"prompt": [{"role": "user", "content": "yo"}]}],
                read_prompts),
}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_every_dataset_form_loads_into_the_same_rows(tmp_path, name):
    datasets = pytest.importorskip("datasets")
    rows, reader = ROWS[name]
    expected = reader(write_jsonl(tmp_path / "rows.jsonl", rows))
    with gzip.open(tmp_path / "rows.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "rows.parquet"))
    table.save_to_disk(str(tmp_path / "folder"))
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(tmp_path / "splits"))
    for form in ("rows.jsonl.gz", "rows.parquet", "folder", "splits"):
        assert reader(tmp_path / form) == expected, form


def test_dataset_errors_name_the_row_and_the_field(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"prompt": "a", "completion": " b"}, {"prompt": "c", "completion": None}]).to_parquet(
        str(tmp_path / "none.parquet"))
    with pytest.raises(DataError, match=r"none\.parquet: row 1: field 'completion' must be a str, got NoneType"):
        read_sft(tmp_path / "none.parquet")
    datasets.Dataset.from_list([{"prompt": "a"}]).save_to_disk(str(tmp_path / "folder"))
    with pytest.raises(DataError, match=r"folder: row 0: missing field 'completion'"):
        read_sft(tmp_path / "folder")
    write_jsonl(tmp_path / "turns.jsonl", [{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"turns\.jsonl:1: field 'prompt'\[0\] is missing field 'content'"):
        read_preferences(tmp_path / "turns.jsonl")
    write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "plain", "chosen": [{"role": "assistant", "content": "a"}],
                                            "rejected": "b"}])
    with pytest.raises(DataError, match=r"mixed\.jsonl:1: field 'chosen' is a list of turns but the prompt is a plain"):
        read_preferences(tmp_path / "mixed.jsonl")
    write_jsonl(tmp_path / "nobody.jsonl", [{"messages": CONVERSATION[:2]}])
    with pytest.raises(DataError, match=r"nobody\.jsonl:1: 'messages' has no assistant turn"):
        read_sft(tmp_path / "nobody.jsonl")


def test_a_tokenizer_without_a_template_is_a_clear_error_and_plain_text_is_unchanged(save_tiny_lm, tmp_path):
    tiny = load_tokenizer(save_tiny_lm(tmp_path / "tiny"))
    with pytest.raises(ValueError, match="has no chat_template"):
        tokenize_sft(tiny, [{"messages": CONVERSATION}], max_length=64)
    assert torch.equal(tokenize_sft(tiny, [{"prompt": "a", "completion": "b"}], 64).input_ids[0],
                       torch.tensor(tiny("a")["input_ids"] + tiny("b", add_special_tokens=False)["input_ids"]
                                    + [tiny.eos_token_id]))
