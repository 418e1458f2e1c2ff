"""The pipeline's prompt splits: preferences, PPO, validation and evaluation share no prompt, from
the corpus (whose grammar repeats openings) as from a prompts file with duplicate lines."""

from __future__ import annotations

import json

import pytest

from agents.pipeline import PipelineConfig, _demonstrations_avoiding, _prompt_splits
from rlhf_envs.corpus import distinct_prompts, make_prompts


def _assert_disjoint(splits):
    sets = [set(s) for s in splits]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not sets[i] & sets[j], (i, j, sorted(sets[i] & sets[j])[:3])


def test_corpus_splits_share_no_prompt_although_the_corpus_repeats_them(tmp_path):
    # the premise: independent corpus draws overlap heavily
    assert len(set(make_prompts(256, seed=1)) & set(make_prompts(1500, seed=2))) > 100
    config = PipelineConfig(output_dir=str(tmp_path / "run"))
    pref, ppo, validation, evaluation = _prompt_splits(config)
    _assert_disjoint([pref, ppo, validation, evaluation])
    assert len(pref) == config.n_preference_prompts and len(ppo) == 512
    assert len(evaluation) == len(set(evaluation)) == config.n_eval_prompts  # distinct held-out prompts
    assert len(validation) == len(set(validation)) > 200
    assert len(set(pref)) < len(pref)  # training splits keep the corpus's repeats (its prompt frequencies)
    small = dict(output_dir=str(tmp_path / "run"), n_preference_prompts=48)
    assert _prompt_splits(PipelineConfig(**small)) == _prompt_splits(PipelineConfig(**small))  # the seed fixes them
    assert _prompt_splits(PipelineConfig(**small, seed=1))[3] != _prompt_splits(PipelineConfig(**small))[3]


def test_file_splits_keep_duplicates_within_one_split(tmp_path):
    lines = [f"prompt {i % 40}" for i in range(200)]  # 40 distinct prompts, each 5 times
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in lines))
    pref, ppo, validation, evaluation = _prompt_splits(PipelineConfig(output_dir=str(tmp_path / "run"),
                                                                      prompts_path=str(path),
                                                                      n_eval_prompts=256, n_preference_prompts=1000))
    _assert_disjoint([pref, ppo, validation, evaluation])
    assert len(evaluation) == 10 and len(validation) == 6  # a quarter and a sixth of the distinct prompts
    assert len(set(ppo)) == 8 and len(ppo) == 40 and len(set(pref)) == 16 and len(pref) == 80


def test_too_few_distinct_prompts_is_a_clear_error(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i % 5}"}) + "\n" for i in range(100)))
    with pytest.raises(ValueError, match="has 5 distinct prompts: give at least 6"):
        PipelineConfig(output_dir=str(tmp_path / "run"), prompts_path=str(path))  # before anything is written
    assert not (tmp_path / "run").exists()


def test_sft_demonstrations_avoid_the_held_out_prompts():
    held_out = set(make_prompts(400, seed=3))
    demonstrations = _demonstrations_avoiding(500, seed=1, held_out=held_out)
    assert len(demonstrations) == 500 and not {d["prompt"] for d in demonstrations} & held_out


def test_distinct_corpus_prompts_for_a_standalone_evaluation():
    prompts = distinct_prompts(300, seed=12345)
    assert len(prompts) == len(set(prompts)) == 300
    assert prompts[:100] == distinct_prompts(100, seed=12345)
    with pytest.raises(ValueError, match="fewer than the 2000 asked for"):
        distinct_prompts(2000, seed=0)
