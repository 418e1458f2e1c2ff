"""Group sampling in the text vector envs (GRPO/RLOO): N / G prompts, each handed out G times."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlhf_envs  # noqa: F401
from rlhf_envs import text_common


def _envs(**kwargs):
    return gym.make_vec("TextBandit-v0", num_envs=8, max_new_tokens=6, n_prompts=16, **kwargs)


def test_groups_share_a_prompt_and_info_names_the_group():
    envs = _envs(group_size=4)
    obs, info = envs.reset(seed=0)
    assert info["group"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert (obs[:4] == obs[0]).all() and (obs[4:] == obs[4]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        next_obs, _, _, _, info = envs.step(envs.action_space.sample())
    assert info["group"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert (info["final_obs"] == obs).all()
    assert (next_obs[:4] == next_obs[0]).all()


@pytest.mark.parametrize("bad", [0, -2, 3, 2.0, True])
def test_bad_group_size_is_an_error_naming_it(bad):
    with pytest.raises(ValueError, match=f"group_size.*{bad!r}|group_size={bad}"):
        _envs(group_size=bad)


def test_reference_runs_each_prompt_once_with_the_same_numbers(monkeypatch):
    """Without the global prompt cache, a batch whose prompts repeat runs each distinct prompt once, and
    its reference log-probs equal those of every row run with its own prompt."""
    monkeypatch.setattr(text_common, "PROMPT_CACHE_BYTES", 0)
    envs = _envs(group_size=4)
    task = envs.unwrapped.task
    index = torch.tensor([3, 3, 3, 3, 5, 5, 5, 5])
    ids = torch.randint(2, task.vocab_size, (8, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(8, 6, dtype=torch.bool)
    mask[1, 3:] = False
    calls = []
    view = task.reference_view()
    original = type(view).packed_hidden

    def counting(self, ids_, mask_, *args, **kwargs):
        calls.append(int(mask_.shape[0]))
        return original(self, ids_, mask_, *args, **kwargs)

    monkeypatch.setattr(type(view), "packed_hidden", counting)
    grouped, _ = task.ref_logprobs(index, ids, mask, False)
    assert calls[0] == 2  # the prompt forward: 2 distinct prompts, not 8 rows
    rows = [task.ref_logprobs(index[i:i + 1], ids[i:i + 1], mask[i:i + 1], False)[0] for i in range(8)]
    torch.testing.assert_close(grouped, torch.cat(rows), atol=1e-5, rtol=1e-5)


def test_skip_reference_runs_no_reference_and_reports_zero_kl(monkeypatch):
    envs = _envs(group_size=2, beta=0.0, skip_reference=True)
    task = envs.unwrapped.task
    monkeypatch.setattr(task, "ref_logprobs", lambda *a, **k: pytest.fail("the reference ran"))
    envs.reset(seed=0)
    _, rewards, _, _, info = envs.step(envs.action_space.sample())
    assert np.all(info["kl"] == 0) and np.allclose(rewards, info["score"])
    with pytest.raises(ValueError, match="beta=0"):
        _envs(beta=0.1, skip_reference=True)
