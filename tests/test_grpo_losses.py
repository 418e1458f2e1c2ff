"""The group methods' advantages and aggregated losses against hand-computed values on hand-made groups."""

import math

import pytest
import torch

from agents.grpo_losses import (
    ADVANTAGES,
    AGGREGATIONS,
    KL_LOSSES,
    clipped_token_loss,
    overlong_penalty,
    zero_variance_groups,
)

# two groups of three: [1, 0, 0] and a zero-variance group [1, 1, 1]
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])


def test_grpo_advantages_by_hand():
    # group 1: mean 1/3, unbiased std sqrt(1/3); group 2: all equal -> 0
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    expected = [(2 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4), 0, 0, 0]
    torch.testing.assert_close(ADVANTAGES["grpo"](REWARDS, 3), torch.tensor(expected))
    torch.testing.assert_close(ADVANTAGES["grpo"](REWARDS, 3, scale_rewards=False),
                               torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0]))


def test_rloo_advantages_by_hand():
    # r_i - mean of the two others: 1 - 0, 0 - 0.5, 0 - 0.5; zero-variance group: 0
    torch.testing.assert_close(ADVANTAGES["rloo"](REWARDS, 3), torch.tensor([1.0, -0.5, -0.5, 0, 0, 0]))


def test_reinforce_pp_advantages_by_hand():
    mean = 4 / 6
    std = math.sqrt((4 * (1 / 3) ** 2 + 2 * (2 / 3) ** 2) / 5)
    expected = [(r - mean) / (std + 1e-4) for r in REWARDS.tolist()]
    torch.testing.assert_close(ADVANTAGES["reinforce_pp"](REWARDS, 3), torch.tensor(expected))


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_group_of_one_has_zero_advantage(name):
    assert ADVANTAGES[name](torch.tensor([1.0, 0.0, 0.5]), 1).tolist() == [0.0, 0.0, 0.0]


def test_reinforce_pp_group_of_one_uses_the_batch():
    torch.testing.assert_close(ADVANTAGES["reinforce_pp"](torch.tensor([1.0, 0.0]), 1, scale_rewards=False),
                               torch.tensor([0.5, -0.5]))


def test_zero_variance_groups():
    assert zero_variance_groups(REWARDS, 3).tolist() == [False, True]
    assert zero_variance_groups(torch.tensor([0.0, 1.0]), 1).tolist() == [True, True]


# unequal lengths: 1 token (EOS at once), 3 tokens; per-token losses written so each value is visible
TOKEN_LOSS = torch.tensor([[2.0, 9.0, 9.0, 9.0], [1.0, 2.0, 3.0, 9.0]])
MASK = torch.tensor([[True, False, False, False], [True, True, True, False]])


def test_aggregations_by_hand():
    # grpo: (2/1 + 6/3) / 2 = 2; dr_grpo: (2 + 6) / (2 * 4) = 1; dapo: (2 + 6) / 4 tokens = 2
    assert AGGREGATIONS["grpo"](TOKEN_LOSS, MASK, 4).item() == pytest.approx(2.0)
    assert AGGREGATIONS["dr_grpo"](TOKEN_LOSS, MASK, 4).item() == pytest.approx(1.0)
    assert AGGREGATIONS["dapo"](TOKEN_LOSS, MASK, 4).item() == pytest.approx(2.0)
    # lengths matter differently: a 1-token and a 3-token response of per-token loss 1 each
    ones = torch.ones(2, 4)
    assert AGGREGATIONS["grpo"](ones, MASK, 4).item() == pytest.approx(1.0)  # each response weighs the same
    assert AGGREGATIONS["dapo"](ones, MASK, 4).item() == pytest.approx(1.0)
    assert AGGREGATIONS["dr_grpo"](ones, MASK, 4).item() == pytest.approx(4 / 8)


def test_token_weights_per_aggregation():
    """The gradient each token gets: grpo 1/(B|o|), dr_grpo 1/(B T), dapo 1/(sum |o|); 0 after EOS."""
    for name, weights in {"grpo": [[1 / 2, 0, 0, 0], [1 / 6, 1 / 6, 1 / 6, 0]],
                          "dr_grpo": [[1 / 8, 0, 0, 0], [1 / 8, 1 / 8, 1 / 8, 0]],
                          "dapo": [[1 / 4, 0, 0, 0], [1 / 4, 1 / 4, 1 / 4, 0]]}.items():
        x = torch.zeros(2, 4, requires_grad=True)
        AGGREGATIONS[name](x, MASK, 4).backward()
        torch.testing.assert_close(x.grad, torch.tensor(weights))


def test_clipped_loss_at_ratio_one_is_minus_advantage_on_response_tokens_only():
    logprobs = torch.tensor([[-1.0, -5.0, -5.0, -5.0], [-0.5, -0.2, -0.1, -7.0]])
    loss, stats = clipped_token_loss(logprobs, logprobs.clone(), torch.tensor([2.0, -1.0]), MASK, 0.2, 0.28)
    torch.testing.assert_close(loss, torch.tensor([[-2.0, 0, 0, 0], [1.0, 1.0, 1.0, 0]]))
    assert stats["ratio"].item() == 1.0 and stats["clipfrac"].item() == 0.0


def test_clip_higher_is_decoupled():
    """Ratio 1.25 with a positive advantage: clipped at 1.2 with a symmetric clip, not under clip-higher 0.28."""
    old = torch.zeros(1, 1)
    new = torch.full((1, 1), math.log(1.25), requires_grad=True)
    mask = torch.ones(1, 1, dtype=torch.bool)
    symmetric, stats = clipped_token_loss(new, old, torch.tensor([1.0]), mask, 0.2, 0.2)
    assert symmetric.item() == pytest.approx(-1.2) and stats["clipfrac"].item() == 1.0
    higher, stats = clipped_token_loss(new, old, torch.tensor([1.0]), mask, 0.2, 0.28)
    assert higher.item() == pytest.approx(-1.25) and stats["clipfrac"].item() == 0.0
    # a ratio of 0.75 with a negative advantage is clipped at 1 - 0.2 either way
    low = torch.full((1, 1), math.log(0.75))
    assert clipped_token_loss(low, old, torch.tensor([-1.0]), mask, 0.2, 0.28)[0].item() == pytest.approx(0.8)


def test_kl_losses_by_hand():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert KL_LOSSES["k3"](logp, ref).item() == pytest.approx(math.exp(-1) + 1 - 1)
    assert KL_LOSSES["k2"](logp, ref).item() == pytest.approx(0.5)
    assert KL_LOSSES["k3"](ref, ref).item() == 0.0 and KL_LOSSES["k2"](ref, ref).item() == 0.0


def test_k2_gradient_is_the_kl_gradient_and_k3_is_the_reverse_kl():
    """On-policy, over one categorical: E_pi[grad k2] = grad KL(pi||ref), E_pi[grad k3] = grad KL(ref||pi)."""
    logits = torch.tensor([0.3, -0.2, 1.0], requires_grad=True)
    ref = torch.log_softmax(torch.tensor([0.0, 0.5, -0.5]), -1)

    def true_grad(forward):
        logp = torch.log_softmax(logits, -1)
        kl = (logp.exp() * (logp - ref)).sum() if forward else (ref.exp() * (ref - logp)).sum()
        return torch.autograd.grad(kl, logits)[0]

    def loss_grad(kind):  # the loss term's expected pathwise gradient under pi (the loss's gradient on-policy)
        logp = torch.log_softmax(logits, -1)
        pi = logp.exp().detach()
        return torch.autograd.grad((pi * KL_LOSSES[kind](logp, ref)).sum(), logits)[0]

    torch.testing.assert_close(loss_grad("k2"), true_grad(forward=True))
    torch.testing.assert_close(loss_grad("k3"), true_grad(forward=False))
    assert not torch.allclose(loss_grad("k3"), true_grad(forward=True), atol=1e-3)


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([2, 4, 5, 6, 6])
    truncated = torch.tensor([False, False, False, False, True])
    # max 6, buffer 2: free up to 4 tokens, 5 -> -0.5, 6 -> -1, truncated -> -1
    torch.testing.assert_close(overlong_penalty(lengths, truncated, 6, 2),
                               torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    assert overlong_penalty(lengths, truncated, 6, 0).tolist() == [0.0] * 5
