"""The review corpus, the shipped embedded model, and offline LM loading."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhf_envs.corpus import make_demonstrations, make_prompts, make_reviews, vocabulary
from rlhf_envs.lm.build_embedded import BuildConfig, build, length_bucketed_batches, lr_at, shakespeare_passages
from rlhf_envs.lm.loading import EMBEDDED_MODEL_DIR, load_causal_lm, load_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
VADER = SentimentIntensityAnalyzer()


def compound(texts: list[str]) -> np.ndarray:
    return np.array([VADER.polarity_scores(t)["compound"] for t in texts])


def english_share(texts: list[str]) -> float:
    words = [w.strip(".,!").lower() for t in texts for w in t.split()]
    known = vocabulary()
    return sum(w in known for w in words) / max(1, len(words))


# --- corpus -----------------------------------------------------------------------------------


def test_corpus_is_deterministic_in_seed():
    assert make_reviews(200, seed=3) == make_reviews(200, seed=3)
    assert make_reviews(200, seed=3) != make_reviews(200, seed=4)
    assert make_prompts(50, seed=1) != make_prompts(50, seed=2)


def test_prompts_and_demonstrations_are_splits_of_reviews():
    reviews = make_reviews(300, seed=5)
    prompts = make_prompts(300, seed=5)
    demos = make_demonstrations(300, seed=5)
    for review, prompt, demo in zip(reviews, prompts, demos):
        assert demo["prompt"] == prompt
        assert demo["completion"].startswith(" ")
        assert demo["prompt"] + demo["completion"] == review
        assert review.endswith((".", "!"))
    assert len(set(make_prompts(2000, seed=0))) > 500


def test_review_sentiment_spreads_over_both_signs():
    scores = compound(make_reviews(1500, seed=0))
    assert (scores < -0.3).mean() > 0.25
    assert (scores > 0.3).mean() > 0.3
    assert (np.abs(scores) <= 0.3).mean() > 0.1
    assert scores.min() < -0.8 and scores.max() > 0.8


def test_vocabulary_covers_every_generated_word():
    assert english_share(make_reviews(3000, seed=9)) == 1.0
    assert 250 < len(vocabulary()) < 1000


# --- build helpers ----------------------------------------------------------------------------


def test_length_buckets_cover_each_row_once_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = list(rng.integers(5, 40, size=1000))
    batches = length_bucketed_batches(lengths, batch_size=16, rng=np.random.default_rng(1))
    flat = np.concatenate(batches)
    assert len(flat) == len(set(flat.tolist())) == 992  # 62 full batches, the rest dropped
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded / sum(lengths[i] for i in flat) < 1.1


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    config = BuildConfig(max_steps=1000, warmup_steps=100, lr=1e-3)
    assert lr_at(0, config) == pytest.approx(1e-5)
    assert lr_at(100, config) == pytest.approx(1e-3)
    assert lr_at(1000, config) == pytest.approx(1e-4)
    assert all(lr_at(s, config) >= lr_at(s + 1, config) for s in range(100, 1000))


def test_build_config_rejects_bad_values():
    with pytest.raises(ValueError, match="n_head"):
        BuildConfig(n_embd=130, n_head=4)
    with pytest.raises(ValueError, match="--data"):
        BuildConfig(corpus="shakespeare")
    with pytest.raises(ValueError, match="'reviews' or 'shakespeare'"):
        BuildConfig(corpus="wiki")


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs ../shared/data/tinyshakespeare.txt")
def test_shakespeare_is_cut_into_short_passages():
    passages = shakespeare_passages(SHAKESPEARE)
    assert len(passages) > 5000
    assert max(len(p) for p in passages) < 500
    assert passages[0].startswith("First Citizen:")


# --- the shipped model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    return load_causal_lm()


def test_embedded_model_is_small_and_loads_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("load_causal_lm tried to connect to the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    model, tokenizer = load_causal_lm()
    files = {p.name: p.stat().st_size for p in EMBEDDED_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "build_info.json"} <= set(files)
    assert sum(files.values()) < 10 * 2**20
    assert not model.training and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert tokenizer.padding_side == "left"
    assert json.loads((EMBEDDED_MODEL_DIR / "tokenizer_config.json").read_text())["padding_side"] == "left"
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    ids = tokenizer("The pasta was")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids, skip_special_tokens=True) == "The pasta was"
    info = json.loads((EMBEDDED_MODEL_DIR / "build_info.json").read_text())
    assert info["corpus"] == "reviews" and info["eval_loss"] < 1.4


def generate(model, tokenizer, prompts: list[str], do_sample: bool, seed: int = 0) -> tuple[list[str], float]:
    """Completions of ``prompts`` (decoded, without specials) and the share that ended with EOS."""
    torch.manual_seed(seed)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=do_sample, top_k=0, top_p=1.0, max_new_tokens=48,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new = out[:, batch["input_ids"].shape[1]:]
    ended = (new == tokenizer.eos_token_id).any(dim=1).float().mean().item()
    return tokenizer.batch_decode(new, skip_special_tokens=True), ended


def test_samples_are_english_and_end_with_eos(embedded):
    model, tokenizer = embedded
    prompts = make_prompts(64, seed=12345)
    for do_sample in (False, True):
        completions, ended = generate(model, tokenizer, prompts, do_sample)
        assert ended > 0.95
        assert english_share(completions) > 0.97
        assert all(c.startswith(" ") for c in completions)


def test_base_model_samples_have_mixed_sentiment(embedded):
    model, tokenizer = embedded
    prompts = make_prompts(128, seed=777)
    completions, _ = generate(model, tokenizer, prompts, do_sample=True, seed=1)
    scores = compound(completions)
    assert (scores < -0.3).mean() > 0.2
    assert (scores > 0.3).mean() > 0.2


# --- loading errors ---------------------------------------------------------------------------


def tiny_gpt2(vocab_size: int = 1024) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=vocab_size,
                                      n_positions=32))


def test_loads_a_user_directory(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    load_tokenizer().save_pretrained(tmp_path)
    model, tokenizer = load_causal_lm(tmp_path, dtype=torch.float64)
    assert model.dtype == torch.float64 and not model.training and tokenizer.padding_side == "left"


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*never downloaded"):
        load_causal_lm(tmp_path / "nope")


def test_directory_without_config_or_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_causal_lm(tmp_path)
    tiny_gpt2().config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights.*save_pretrained"):
        load_causal_lm(tmp_path)


def test_non_causal_configs_are_refused(tmp_path):
    GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path / "cls")
    with pytest.raises(ValueError, match="not a causal language model"):
        load_causal_lm(tmp_path / "cls")
    BertForMaskedLM(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, vocab_size=64)).save_pretrained(tmp_path / "mlm")
    with pytest.raises(ValueError, match="not a causal language model"):
        load_causal_lm(tmp_path / "mlm")
    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "enc")
    with pytest.raises(ValueError, match="encoder-only"):
        load_causal_lm(tmp_path / "enc")


def test_remote_code_needs_trust(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_causal_lm(tmp_path)


def test_tokenizer_without_pad_token_names_the_fix(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    tokenizer = load_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"tokenizer.pad_token = tokenizer.eos_token"):
        load_causal_lm(tmp_path)


def test_directory_without_tokenizer(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="No tokenizer.*tokenizer.save_pretrained"):
        load_causal_lm(tmp_path)


def test_tokenizer_larger_than_the_embedding(tmp_path):
    tiny_gpt2(vocab_size=100).save_pretrained(tmp_path)
    load_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="1024 tokens but the model embeds only 100.*resize_token_embeddings"):
        load_causal_lm(tmp_path)


# --- reproducible build -----------------------------------------------------------------------


@pytest.mark.slow
def test_build_is_deterministic_and_learns(tmp_path):
    infos = []
    for name in ("a", "b"):
        config = BuildConfig(out=tmp_path / name, seed=1, n_texts=3000, max_steps=120, warmup_steps=10,
                             n_layer=2, n_embd=64, n_head=2, progress=False)
        infos.append(build(config))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    varying = ("wall_seconds", "train_seconds", "tokens_per_second")
    assert [{k: v for k, v in i.items() if k not in varying} for i in infos][0] == \
        [{k: v for k, v in i.items() if k not in varying} for i in infos][1]
    assert infos[0]["eval_loss"] < 2.6  # a unigram model of the reviews scores about 4.7 nats per token
    assert not list(tmp_path.glob(".*"))  # no temporary directory left behind
    model, tokenizer = load_causal_lm(tmp_path / "a")
    assert model.config.n_layer == 2 and tokenizer.padding_side == "left"
    shutil.rmtree(tmp_path / "b")
