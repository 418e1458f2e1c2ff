"""The trainer benchmark's long-sequence data (``--data shakespeare``): real text, ranked by the gold reward."""

import pytest

from benchmarks.bench_trainers import SHAKESPEARE, shakespeare_data

pytestmark = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is not there")


def test_shakespeare_pairs_are_long_ranked_and_reproducible():
    from rlhf_envs.lm.loading import load_tokenizer
    from rlhf_envs.rewards import SentimentReward

    demos, pairs = shakespeare_data(64, seed=3)
    assert len(demos) == len(pairs) == 64
    assert shakespeare_data(64, seed=3) == (demos, pairs)
    gold = SentimentReward()
    prompts = [p["prompt"] for p in pairs]
    chosen, rejected = gold.score(prompts, [p["chosen"] for p in pairs]), gold.score(prompts,
                                                                                     [p["rejected"] for p in pairs])
    assert (chosen > rejected).all()
    for row in demos:  # the prompt is a speaker's name and the first line; the completion goes on
        assert row["prompt"].split("\n")[0].endswith(":") and row["completion"].strip()
    tokenizer = load_tokenizer(None)
    lengths = [len(tokenizer(p["prompt"] + p["chosen"])["input_ids"]) for p in pairs]
    assert sum(lengths) / len(lengths) > 60  # long sequences, the point of this data
