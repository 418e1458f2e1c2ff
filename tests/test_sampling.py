"""The sampler: distribution actually sampled from, KV cache vs no cache, seeds, early stop."""

import pytest
import torch

from rlhf_envs.lm.sampling import SamplingConfig, generate, positions_from_mask, processed_logprobs, response_logprobs
from tests.tiny_models import tiny_causal_lm

EOS, PAD = 256, 257


@pytest.fixture(scope="module")
def lm():
    return tiny_causal_lm(seed=0)


def _prompts(tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return batch["input_ids"], batch["attention_mask"].bool()


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=0), dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0),
                                    dict(top_p=1.5)])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingConfig(**kwargs)


def test_processed_logprobs_truncation_rules():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    cfg = SamplingConfig(temperature=0.5, top_k=4, top_p=0.9)
    lp = processed_logprobs(logits, cfg)
    scaled = logits[0, :4] / 0.5
    probs = torch.softmax(scaled, -1)
    kept = (probs.cumsum(-1) - probs) < 0.9
    expected = torch.full((6,), float("-inf"))
    expected[:4][kept] = torch.log_softmax(scaled[kept], -1)
    torch.testing.assert_close(lp[0], expected)
    greedy = processed_logprobs(logits, SamplingConfig(greedy=True))
    assert greedy[0, 0] == 0 and torch.isinf(greedy[0, 1:]).all()


def test_overwriting_logits_gives_the_same_logprobs_bit_for_bit():
    logits = torch.randn(300, 1024, generator=torch.Generator().manual_seed(0)) * 4
    for cfg in (SamplingConfig(temperature=0.7), SamplingConfig(temperature=0.7, top_k=5), SamplingConfig(greedy=True)):
        expected = processed_logprobs(logits, cfg)
        assert torch.equal(processed_logprobs(logits.clone(), cfg, overwrite=True), expected)
    with pytest.raises(ValueError, match="outside autograd"):
        processed_logprobs(logits.clone().requires_grad_(), SamplingConfig(temperature=0.7), overwrite=True)


def test_reported_logprobs_match_empirical_frequencies(lm):
    model, tokenizer = lm
    ids, mask = _prompts(tokenizer, ["ab"] * 6000)
    cfg = SamplingConfig(max_new_tokens=1, temperature=0.3, top_k=6, top_p=0.9)
    gen = generate(model, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD,
                   generator=torch.Generator().manual_seed(0))
    tokens, reported = gen.response_ids[:, 0], gen.logprobs[:, 0]
    support = tokens.unique()
    assert 1 < len(support) <= 6
    freq = torch.stack([(tokens == t).float().mean() for t in support])
    prob = torch.stack([reported[tokens == t][0].exp() for t in support])
    torch.testing.assert_close(prob.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert (freq - prob).abs().max() < 0.03
    with torch.no_grad():
        raw = torch.log_softmax(model(ids[:1]).logits[0, -1], -1)[support].exp()
    assert (freq - raw).abs().max() > 0.1, "raw-logit probabilities must not describe the sampled distribution"


def _no_cache_greedy(model, ids, mask, steps):
    out = []
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions_from_mask(mask)).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        out.append(nxt)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt, dtype=torch.bool)], 1)
    return torch.cat(out, 1)


def test_sampler_equals_no_cache_reference(lm):
    model, tokenizer = lm
    ids, mask = _prompts(tokenizer, ["hello there", "a", "the cat sat on"])
    with torch.no_grad():
        expected = _no_cache_greedy(model, ids, mask, 12)
    gen = generate(model, ids, mask, SamplingConfig(max_new_tokens=12, greedy=True), eos_token_id=-1, pad_token_id=PAD)
    assert torch.equal(gen.response_ids, expected)
    single = generate(model, ids[1:2, -1:], mask[1:2, -1:], SamplingConfig(max_new_tokens=12, greedy=True),
                      eos_token_id=-1, pad_token_id=PAD)
    assert torch.equal(single.response_ids[0], expected[1]), "left padding must not change the result"
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9)
    gen = generate(model, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD,
                   generator=torch.Generator().manual_seed(1))
    teacher = response_logprobs(model, ids, mask, gen.response_ids, gen.response_mask, cfg)
    torch.testing.assert_close(teacher, gen.logprobs, atol=1e-5, rtol=0)
    assert teacher.requires_grad


def test_same_seed_same_responses(lm):
    model, tokenizer = lm
    ids, mask = _prompts(tokenizer, ["hello", "ab"])
    cfg = SamplingConfig(max_new_tokens=10, top_p=0.95)
    runs = [generate(model, ids, mask, cfg, eos_token_id=EOS, pad_token_id=PAD,
                     generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert torch.equal(runs[0].response_ids, runs[1].response_ids)
    assert torch.equal(runs[0].logprobs, runs[1].logprobs)


def test_stops_at_eos_and_pads_after(lm):
    model, tokenizer = lm
    ids, mask = _prompts(tokenizer, ["hello", "hello"])
    with torch.no_grad():
        first = model(ids).logits[0, -1].argmax().item()
    gen = generate(model, ids, mask, SamplingConfig(max_new_tokens=8, greedy=True), eos_token_id=first,
                   pad_token_id=PAD)
    assert gen.response_ids.shape == (2, 1), "generation stops once every row hit EOS"
    assert gen.response_mask.all() and (gen.logprobs == 0).all()
    mixed_ids, mixed_mask = _prompts(tokenizer, ["hello", "zz"])
    gen = generate(model, mixed_ids, mixed_mask, SamplingConfig(max_new_tokens=8, greedy=True), eos_token_id=first,
                   pad_token_id=PAD)
    if gen.response_ids[1, 0] != first:
        assert not gen.response_mask[0, 1:].any() and (gen.response_ids[0, 1:] == PAD).all()
