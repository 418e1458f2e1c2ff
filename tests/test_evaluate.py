"""The evaluation's KL to the reference: the per-position exact KL and the sampled log-ratio (k1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents.evaluate import EvalConfig, evaluate_models, repetition_rate, sample_and_score
from rlhf_envs.text_common import TextTask

PROMPTS = [f"review {i}: the film was" for i in range(48)]


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, save_tiny_lm, one_thread):
    """Two tiny GPT-2s that differ (seed 0 and 1) on one tokenizer: the reference and a 'tuned' policy."""
    root = tmp_path_factory.mktemp("eval")
    return str(save_tiny_lm(root / "ref", seed=0)), str(save_tiny_lm(root / "policy", seed=1))


def _task(path: str, estimator: str) -> TextTask:
    return TextTask(path, lambda prompts, responses: np.zeros(len(prompts), dtype=np.float32), PROMPTS, beta=0.0,
                    kl_estimator=estimator, max_new_tokens=8, temperature=0.8)


@pytest.mark.parametrize("path", ["lean", "hugging-face"])
def test_exact_kl_is_the_sum_of_next_token_kls_along_each_response(two_models, path):
    ref_path, policy_path = two_models
    task = _task(ref_path, "exact")
    from rlhf_envs.lm.gpt2 import gpt2_view
    from rlhf_envs.lm.loading import load_causal_lm
    from rlhf_envs.lm.sampling import generate, response_logprobs

    policy = load_causal_lm(policy_path)[0].eval()
    if path == "hugging-face":  # a forward hook: the lean view cannot honour it, so Hugging Face's forward runs
        policy.transformer.h[0].register_forward_hook(lambda module, args, output: None)
    assert (gpt2_view(policy) is None) == (path == "hugging-face")
    samples = sample_and_score(task, policy, EvalConfig(models={"r": ref_path}, reference="r", max_new_tokens=8,
                                                        temperature=0.8,
                                                        batch_size=16, progress=False))
    # Recompute the first batch by hand: the same sampler draw, then both models' next-token
    # distributions at temperature 0.8 along each response, summed where the response has tokens.
    with torch.inference_mode():
        gen = generate(policy, task.prompt_ids[:16], task.prompt_mask[:16], task.sampling,
                       eos_token_id=task.eos_token_id,
                       pad_token_id=task.pad_token_id, generator=torch.Generator().manual_seed(0))
        p = response_logprobs(policy, task.prompt_ids[:16], task.prompt_mask[:16], gen.response_ids, gen.response_mask,
                              task.sampling, return_full=True)[1]
        q = response_logprobs(task.ref_model, task.prompt_ids[:16], task.prompt_mask[:16], gen.response_ids,
                              gen.response_mask, task.ref_sampling, return_full=True)[1]
    expected = ((p.exp() * (p - q)).sum(-1) * gen.response_mask).sum(-1)
    np.testing.assert_allclose(samples.kl[:16], expected.numpy(), rtol=1e-4, atol=1e-5)
    # k1 on the same responses: the sampled log-ratio, a different (noisier) number per response
    assert samples.kl_k1 is not None and not np.allclose(samples.kl_k1, samples.kl)


def test_exact_and_k1_agree_on_average_and_exact_is_less_noisy(two_models):
    ref_path, policy_path = two_models
    prompts = [f"prompt {i % 7} says" for i in range(512)]
    result = evaluate_models(EvalConfig(models={"ref": ref_path, "policy": policy_path}, reference="ref",
                                        gold_reward="sentiment", prompts=prompts, max_new_tokens=8, batch_size=128,
                                        progress=False))
    rows = {row["model"]: row for row in result["rows"]}
    # the reference against itself: exactly 0 either way
    assert rows["ref"]["kl_to_ref"] == pytest.approx(0.0, abs=1e-5)
    assert rows["ref"]["kl_to_ref_k1"] == pytest.approx(0.0, abs=1e-5)
    policy = rows["policy"]
    assert policy["kl_to_ref"] > 0.05
    # the same expectation: the two means agree within 4 standard errors of their difference
    spread = np.hypot(policy["kl_to_ref_stderr"], policy["kl_to_ref_k1_stderr"])
    assert abs(policy["kl_to_ref"] - policy["kl_to_ref_k1"]) < 4 * spread
    assert policy["kl_to_ref_stderr"] < 0.7 * policy["kl_to_ref_k1_stderr"]


def test_repetition_rate_flags_a_word_run_four_times_in_a_row():
    looped = [" quite lovely. Just as my my my my my my", " I want My my, MY my money back"]
    fine = [" my my, what a lovely book.", " very very very good", " the plot was plot plot and plot", ""]
    assert repetition_rate(looped) == 1.0
    assert repetition_rate(fine) == 0.0
    assert repetition_rate(looped + fine) == pytest.approx(2 / 6)
    assert repetition_rate([]) == 0.0
