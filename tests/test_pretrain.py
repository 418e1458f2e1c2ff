"""`rlhf pretrain` on a user's text, `rlhf pipeline --corpus` splits, and bad corpora refused before anything is
written."""

from __future__ import annotations

import json
import re

import pytest
import torch

from agents.cli import main
from agents.pipeline import PipelineConfig, _prompt_splits
from agents.pretrain import PretrainConfig
from agents.text_corpus import COMPLETION_WORDS, MIN_WORDS, PROMPT_WORDS, corpus_examples
from rlhf_envs.corpus import make_reviews
from rlhf_envs.lm.build_embedded import text_passages
from rlhf_envs.lm.loading import load_causal_lm


def _text_file(path, n: int, seed: int = 0):
    """``n`` synthetic reviews, one paragraph each (blank lines between), as a user's plain-text file."""
    path.write_text("\n\n".join(make_reviews(n, seed)) + "\n", encoding="utf-8")
    return path


def test_pretrain_writes_a_model_that_beats_a_unigram_model(tmp_path):
    corpus, out = _text_file(tmp_path / "reviews.txt", 600), tmp_path / "base"
    assert main(["pretrain", "--corpus", str(corpus), "--output-dir", str(out), "--size", "tiny", "--vocab-size", "300",
                 "--max-steps", "80", "--batch-size", "32", "--eval-fraction", "0.1", "--torch-threads", "1",
                 "--no-progress"]) == 0
    info = json.loads((out / "pretrain_info.json").read_text())
    assert info["passages"] == 600 and info["eval_passages"] == 60 and info["vocab_size"] == 300
    assert info["eval_loss"] < info["eval_unigram_loss"] - 0.3, info  # it learned context, not only frequencies
    model, tokenizer = load_causal_lm(out)  # a loadable Hugging Face directory with its own tokenizer
    ids = tokenizer(["The pasta was"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], 300)
    assert "The pasta was" in tokenizer.decode(ids[0])


def test_corpus_derives_the_documented_disjoint_splits(tmp_path):
    corpus = _text_file(tmp_path / "reviews.txt", 1200, seed=3)
    config = PipelineConfig(output_dir=str(tmp_path / "run"), corpus_paths=[str(corpus)], n_demonstrations=100,
                            n_preference_prompts=40, n_eval_prompts=16)
    assert config.rm_epochs == 4 and config.rm_learning_rate == 1e-3  # the corpus recipe took the defaults' place
    assert not (tmp_path / "run").exists()
    demonstrations, prompts = corpus_examples(config.corpus_paths, config.seed)
    passages = {p for p in text_passages(corpus.read_text())}
    for d in demonstrations:
        prompt_words, completion_words = d["prompt"].split(), d["completion"].split()
        passage = next(p for p in passages if p.startswith(d["prompt"] + d["completion"]))
        assert PROMPT_WORDS[0] <= len(prompt_words) <= PROMPT_WORDS[1] and len(passage.split()) >= MIN_WORDS
        assert 1 <= len(completion_words) <= COMPLETION_WORDS and re.match(r"\s", d["completion"])
        assert len(completion_words) == min(COMPLETION_WORDS, len(passage.split()) - len(prompt_words))
    pref, ppo, validation, evaluation = _prompt_splits(config)
    assert len(evaluation) == 16 and len(pref) == 40 and len(validation) >= 1 and len(ppo) >= 1
    assert set(pref) | set(ppo) | set(validation) | set(evaluation) <= set(prompts)
    splits = [set(pref), set(ppo), set(validation), set(evaluation)]
    assert all(not (a & b) for i, a in enumerate(splits) for b in splits[i + 1:])
    # the SFT stage's demonstrations: the other half, none of them on a validation or evaluation prompt
    kept = [d for d in demonstrations if d["prompt"] not in set(validation) | set(evaluation)]
    assert len(kept) >= config.n_demonstrations
    assert not {d["prompt"] for d in kept} & (set(validation) | set(evaluation))


@pytest.mark.parametrize("content, message", [
    (b"", r"is empty \(0 bytes"),
    (b"   \n\n \n", r"is empty \(7 bytes"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"is binary \(a NUL byte at offset 8\)"),
    (b"caf\xe9 au lait", r"not UTF-8 text \(byte 3 of 12\)"),
])
def test_bad_corpus_fails_before_anything_is_written(tmp_path, content, message):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        PipelineConfig(output_dir=str(tmp_path / "run"), corpus_paths=[str(corpus)])
    assert main(["pretrain", "--corpus", str(corpus), "--output-dir", str(tmp_path / "base")]) == 2
    assert not (tmp_path / "run").exists() and not (tmp_path / "base").exists()


def test_corpus_too_small_for_the_splits_says_the_numbers(tmp_path):
    corpus = _text_file(tmp_path / "small.txt", 300)
    # 300 reviews, 273 of at least 6 words: 136 demonstrations and 137 prompts, a quarter of them for the evaluation
    with pytest.raises(ValueError, match=r"too small for the splits asked for: its 273 examples .* give "
                                         r"136 demonstrations for n_demonstrations=2000; 33 evaluation prompts for "
                                         r"n_eval_prompts=256 .*; 55 preference prompts for n_preference_prompts=1600"):
        PipelineConfig(output_dir=str(tmp_path / "run"), corpus_paths=[str(corpus)])
    assert main(["pipeline", "--corpus", str(corpus), "--output-dir", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"has 1 passage\(s\): a held-out loss needs >= 2"):
        PretrainConfig(corpus_paths=[str(_text_file(tmp_path / "one.txt", 1))])


def test_corpus_and_jsonl_data_are_exclusive(tmp_path):
    corpus = _text_file(tmp_path / "reviews.txt", 50)
    with pytest.raises(ValueError, match="drop demonstrations_path and prompts_path"):
        PipelineConfig(corpus_paths=[str(corpus)], prompts_path=str(corpus))


@pytest.mark.slow
def test_pipeline_on_a_corpus_pretrains_then_runs_every_stage(tmp_path):
    corpus, run = _text_file(tmp_path / "reviews.txt", 1200, seed=5), tmp_path / "run"
    code = main(["pipeline", "--corpus", str(corpus), "--output-dir", str(run), "--pretrain-size", "tiny",
                 "--pretrain-steps", "40", "--n-demonstrations", "96", "--n-preference-prompts", "48", "--ppo-episodes",
                 "64", "--ppo-batch-size", "32", "--n-eval-prompts", "16", "--dpo-checkpoints", "1", "--ppo-snapshots",
                 "1", "--rm-epochs", "1", "--dpo-epochs", "1", "--sft-epochs", "1", "--no-progress", "--torch-threads",
                 "1"])
    summary = json.loads((run / "summary.json").read_text())
    assert code == (0 if summary["status"] == "ok" else 3)
    assert list(summary["stages"]) == ["pretrain", "sft", "preferences", "rm", "ppo", "dpo"]
    assert summary["stages"]["pretrain"]["status"] == "ok"  # 40 steps on the reviews beat token frequencies
    info = json.loads((run / "pretrain" / "pretrain_info.json").read_text())
    assert info["eval_loss"] < info["eval_unigram_loss"]
    demonstrations = [json.loads(line) for line in (run / "data" / "sft.jsonl").read_text().splitlines()]
    evaluation = json.loads((run / "eval.json").read_text())
    assert len(demonstrations) == 96 and evaluation["n_prompts"] == 16
    assert not {d["prompt"] for d in demonstrations} & {e["prompt"] for e in evaluation["examples"]}
    assert f"pretrained on {corpus}" in (run / "report.md").read_text()
